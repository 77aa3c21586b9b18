"""Pruning and distillation report on the default model.

Protocol of the quantization report: WikiText-2 test, ctx 512, first 40 x 512 tokens, reference
= the dequantized float32 model. Calibration and training text come from the same file *after*
the evaluated tokens, so they never overlap. Sections (--sections, comma-separated):
- oneshot: 50% unstructured (magnitude, wanda, wanda+owl, sparsegpt, taylor) and 2:4 (magnitude,
  wanda, sparsegpt): ppl and size on disk (bitmask + values).
- structured: whole decoder layers and MLP channels removed (Taylor-ranked, `--structures`), batch-1
  decode speed against the original in the same run (each loaded as a user loads it, default dtypes,
  median of repetitions); then the first listed structure is distilled from the original for a fixed
  CPU-time budget, and the share of the ppl gap it closes is reported.
- gradual: gradual magnitude pruning to 50% while fine-tuning, against one-shot magnitude at 50%.
Writes benchmarks/results/pruning.{json,md,png}. Run: `make bench-prune`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from miaotui import LLM
from miaotui.compress.calibration import load_calibration
from miaotui.compress.distill import DistillConfig, distill
from miaotui.compress.prune.gradual import GradualSchedule, train_gradual
from miaotui.compress.prune.structured import prune_structured
from miaotui.compress.prune.unstructured import prune_model
from miaotui.compress.training import load_training_tokens
from miaotui.data import WIKITEXT2_TEST, read_text
from miaotui.eval.bench import run_bench
from miaotui.eval.perplexity import perplexity
from miaotui.loaders.miaotui_dir import save_model
from miaotui.loaders.model_store import pull

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TEXT = WIKITEXT2_TEST  # the WikiText-2 test split that ships with miaotui
EVAL_TOKENS = 40 * 512

ONESHOT = [  # (label, method, sparsity, pattern, owl)
    ("magnitude 50%", "magnitude", 0.5, None, False),
    ("wanda 50%", "wanda", 0.5, None, False),
    ("wanda+owl 50%", "wanda", 0.5, None, True),
    ("sparsegpt 50%", "sparsegpt", 0.5, None, False),
    ("taylor 50%", "taylor", 0.5, None, False),
    ("magnitude 2:4", "magnitude", 0.5, "2:4", False),
    ("wanda 2:4", "wanda", 0.5, "2:4", False),
    ("sparsegpt 2:4", "sparsegpt", 0.5, "2:4", False),
]


def float_llm(path: str) -> LLM:
    return LLM(path, dtype="float32", decode_weight_dtype="none")


def ppl_of(model, ids: list[int]) -> float:
    return perplexity(model, ids[:EVAL_TOKENS], ctx=512, progress=False).ppl


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir()) / 1e6


def decode_speed(path: str, repeat: int) -> float:
    """Median batch-1 decode tok/s of a checkpoint loaded with default settings (as `miaotui bench`)."""
    llm = LLM(path)
    return statistics.median(run_bench(llm, prompt_tokens=64, gen_tokens=128, batch=1, repeat=1,
                                       progress=False)["decode_tok_s"] for _ in range(repeat))


def section_oneshot(path: str, text: str, ids: list[int], samples: int, tmp: Path) -> list[dict]:
    rows = []
    for label, method, sparsity, pattern, owl in ONESHOT:
        llm = float_llm(path)
        calib = None if method == "magnitude" else load_calibration(text, llm.tokenizer, samples, 512,
                                                                    skip_tokens=EVAL_TOKENS)
        start = time.perf_counter()
        record = prune_model(llm.model, method, sparsity, pattern, calib, owl=owl)
        seconds = time.perf_counter() - start
        out = save_model(llm.model, llm.tokenizer, tmp / "oneshot")
        row = {"section": "oneshot", "label": label, "method": method, "pattern": pattern, "owl": owl,
               "sparsity": sum(record.modules.values()) / len(record.modules), "ppl": ppl_of(llm.model, ids),
               "size_mb": dir_mb(out), "prune_s": seconds}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def section_structured(path: str, text: str, ids: list[int], args, tmp: Path) -> list[dict]:
    """Each listed structure is pruned (Taylor-ranked) and timed against the original in the same run;
    the first one listed is then distilled from the original for `--distill-minutes`."""
    base = float_llm(path)
    base_ppl = ppl_of(base.model, ids)
    base_dir = save_model(base.model, base.tokenizer, tmp / "dense")
    calib = load_calibration(text, base.tokenizer, args.calib_samples, 512, skip_tokens=EVAL_TOKENS)
    pruned: list[tuple[str, object, object, Path]] = []
    for spec in args.structures.split(","):
        structure, sparsity = spec.split(":")
        student, record = prune_structured(float_llm(path).model, structure, float(sparsity), "taylor", calib)
        label = f"{structure} -{float(sparsity):.0%} (taylor)"
        pruned.append((label, student, record, save_model(student, base.tokenizer, tmp / structure)))
    # Decode speed: the original and every pruned model alternate, so drift on a shared machine hits all alike.
    speeds: dict[str, list[float]] = {"original": []} | {label: [] for label, *_ in pruned}
    for _ in range(args.repeat):
        speeds["original"].append(decode_speed(str(base_dir), 1))
        for label, _, _, out in pruned:
            speeds[label].append(decode_speed(str(out), 1))
    tok_s = {label: statistics.median(v) for label, v in speeds.items()}
    rows = [{"section": "structured", "label": "original", "params": pruned[0][2].params_before, "ppl": base_ppl,
             "decode_tok_s": tok_s["original"], "size_mb": dir_mb(base_dir)}]
    for label, student, record, out in pruned:
        rows.append({"section": "structured", "label": label, "params": record.params_after,
                     "ppl": ppl_of(student, ids), "decode_tok_s": tok_s[label], "size_mb": dir_mb(out),
                     "speedup": tok_s[label] / tok_s["original"], "removed": record.removed,
                     "param_reduction": 1 - record.params_after / record.params_before})
        print(json.dumps(rows[-1]), flush=True)
    label, student, record, out = pruned[0]
    pruned_row = rows[1]
    tokens = load_training_tokens(text, base.tokenizer, skip_tokens=EVAL_TOKENS)
    cfg = DistillConfig(steps=100_000, lr=args.distill_lr, batch=args.batch, seq_len=args.seq_len,
                        max_seconds=args.distill_minutes * 60, alpha=0.1, temperature=2.0)
    result = distill(base.model, student, tokens, cfg)
    distilled_ppl = ppl_of(student, ids)
    rows.append(pruned_row | {"label": f"{label} + distill {args.distill_minutes:g} min", "ppl": distilled_ppl,
                              "distill_steps": result.steps, "distill_s": result.seconds,
                              "gap_closed": (pruned_row["ppl"] - distilled_ppl) / (pruned_row["ppl"] - base_ppl)})
    print(json.dumps(rows[-1]), flush=True)
    return rows


def section_gradual(path: str, text: str, ids: list[int], args) -> list[dict]:
    llm = float_llm(path)
    prune_model(llm.model, "magnitude", 0.5)
    rows = [{"section": "gradual", "label": "one-shot magnitude 50%", "sparsity": 0.5, "ppl": ppl_of(llm.model, ids)}]
    llm = float_llm(path)
    tokens = load_training_tokens(text, llm.tokenizer, skip_tokens=EVAL_TOKENS)
    schedule = GradualSchedule(0.0, 0.5, 0, args.gradual_end, frequency=args.gradual_frequency)
    record = train_gradual(llm.model, tokens, schedule, args.gradual_steps, "magnitude", lr=args.gradual_lr,
                           batch=args.batch, seq_len=args.seq_len)
    rows.append({"section": "gradual", "label": f"gradual magnitude 50% ({args.gradual_steps} steps)",
                 "sparsity": record.curve[-1][1], "ppl": ppl_of(llm.model, ids), "seconds": record.seconds,
                 "curve": record.curve})
    print(json.dumps(rows), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--text-file", default=str(DEFAULT_TEXT))
    parser.add_argument("--sections", default="oneshot,structured,gradual")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--structures", default="layers:0.34,channels:0.5",
                        help="structure:sparsity list; the first is distilled")
    parser.add_argument("--distill-minutes", type=float, default=20.0)
    parser.add_argument("--distill-lr", type=float, default=2e-4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--gradual-steps", type=int, default=150)
    parser.add_argument("--gradual-end", type=int, default=100)
    parser.add_argument("--gradual-frequency", type=int, default=10)
    parser.add_argument("--gradual-lr", type=float, default=5e-5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = str(pull("smollm2-135m"))
    ids = float_llm(path).tokenizer.encode(read_text(Path(args.text_file)),
                                           add_special_tokens=False)
    sections = args.sections.split(",")
    out_json = RESULTS / "pruning.json"
    results = json.loads(out_json.read_text()) if out_json.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        if "oneshot" in sections:
            results["oneshot"] = section_oneshot(path, args.text_file, ids, args.calib_samples, Path(tmp))
        if "structured" in sections:
            results["structured"] = section_structured(path, args.text_file, ids, args, Path(tmp))
        if "gradual" in sections:
            results["gradual"] = section_gradual(path, args.text_file, ids, args)
    results["reference_ppl"] = ppl_of(float_llm(path).model, ids) if "reference_ppl" not in results \
        else results["reference_ppl"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=2))
    write_markdown(results)
    plot(results)


def write_markdown(results: dict) -> None:
    ref = results["reference_ppl"]
    lines = [f"Reference (float32): ppl {ref:.2f}", ""]
    if "oneshot" in results:
        lines += ["| one-shot | sparsity | ppl | Δppl % | size on disk MB |", "|---|---:|---:|---:|---:|"]
        for r in results["oneshot"]:
            lines.append(f"| {r['label']} | {r['sparsity']:.3f} | {r['ppl']:.2f} | {(r['ppl'] / ref - 1) * 100:+.1f} | "
                         f"{r['size_mb']:.1f} |")
        lines.append("")
    if "structured" in results:
        lines += ["| structured | params | size MB | ppl | decode b1 tok/s | speedup | gap closed |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in results["structured"]:
            lines.append(f"| {r['label']} | {r['params'] / 1e6:.1f} M | {r['size_mb']:.1f} | {r['ppl']:.2f} | "
                         f"{r['decode_tok_s']:.1f} | {r.get('speedup', 1.0):.2f}× | "
                         f"{'' if 'gap_closed' not in r else format(r['gap_closed'], '.0%')} |")
        lines.append("")
    if "gradual" in results:
        lines += ["| gradual vs one-shot | sparsity | ppl |", "|---|---:|---:|"]
        for r in results["gradual"]:
            lines.append(f"| {r['label']} | {r['sparsity']:.3f} | {r['ppl']:.2f} |")
    (RESULTS / "pruning.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    if "oneshot" in results:
        rows = results["oneshot"]
        axes[0].barh([r["label"] for r in rows], [r["ppl"] for r in rows], color="tab:blue")
        axes[0].axvline(results["reference_ppl"], color="k", ls="--", label="float32")
        axes[0].set_xscale("log")
        axes[0].set_xlabel("WikiText-2 ppl (log)")
        axes[0].set_title("one-shot pruning, 50% / 2:4")
        axes[0].legend()
    if "gradual" in results and results["gradual"][-1].get("curve"):
        curve = results["gradual"][-1]["curve"]
        axes[1].plot([c[0] for c in curve], [c[1] for c in curve], marker="o")
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("measured sparsity")
        axes[1].set_title("gradual pruning: cubic schedule")
    fig.tight_layout()
    fig.savefig(RESULTS / "pruning.png", dpi=120)


if __name__ == "__main__":
    main()
