"""Quality of the decode kernels: for each weight format, the WikiText-2 perplexity of the same
weights through the float path and through the engine's decode steps.

- float path: the model loaded in float32 (a quantized layer's weight dequantized to float32, float32
  GEMMs), one pass per 512-token window;
- decode path: the model as `miaotui run` / `serve` load it on this CPU (bf16 activations), each
  window's first half one prefill step into the paged KV cache and every scored token one
  single-row decode step (eval/perplexity.py, decode_perplexity): the few-row kernels (int8-quantized
  activations for integer weights, bf16 tiles), the fused decoder layer, the decode head.
Both score the same targets: the second half of each window (llama.cpp's protocol), on the first
--windows x 512 tokens of the bundled wiki.test.raw. Formats: bf16 and miaotui's equivalents of
GGUF's Q8_0 / Q4_0 (int8 / int4 in symmetric groups of 32, as benchmarks/vs_llamacpp.py makes them).
Writes benchmarks/results/decode_quality.{json,md}. Run: `.venv/bin/python benchmarks/decode_quality.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.vs_llamacpp import CLASSES, bf16_gguf, describe_machine, machine, miaotui_quantize  # noqa: E402
from miaotui import LLM  # noqa: E402
from miaotui.data import WIKITEXT2_TEST, read_text  # noqa: E402
from miaotui.eval.perplexity import decode_perplexity, perplexity  # noqa: E402
from miaotui.loaders.model_store import cache_dir  # noqa: E402
from miaotui.runtime import dtype_name  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CTX = 512


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=40, help="512-token windows scored (255 targets each; "
                        "40: llama-perplexity -c 512 --chunks 40)")
    parser.add_argument("--classes", default="BF16,Q8_0,Q4_0")
    args = parser.parse_args()
    unknown = [c for c in args.classes.split(",") if c not in CLASSES]
    if unknown:
        raise SystemExit(f"unknown class {unknown[0]} ({', '.join(CLASSES)})")
    torch.set_num_threads(2)
    work = cache_dir() / "bench-files"
    work.mkdir(parents=True, exist_ok=True)
    source = bf16_gguf("135m", work)
    results: dict = {"machine": machine(), "windows": args.windows, "rows": []}
    ids: list[int] | None = None
    for cls in args.classes.split(","):
        if CLASSES[cls] is None:
            model, fmt = source, "bf16"
        else:
            method, bits, group = CLASSES[cls]
            model = miaotui_quantize(source, method, bits, group, work / f"{source.stem}-miaotui-int{bits}-g{group}")
            fmt = f"int{bits} g{group} sym"
        reference = LLM(str(model), dtype="float32", decode_weight_dtype="none")
        if ids is None:
            ids = reference.tokenizer.encode(read_text(WIKITEXT2_TEST))[:args.windows * CTX]
        float_ppl = perplexity(reference.model, ids, ctx=CTX, score_from=CTX // 2, progress=False)
        del reference
        served = LLM(str(model))
        decode_ppl = decode_perplexity(served.model, ids, ctx=CTX)
        row = {"class": cls, "format": fmt, "decode_dtype": dtype_name(served.dtype), "float_ppl": float_ppl.ppl,
               "decode_ppl": decode_ppl.ppl, "tokens": decode_ppl.tokens,
               "change": decode_ppl.ppl / float_ppl.ppl - 1}
        results["rows"].append(row)
        print(f"{cls} ({fmt}): float path {row['float_ppl']:.3f}, decode path ({row['decode_dtype']}) "
              f"{row['decode_ppl']:.3f}: {row['change']:+.2%}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "decode_quality.json").write_text(json.dumps(results, indent=2))
    m = results["machine"]
    lines = [f"{describe_machine(m)}, 2 threads. "
             f"SmolLM2-135M, WikiText-2 test, {args.windows} windows of {CTX} tokens, second half scored.", "",
             "| class | weights | float path PPL | decode path PPL | change |", "|---|---|---:|---:|---:|"]
    for r in results["rows"]:
        lines.append(f"| {r['class']} | {r['format']} | {r['float_ppl']:.3f} | {r['decode_ppl']:.3f} "
                     f"({r['decode_dtype']}) | {r['change']:+.2%} |")
    (RESULTS / "decode_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
