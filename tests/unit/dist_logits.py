"""Run under torchrun: logits of a fixed batch from a tensor/pipeline-parallel model, saved by rank 0."""

import sys

import torch

from miaotui import LLM

model, out, tp, pp = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
llm = LLM(model, dtype="float32", decode_weight_dtype="none", tensor_parallel_size=tp, pipeline_parallel_size=pp)
ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11], [9, 8, 7, 6, 5, 4, 3, 2]])
positions = torch.arange(ids.shape[1])[None].expand(2, -1)
with torch.inference_mode():
    logits = llm.model(ids, positions)
if torch.distributed.get_rank() == 0:
    torch.save(logits, out)
torch.distributed.barrier()  # rank 0 saves first: no rank tears gloo down under the other
torch.distributed.destroy_process_group()
