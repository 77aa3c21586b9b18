"""One distributed configuration, run under torchrun by benchmarks/distributed.py: times batch-1
decode and an 8-prompt batch, and measures loopback send/recv latency and bandwidth (rank 0 writes JSON)."""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
import torch.distributed as dist

from miaotui import LLM, SamplingParams


def timed(fn, repeat: int = 3) -> float:
    fn()
    runs = []
    for _ in range(repeat):
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def link() -> dict[str, float]:
    """Ping-pong between ranks 0 and 1: one-way latency (8 bytes) and bandwidth (4 MB)."""
    out = {}
    for name, numel in (("small", 2), ("large", 1 << 20)):
        x = torch.zeros(numel)
        def pingpong(x=x):
            for _ in range(20):
                if dist.get_rank() == 0:
                    dist.send(x, 1)
                    dist.recv(x, 1)
                elif dist.get_rank() == 1:
                    dist.recv(x, 0)
                    dist.send(x, 0)
        out[name] = timed(pingpong) / 40  # one-way
    return {"latency_s": out["small"], "bandwidth_Bps": (4 << 20) / max(out["large"] - out["small"], 1e-9)}


def main() -> None:
    model, out, tp, pp, dp, threads, tokens = sys.argv[1:8]
    torch.set_num_threads(int(threads))
    llm = LLM(model, dtype="float32", tensor_parallel_size=int(tp), pipeline_parallel_size=int(pp),
              data_parallel_size=int(dp))
    if not dist.is_initialized():  # world size 1: no parallel model, but barriers still need a group
        dist.init_process_group("gloo")
    gen = int(tokens)
    params = SamplingParams(temperature=0, max_tokens=gen, ignore_eos=True)
    base = min(1000, llm.config.vocab_size - 80)
    prompt = list(range(base, base + 64))
    one = timed(lambda: llm.generate([prompt], params))
    batch = [list(range(base + i, base + 64 + i)) for i in range(8)]
    eight = timed(lambda: llm.generate(batch, params))
    result = {"tp": int(tp), "pp": int(pp), "dp": int(dp), "batch1_s": one, "batch1_tok_s": gen / one,
              "batch8_s": eight, "batch8_tok_s": 8 * gen / eight}
    if dist.get_world_size() > 1:
        result["link"] = link()
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
