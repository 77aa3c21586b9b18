"""What structured outputs cost in the continuous batch: the same 32 requests (up to 128 tokens
each, greedy) decoded as plain text, with half of them held to a JSON schema, and all of them held
to it. Output tokens per second (a constrained request ends when its JSON does), medians over
repetitions; the masks are computed only for the constrained rows.

Writes benchmarks/results/structured.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from vs_llamacpp import describe_machine, machine  # noqa: E402

from miaotui import LLM, SamplingParams  # noqa: E402
from miaotui.engine.structured import Constraint  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "skills": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                 "country": {"type": "string", "maxLength": 16}},
                "required": ["city", "country"], "additionalProperties": False}},
    "required": ["name", "age", "skills", "address"], "additionalProperties": False}


def run(llm: LLM, prompts: list[list[int]], structured: int, tokens: int) -> dict:
    """One batch: the first `structured` requests constrained -> output tok/s overall and per kind."""
    plain = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    shaped = SamplingParams(temperature=0.0, max_tokens=tokens, structured=Constraint("json_schema", SCHEMA))
    params = [shaped if i < structured else plain for i in range(len(prompts))]
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    made = [len(o.outputs[0].token_ids) for o in outs]
    valid = sum(1 for o in outs[:structured] if _parses(o.outputs[0].text))
    return {"seconds": seconds, "tokens": sum(made), "tok_s": sum(made) / seconds, "valid_json": valid}


def _parses(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    llm = LLM(args.model, max_num_seqs=args.requests)
    prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": f"Describe person {i} as JSON."}])
               for i in range(args.requests)]
    run(llm, prompts[:4], 2, 8)  # warm-up (kernels, the grammar tokenizer)
    cases = {"plain": 0, "half constrained": args.requests // 2, "all constrained": args.requests}
    rows = {}
    for name, structured in cases.items():
        runs = [run(llm, prompts, structured, args.tokens) for _ in range(args.repeat)]
        rows[name] = {"tok_s": statistics.median(r["tok_s"] for r in runs), "runs": runs,
                      "valid_json": min(r["valid_json"] for r in runs), "constrained": structured}
        print(f"{name}: {rows[name]['tok_s']:.1f} tok/s ({structured} constrained, "
              f"{rows[name]['valid_json']} valid JSON)", flush=True)
    base = rows["plain"]["tok_s"]
    results = {"machine": describe_machine(machine()), "model": args.model, "requests": args.requests,
               "tokens": args.tokens, "rows": rows, "ratios": {k: v["tok_s"] / base for k, v in rows.items()}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "structured.json").write_text(json.dumps(results, indent=2))
    lines = [f"{results['machine']}; {args.model}, {args.requests} requests x {args.tokens} tokens, greedy; "
             f"medians of {args.repeat}.", "", "| batch | constrained | output tok/s | vs plain | valid JSON |",
             "|---|---:|---:|---:|---:|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['constrained']} | {row['tok_s']:.1f} | {row['tok_s'] / base:.2f}x | "
                     f"{row['valid_json']}/{row['constrained']} |")
    (RESULTS / "structured.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(list(rows), [r["tok_s"] for r in rows.values()], color=["#888", "#4a8", "#48a"])
    ax.set_ylabel("output tok/s")
    ax.set_title(f"structured outputs in a batch of {args.requests} ({args.model})")
    fig.tight_layout()
    fig.savefig(RESULTS / "structured.png", dpi=120)


if __name__ == "__main__":
    main()
