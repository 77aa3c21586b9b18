"""Serving report: `miaotui serve` on the default model, measured from outside with bench-serve.

- Throughput and latency at concurrency 1 and 16 (128 output tokens per request, 2 threads),
  next to llama.cpp's `llama-server` figures recorded in PERF.md (not measured here unless
  --llama-server URL points at a running one).
- Prefix caching: TTFT of requests sharing a ~1,000-token system prompt, first vs later.
- RSS of the server process over 1,000 requests in a row (sampled; flat after warm-up?).
Writes benchmarks/results/serving.{json,md,png}. Run: `make bench-serve`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from miaotui.eval.bench_serve import bench_serve  # noqa: E402
from miaotui.loaders.model_store import pull  # noqa: E402
from tests.unit.server_process import running_server  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LLAMA_SERVER = {"Q4_1": {"c1": 82, "c16": 181}, "Q8_0": {"c16": 253}, "BF16": {"c16": 207}}  # PERF.md, tok/s


def rss_mb(pid: int) -> float:
    return int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0]) / 1024


def prefix_ttft(url: str, model: str, system_words: int, requests: int) -> list[float]:
    """TTFT of chat requests that share one long system prompt, each with its own question."""
    system = " ".join(f"rule{i % 97} says be kind and exact." for i in range(system_words // 6))
    out = []
    for i in range(requests):
        body = {"model": model, "messages": [{"role": "system", "content": system},
                                             {"role": "user", "content": f"Question {i}: what is {i} + {i}?"}],
                "max_tokens": 2, "temperature": 0, "stream": True}
        start = time.perf_counter()
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"] and \
                        json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    break
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="checkpoint to serve (default: smollm2-135m)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--rss-requests", type=int, default=1000)
    args = parser.parse_args()
    model = args.model or str(pull("smollm2-135m"))
    results: dict = {"model": model}
    with running_server(model, "--served-model-name", "m", "--threads", "2", "--kv-cache-mb", "1024",
                        "--max-num-seqs", "64") as (url, proc):
        rows = bench_serve(url, [1], max(4, args.requests // 4), 128, 128)
        rows += bench_serve(url, [16], args.requests, 128, 128)
        results["throughput"] = rows
        for r in rows:
            print(json.dumps(r), flush=True)
        ttft = prefix_ttft(url, "m", 1000, 6)
        results["prefix_cache"] = {"ttft_first_s": ttft[0], "ttft_later_median_s": statistics.median(ttft[1:]),
                                   "speedup": ttft[0] / statistics.median(ttft[1:]), "all_s": ttft}
        print(json.dumps(results["prefix_cache"]), flush=True)
        samples = []
        with httpx.Client(timeout=120) as client:
            for i in range(args.rss_requests):
                client.post(f"{url}/v1/completions", json={"model": "m", "prompt": f"Request {i}: tell me",
                                                           "max_tokens": 4, "temperature": 0})
                if i % 50 == 49:
                    samples.append((i + 1, rss_mb(proc.pid)))
        warm = samples[len(samples) // 5][1]
        results["rss"] = {"samples": samples, "after_warmup_mb": warm, "last_mb": samples[-1][1],
                          "growth_pct": (samples[-1][1] / warm - 1) * 100}
        print(json.dumps(results["rss"]), flush=True)
    results["llama_server_recorded"] = LLAMA_SERVER
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serving.json").write_text(json.dumps(results, indent=2))
    c1, c16 = results["throughput"]
    lines = ["| concurrency | out tok/s | llama-server Q4_1 (recorded) | ratio | TTFT p50 ms | TPOT p50 ms |",
             "|---:|---:|---:|---:|---:|---:|",
             f"| 1 | {c1['output_tok_s']:.1f} | 82 | {c1['output_tok_s'] / 82:.2f}× | {c1['ttft_p50_ms']:.0f} | "
             f"{c1['tpot_p50_ms']:.1f} |",
             f"| 16 | {c16['output_tok_s']:.1f} | 181 | {c16['output_tok_s'] / 181:.2f}× | {c16['ttft_p50_ms']:.0f} | "
             f"{c16['tpot_p50_ms']:.1f} |", "",
             f"Prefix caching (1,000-token shared system prompt): TTFT first {ttft[0] * 1e3:.0f} ms, later "
             f"{results['prefix_cache']['ttft_later_median_s'] * 1e3:.0f} ms (median): "
             f"{results['prefix_cache']['speedup']:.1f}× faster.", "",
             f"RSS over {args.rss_requests} requests: {results['rss']['after_warmup_mb']:.0f} MB after warm-up, "
             f"{results['rss']['last_mb']:.0f} MB at the end ({results['rss']['growth_pct']:+.1f}%)."]
    (RESULTS / "serving.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].bar(["miaotui c1", "llama-server c1", "miaotui c16", "llama-server c16"],
                [c1["output_tok_s"], 82, c16["output_tok_s"], 181], color=["tab:blue", "gray", "tab:blue", "gray"])
    axes[0].set_ylabel("output tok/s")
    axes[0].set_title("serving throughput, 128 output tokens (llama-server: recorded)")
    axes[1].plot([s[0] for s in samples], [s[1] for s in samples], marker=".")
    axes[1].set_xlabel("requests served")
    axes[1].set_ylabel("server RSS MB")
    axes[1].set_title("RSS over consecutive requests")
    fig.tight_layout()
    fig.savefig(RESULTS / "serving.png", dpi=120)


if __name__ == "__main__":
    main()
