"""Quantization report: method, bits, group, size, perplexity, and speed, in one table and one plot.

Default model; WikiText-2 test, ctx 512, first 40 x 512 tokens (full-window protocol); reference
= the dequantized float32 model. Calibration (GPTQ) uses tokens after the evaluated ones, so the
two never overlap. Writes benchmarks/results/quantization.{json,png,md}. Run: `make bench-quant`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from miaotui import LLM
from miaotui.compress.calibration import load_calibration
from miaotui.compress.quantize.apply import quantize_model
from miaotui.data import WIKITEXT2_TEST, read_text
from miaotui.eval.bench import run_bench
from miaotui.eval.perplexity import perplexity
from miaotui.layers.quant_formats import QuantFormat
from miaotui.loaders.model_store import pull

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TEXT = WIKITEXT2_TEST  # the WikiText-2 test split that ships with miaotui
EVAL_TOKENS = 40 * 512

# (label, method, format or None for float32, counts toward targets?)
CONFIGS = [
    ("float32", None, None, True),
    ("rtn int8", "rtn", QuantFormat(8, -1, True), True),
    ("smoothquant w8a8", "smoothquant", QuantFormat(8, -1, True), True),
    ("rtn int4 g32 asym (= shipped Q4_1 grid)", "rtn", QuantFormat(4, 32, False), False),
    ("rtn int4 g32 sym (Q4_0 format)", "rtn", QuantFormat(4, 32, True), True),
    ("gptq int4 g32 sym", "gptq", QuantFormat(4, 32, True), True),
    ("awq int4 g32 sym", "awq", QuantFormat(4, 32, True), True),
    ("awq-gptq int4 g32 sym", "awq-gptq", QuantFormat(4, 32, True), True),
    ("rtn int4 g128", "rtn", QuantFormat(4, 128, False), True),
    ("gptq int4 g128", "gptq", QuantFormat(4, 128, False), True),
    ("awq int4 g128", "awq", QuantFormat(4, 128, False), True),
    ("awq-gptq int4 g128", "awq-gptq", QuantFormat(4, 128, False), True),
    ("ternary g64", "rtn", QuantFormat(2, 64, True, "ternary"), True),
    ("binary g64", "rtn", QuantFormat(2, 64, True, "binary"), True),
]


def weight_mb(model: torch.nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--text-file", default=str(DEFAULT_TEXT))
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default=None, help="comma-separated labels to run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = pull("smollm2-135m")
    rows = []
    for label, method, fmt, counts in CONFIGS:
        if args.only and label not in args.only.split(","):
            continue
        llm = LLM(str(path), dtype="float32", decode_weight_dtype="none")
        ids = llm.tokenizer.encode(read_text(Path(args.text_file)), add_special_tokens=False)
        seconds = 0.0
        if method is not None:
            calib = load_calibration(args.text_file, llm.tokenizer, args.calib_samples, 512,
                                     skip_tokens=EVAL_TOKENS) if method != "rtn" else None
            start = time.perf_counter()
            quantize_model(llm.model, method, fmt, calib)
            seconds = time.perf_counter() - start
        ppl = perplexity(llm.model, ids[:EVAL_TOKENS], ctx=512, progress=False).ppl
        b1 = run_bench(llm, prompt_tokens=512, gen_tokens=16, batch=1, repeat=1, progress=False)
        b16 = run_bench(llm, prompt_tokens=32, gen_tokens=8, batch=16, repeat=1, progress=False)
        row = {"label": label, "method": method or "none", "bits": fmt.bits if fmt else 32,
               "kind": fmt.kind if fmt else "float", "group": fmt.group_size if fmt else None,
               "symmetric": fmt.symmetric if fmt else None, "counts": counts, "size_mb": weight_mb(llm.model),
               "ppl": ppl, "quantize_s": seconds, "prefill_tok_s": b1["prefill_tok_s"],
               "decode_b1_tok_s": b1["decode_tok_s"], "decode_b16_tok_s": b16["decode_tok_s"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out_json = RESULTS / "quantization.json"
    if args.only and out_json.is_file():  # a partial run updates its rows in the full table
        fresh = {r["label"]: r for r in rows}
        old = json.loads(out_json.read_text())["rows"]
        rows = [fresh.pop(r["label"], r) for r in old] + list(fresh.values())
        rows.sort(key=lambda r: [c[0] for c in CONFIGS].index(r["label"]))
    base = next((r["ppl"] for r in rows if r["method"] == "none"), None)
    for r in rows:
        r["dppl_pct"] = None if base is None else (r["ppl"] / base - 1) * 100
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"calib_samples": args.calib_samples, "rows": rows},
                                                          indent=2))
    lines = ["| method | size MB | ppl | Δppl % | prefill tok/s | decode b1 tok/s | decode b16 tok/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['size_mb']:.1f} | {r['ppl']:.2f} | {r['dppl_pct']:+.1f} | "
                     f"{r['prefill_tok_s']:.0f} | {r['decode_b1_tok_s']:.1f} | {r['decode_b16_tok_s']:.1f} |")
    (RESULTS / "quantization.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows)


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        ax.scatter(r["decode_b1_tok_s"], r["ppl"], s=r["size_mb"] * 2, alpha=0.6)
        ax.annotate(r["label"], (r["decode_b1_tok_s"], r["ppl"]), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("batch-1 decode tok/s")
    ax.set_ylabel("WikiText-2 ppl (log)")
    ax.set_title("SmolLM2-135M quantized: quality vs speed (marker area = size)")
    fig.tight_layout()
    fig.savefig(RESULTS / "quantization.png", dpi=120)


if __name__ == "__main__":
    main()
