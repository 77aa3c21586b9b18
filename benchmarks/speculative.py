"""Speculative decoding on the default model: batch-1 decode speed with and without speculation
(same run, same prompts, medians over repetitions) and the mean tokens accepted per target pass.

Drafts: prompt lookup (n-gram), and a draft checkpoint given with --draft (e.g. a pruned and
distilled SmolLM2 written by `miaotui compress`). Prompts ask for text that repeats its input
(summaries, code edits), where prompt lookup helps, and open questions, where it does not.
Writes benchmarks/results/speculative.json. Run: `python benchmarks/speculative.py [--draft DIR]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from miaotui import LLM, SamplingParams
from miaotui.loaders.model_store import pull

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = [
    [{"role": "user", "content": "Repeat this list exactly, one item per line: apples, pears, plums, cherries, "
                                 "grapes, lemons, limes, oranges, peaches, mangoes."}],
    [{"role": "user", "content": "Rewrite with snake_case names:\ndef addNumbers(firstValue, secondValue):\n"
                                 "    totalValue = firstValue + secondValue\n    return totalValue"}],
    [{"role": "user", "content": "What is the capital of France? Answer in two sentences."}],
]


def timed(llm: LLM, ids: list[list[int]], tokens: int, repeat: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=tokens)
    llm.generate(ids[:1], SamplingParams(temperature=0, max_tokens=4))
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        outs = llm.generate(ids, params)
        runs.append(sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start))
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--draft", default=None)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = str(pull("smollm2-135m"))
    base = LLM(path)
    ids = [base.tokenizer.encode_chat(m) for m in PROMPTS]
    rows = [{"label": "no speculation", "tok_s": timed(base, ids, args.tokens, args.repeat)}]
    configs = [("ngram k=4", {"speculate": "ngram", "num_speculative_tokens": 4})]
    if args.draft:
        configs.append((f"draft {Path(args.draft).name} k=3", {"speculative_model": args.draft,
                                                               "num_speculative_tokens": 3}))
    for label, kwargs in configs:
        llm = LLM(path, **kwargs)
        tok_s = timed(llm, ids, args.tokens, args.repeat)
        stats = llm.speculation_stats
        rows.append({"label": label, "tok_s": tok_s, "speedup": tok_s / rows[0]["tok_s"],
                     "mean_tokens_per_step": stats.mean_accepted_per_step, "acceptance_rate": stats.acceptance_rate})
    for r in rows:
        print(json.dumps(r))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "speculative.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
