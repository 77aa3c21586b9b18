"""Speculative decoding on the default model: batch-1 decode speed with and without speculation
(same run, same prompts, medians over repetitions) and the mean tokens accepted per target pass.

Drafts: prompt lookup (n-gram), and a draft checkpoint (--draft; by default the pruned and distilled
SmolLM2 that `make run` builds). Prompts ask for text that repeats its input
(summaries, code edits), where prompt lookup helps, and open questions, where it does not.
Writes benchmarks/results/speculative.{json,md,png}. Run: `python benchmarks/speculative.py [--draft DIR]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from miaotui import LLM, SamplingParams
from miaotui.loaders.model_store import cache_dir, pull

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = [
    [{"role": "user", "content": "Repeat this list exactly, one item per line: apples, pears, plums, cherries, "
                                 "grapes, lemons, limes, oranges, peaches, mangoes."}],
    [{"role": "user", "content": "Rewrite with snake_case names:\ndef addNumbers(firstValue, secondValue):\n"
                                 "    totalValue = firstValue + secondValue\n    return totalValue"}],
    [{"role": "user", "content": "What is the capital of France? Answer in two sentences."}],
]


def timed(llm: LLM, ids: list[list[int]], tokens: int, repeat: int) -> dict:
    """Batch 1: each prompt alone, greedy. -> median tok/s over repetitions (all prompts' tokens over
    all prompts' time), mean tokens per target pass, and the texts (to check losslessness)."""
    llm.generate(ids[:1], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    params = SamplingParams(temperature=0, max_tokens=tokens)
    stats = llm.speculation_stats
    before = (0, 0) if stats is None else (stats.steps, stats.generated)
    runs: list[float] = []
    for _ in range(repeat):
        produced, seconds = 0, 0.0
        texts = []
        for prompt in ids:
            start = time.perf_counter()
            out = llm.generate([prompt], params)[0].outputs[0]
            seconds += time.perf_counter() - start
            produced += len(out.token_ids)
            texts.append(out.text)
        runs.append(produced / seconds)
    stats = llm.speculation_stats  # a snapshot: read it again
    per_pass = None if stats is None else (stats.generated - before[1]) / max(stats.steps - before[0], 1)
    return {"tok_s": statistics.median(runs), "tokens_per_pass": per_pass, "texts": texts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--draft", default=None, help="draft checkpoint (default: the draft `make run` builds, "
                                                      "if it exists)")
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = str(pull("smollm2-135m"))
    demo_draft = cache_dir() / "demo" / "smollm2-135m" / "draft"
    if args.draft is None and (demo_draft / "miaotui_model.json").is_file():
        args.draft = str(demo_draft)
    base = LLM(path)
    ids = [base.tokenizer.encode_chat(m) for m in PROMPTS]
    plain = timed(base, ids, args.tokens, args.repeat)
    rows = [{"label": "no speculation", "tok_s": plain["tok_s"], "speedup": 1.0}]
    configs = [(f"ngram k={k}", {"speculate": "ngram", "num_speculative_tokens": k}) for k in (3, 6)]
    if args.draft:
        configs.append((f"draft {Path(args.draft).name} k=3", {"speculative_model": args.draft,
                                                               "num_speculative_tokens": 3}))
    for label, kwargs in configs:
        r = timed(LLM(path, **kwargs), ids, args.tokens, args.repeat)
        rows.append({"label": label, "tok_s": r["tok_s"], "speedup": r["tok_s"] / plain["tok_s"],
                     "mean_tokens_per_pass": r["tokens_per_pass"], "identical_text": r["texts"] == plain["texts"]})
    for r in rows:
        print(json.dumps(r))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "speculative.json").write_text(json.dumps({"tokens": args.tokens, "repeat": args.repeat,
                                                          "threads": args.threads, "rows": rows}, indent=2))
    lines = ["| configuration | batch-1 tok/s | speedup | tokens per target pass | same text |",
             "|---|---:|---:|---:|---|"]
    for r in rows:
        per_pass = r.get("mean_tokens_per_pass")
        lines.append(f"| {r['label']} | {r['tok_s']:.1f} | {r['speedup']:.2f}× | "
                     f"{'—' if per_pass is None else format(per_pass, '.2f')} | "
                     f"{'—' if 'identical_text' not in r else 'yes' if r['identical_text'] else 'NO'} |")
    (RESULTS / "speculative.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh([r["label"] for r in rows], [r["tok_s"] for r in rows], color="tab:green")
    ax.invert_yaxis()
    ax.set_xlabel("batch-1 decode tok/s (greedy, identical output)")
    ax.set_title("speculative decoding on SmolLM2-135M (this machine)")
    fig.tight_layout()
    fig.savefig(RESULTS / "speculative.png", dpi=120)


if __name__ == "__main__":
    main()
