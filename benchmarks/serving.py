"""Serving report: `miaotui serve`, measured from outside with bench-serve.

- Throughput and latency at concurrency 1 and 16 (medians of 3 runs; 128 input and 128 output tokens per request,
  2 threads) of a 4-bit checkpoint (RTN int4 g32, the Q4_1 class) and of the default model in its
  default dtype.
- The same checkpoints through the Python API in-process (`miaotui bench`, LLM.generate on the same
  engine), batch 1: its decode rate next to the server's one-request decode rate (1 / TPOT).
- Prefix caching: TTFT of requests sharing a ~1,000-token system prompt, first vs later.
- RSS of the server process over 1,000 requests in a row (sampled; flat after warm-up?).
- With --llama-server PATH (llama.cpp's `llama-server` binary, built from the llama.cpp sources in
  PyPI's llama-cpp-python sdist): llama-server at its defaults (weight repacking on; off only if the
  default crashes, which the results then say) with 2 threads and 16 slots, on the shipped Q4_1 GGUF
  and on a BF16 GGUF, measured by the same client in the same run.
Writes benchmarks/results/serving.{json,md,png}. Run: `make bench-serve`.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from miaotui.eval.bench_serve import bench_serve  # noqa: E402
from miaotui.loaders.model_store import pull  # noqa: E402
from tests.unit.server_process import free_port, running_http_process, running_server  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


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


_SEEDS = itertools.count(0, 1000)  # every run its own random prompts: no prefix-cache hits across runs


def median_run(url: str, concurrency: int, requests: int, repeat: int) -> dict:
    """bench-serve `repeat` times (128 in / 128 out): the run with the median output tok/s, and
    every run's figure (the host is shared: single runs move by ±20%)."""
    runs = [bench_serve(url, [concurrency], requests, 128, 128, seed=next(_SEEDS))[0] for _ in range(repeat)]
    runs.sort(key=lambda r: r["output_tok_s"])
    return runs[len(runs) // 2] | {"runs_output_tok_s": [r["output_tok_s"] for r in runs]}


@contextlib.contextmanager
def running_llama_server(binary: str, gguf: str, repack: bool, timeout: float = 300.0):
    """llama.cpp's server at its defaults, with 2 threads, 16 slots and a 16k context."""
    port = free_port()
    command = [binary, "-m", gguf, "-t", "2", "-np", "16", "-c", "16384", "--host", "127.0.0.1", "--port", str(port)]
    with running_http_process(command + ([] if repack else ["--no-repack"]), port, "llama-server", timeout) as (url, _):
        yield url


def measure_llama_server(binary: str, ggufs: dict[str, str], requests: int, repeat: int) -> dict:
    """{class: {"rows": [c1 row, c16 row], "repack": bool}} for llama-server on each GGUF, same client
    and settings as ours. Weight repacking (its default) is turned off only if the default crashes."""
    out = {}
    for name, gguf in ggufs.items():
        for repack in (True, False):
            try:
                with running_llama_server(binary, gguf, repack) as url:
                    bench_serve(url, [1], 2, 16, 16)  # warm-up
                    rows = [median_run(url, 1, max(4, requests // 4), repeat), median_run(url, 16, requests, repeat)]
                out[name] = {"rows": rows, "repack": repack}
                break
            except (RuntimeError, httpx.HTTPError, KeyError) as exc:
                print(f"llama-server {name} with repack={repack} failed: {str(exc)[:300]}", flush=True)
        for r in out.get(name, {}).get("rows", []):
            print(f"llama-server {name} (repack {out[name]['repack']}):", json.dumps(r), flush=True)
    return out


def in_process_decode(model: str, repeat: int) -> dict:
    """`miaotui bench` (LLM.generate through the engine), batch 1, 128 in / 128 out, in its own process."""
    done = subprocess.run([sys.executable, "-m", "miaotui.cli", "bench", "-m", model, "--prompt-tokens", "128",
                           "--gen-tokens", "128", "--batch", "1", "--repeat", str(repeat), "--threads", "2",
                           "--json"], check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def one_request_and_in_process(url: str, model: str, requests: int, repeat: int) -> tuple[dict, dict]:
    """Concurrency 1 through the server and batch 1 through the Python API, run by turns while the
    server idles (so drift on the host hits both alike): -> (median server row, in-process figures)."""
    served, api = [], []
    for _ in range(repeat):
        served.append(bench_serve(url, [1], requests, 128, 128, seed=next(_SEEDS))[0])
        api.append(in_process_decode(model, 1)["decode_tok_s"])
    served.sort(key=lambda r: r["output_tok_s"])
    row = served[len(served) // 2] | {"runs_output_tok_s": [r["output_tok_s"] for r in served],
                                      "runs_decode_tok_s": [1000 / r["tpot_p50_ms"] for r in served]}
    return row, {"decode_tok_s": statistics.median(api), "runs_decode_tok_s": api}


def export_bf16_gguf(source: str, out: Path) -> str:
    """The default model as a BF16 GGUF (llama-server's BF16 class), written by miaotui's exporter."""
    if not out.exists():
        subprocess.run([sys.executable, "-m", "miaotui.cli", "export-gguf", "-m", source, "--type", "bf16", "-o",
                        str(out)], check=True, capture_output=True)
    return str(out)


def quantize_4bit(source: str, out: Path) -> str:
    """The Q4_1-class checkpoint: RTN int4, asymmetric groups of 32 (the shipped model's own grid)."""
    if not (out / "miaotui_model.json").exists():
        subprocess.run([sys.executable, "-m", "miaotui.cli", "quantize", "-m", source, "--method", "rtn",
                        "--bits", "4", "--group-size", "32", "-o", str(out)], check=True, capture_output=True)
    return str(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="4-bit checkpoint to serve (default: RTN int4 g32 asym "
                                                      "of smollm2-135m, made here)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--rss-requests", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="runs per concurrency; the median is reported")
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"),
                        help="llama.cpp's llama-server binary: measure it in the same run")
    parser.add_argument("--llama-bf16-gguf", default=os.environ.get("LLAMA_BF16_GGUF"),
                        help="a BF16 GGUF of the model for llama-server's BF16 class (default: exported here "
                             "with `miaotui export-gguf --type bf16`)")
    args = parser.parse_args()
    default = str(pull("smollm2-135m"))
    model = args.model or quantize_4bit(default, Path(tempfile.gettempdir()) / "miaotui-serving-int4")
    results: dict = {"model": model, "throughput": [], "bf16_throughput": []}
    if args.llama_server:
        bf16_gguf = args.llama_bf16_gguf or export_bf16_gguf(default, Path(tempfile.gettempdir()) / "miaotui-bf16.gguf")
        ggufs = {"Q4_1": default, "BF16": bf16_gguf}
        results["llama_server"] = measure_llama_server(args.llama_server, ggufs, args.requests, args.repeat)
    results["in_process"] = {}
    server_args = ("--served-model-name", "m", "--threads", "2", "--kv-cache-mb", "1024", "--max-num-seqs", "64")
    # The default model in its default dtype (bf16 where the CPU has it): compared with BF16 llama-server.
    with running_server(default, *server_args) as (url, _):
        bench_serve(url, [1], 2, 16, 16)  # warm-up
        c1_row, results["in_process"]["bf16"] = one_request_and_in_process(url, default, max(4, args.requests // 4),
                                                                           args.repeat)
        results["bf16_throughput"] = [c1_row, median_run(url, 16, args.requests, args.repeat)]
    for r in results["bf16_throughput"]:
        print("default model:", json.dumps(r), flush=True)
    with running_server(model, *server_args) as (url, proc):
        bench_serve(url, [1], 2, 16, 16)  # warm-up
        c1_row, results["in_process"]["int4"] = one_request_and_in_process(url, model, max(4, args.requests // 4),
                                                                           args.repeat)
        rows = [c1_row, median_run(url, 16, args.requests, args.repeat)]
        results["throughput"] = rows
        for r in rows:
            print("4-bit model:", json.dumps(r), flush=True)
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
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serving.json").write_text(json.dumps(results, indent=2))
    c1, c16 = results["throughput"]
    b1, b16 = results["bf16_throughput"]
    measured = {k: v["rows"] for k, v in results.get("llama_server", {}).items()}
    lines = ["| model | concurrency | out tok/s | llama-server, same run | ratio | TTFT p50 ms | TPOT p50 ms |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    int4, bf16 = "int4 g32 (Q4_1 class)", "default bf16 (BF16 class)"
    for name, cls, i, row in ((int4, "Q4_1", 0, c1), (int4, "Q4_1", 1, c16), (bf16, "BF16", 0, b1),
                              (bf16, "BF16", 1, b16)):
        same = measured[cls][i]["output_tok_s"] if cls in measured else None
        crashed = cls in measured and not results["llama_server"][cls]["repack"]
        repack = " (repack off: default crashed)" if crashed else ""
        same_cols = f"{same:.1f}{repack} | {row['output_tok_s'] / same:.2f}×" if same else "— | —"
        lines.append(f"| {name} | {row['concurrency']} | {row['output_tok_s']:.1f} | {same_cols} | "
                     f"{row['ttft_p50_ms']:.0f} | {row['tpot_p50_ms']:.1f} |")
    lines += ["", "| model | LLM.generate batch-1 decode tok/s | server one request, decode tok/s (1 / TPOT) | ratio |",
              "|---|---:|---:|---:|"]
    for name, key, row in (("int4 g32", "int4", c1), ("default bf16", "bf16", b1)):
        api, served = results["in_process"][key]["decode_tok_s"], statistics.median(row["runs_decode_tok_s"])
        lines.append(f"| {name} | {api:.1f} | {served:.1f} | {api / served:.2f}× |")
    lines += ["",
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
    def peer(cls: str, i: int) -> float:
        return measured[cls][i]["output_tok_s"] if cls in measured else 0.0

    axes[0].bar(["int4 c1", "Q4_1 c1", "int4 c16", "Q4_1 c16", "bf16 c1", "BF16 c1", "bf16 c16", "BF16 c16"],
                [c1["output_tok_s"], peer("Q4_1", 0), c16["output_tok_s"], peer("Q4_1", 1),
                 b1["output_tok_s"], peer("BF16", 0), b16["output_tok_s"], peer("BF16", 1)],
                color=["tab:blue", "gray"] * 2 + ["tab:orange", "gray"] * 2)
    axes[0].set_ylabel("output tok/s")
    axes[0].set_title("128 output tokens; gray: llama-server (this run)")
    axes[1].plot([s[0] for s in samples], [s[1] for s in samples], marker=".")
    axes[1].set_xlabel("requests served")
    axes[1].set_ylabel("server RSS MB")
    axes[1].set_title("RSS over consecutive requests")
    fig.tight_layout()
    fig.savefig(RESULTS / "serving.png", dpi=120)


if __name__ == "__main__":
    main()
