"""Quantization-aware training of a ternary model: how much of its ppl gap to float32 a fixed CPU
time budget recovers. Default model; the quantization report's ppl protocol (first 40 x 512
WikiText-2 test tokens); training text is the rest of the file, after the evaluated tokens.
Writes benchmarks/results/qat.json. Run: `python benchmarks/qat.py [--minutes 15]`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch

from miaotui import LLM
from miaotui.compress.quantize.apply import quantize_model
from miaotui.compress.quantize.qat import pack_after_qat, train_qat
from miaotui.compress.training import load_training_tokens
from miaotui.data import WIKITEXT2_TEST, read_text
from miaotui.eval.perplexity import perplexity
from miaotui.layers.quant_formats import QuantFormat
from miaotui.loaders.model_store import pull

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TEXT = WIKITEXT2_TEST  # the WikiText-2 test split that ships with miaotui
EVAL_TOKENS = 40 * 512


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--text-file", default=str(DEFAULT_TEXT))
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(str(pull("smollm2-135m")), dtype="float32", decode_weight_dtype="none")
    ids = llm.tokenizer.encode(read_text(Path(args.text_file)), add_special_tokens=False)
    eval_ids = ids[:EVAL_TOKENS]
    fmt = QuantFormat(2, args.group_size, True, "ternary")
    float_ppl = perplexity(llm.model, eval_ids, progress=False).ppl
    rtn = copy.deepcopy(llm.model)
    quantize_model(rtn, "rtn", fmt)
    rtn_ppl = perplexity(rtn, eval_ids, progress=False).ppl
    del rtn
    tokens = load_training_tokens(args.text_file, llm.tokenizer, skip_tokens=EVAL_TOKENS)
    result = train_qat(llm.model, tokens, fmt, steps=1_000_000, lr=args.lr, batch=args.batch, seq_len=args.seq_len,
                       max_seconds=args.minutes * 60)
    pack_after_qat(llm.model, fmt, result, "")
    qat_ppl = perplexity(llm.model, eval_ids, progress=False).ppl
    row = {"format": fmt.to_dict(), "float_ppl": float_ppl, "rtn_ppl": rtn_ppl, "qat_ppl": qat_ppl,
           "minutes": result.seconds / 60, "steps": result.steps, "tokens": result.steps * args.batch * args.seq_len,
           # Gap closed, on ppl itself and on log-ppl (cross-entropy), which is what training lowers.
           "gap_closed_ppl": (rtn_ppl - qat_ppl) / (rtn_ppl - float_ppl),
           "gap_closed_log_ppl": (math.log(rtn_ppl) - math.log(qat_ppl)) / (math.log(rtn_ppl) - math.log(float_ppl))}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "qat.json").write_text(json.dumps(row, indent=2))
    print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
