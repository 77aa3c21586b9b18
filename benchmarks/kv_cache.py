"""KV-cache quantization: what `--kv-cache-dtype int8` / `fp8` cost in quality and give in room and speed.

On the default model (the shipped Q4_1 GGUF as `miaotui serve` runs it: bf16 activations), for the
cache in the model's dtype (auto = bf16), int8 and fp8 (e4m3 as storage):
- Quality: WikiText-2 perplexity with every window scored through the paged cache (each 512-token
  window one prefill step whose attention reads the cache's keys and values; both protocols: all of
  each window, and llama.cpp's second half), and through the engine's decode steps (one single-row
  decode step per scored token: the native kernels reading the codes in place) on fewer windows.
- Room: tokens the cache holds in the same --kv-cache-mb.
- Serving: `miaotui serve` loaded by bench-serve with 16 concurrent requests (512 tokens in, 128 out,
  medians of --repeat runs), with the default 512 MB cache and with a 128 MB one, where a bf16 cache
  cannot hold all 16 requests at once.
- llama.cpp on the same GGUF, if its tools are built (benchmarks/llama_cpp.py): llama-perplexity with
  its default f16 cache and with `-ctk q8_0 -ctv q8_0` (its 8-bit cache), same windows.
Writes benchmarks/results/kv_cache.{json,md,png}. Run: `make bench-kv`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.quality_vs_peers import run_llama  # noqa: E402
from benchmarks.vs_llamacpp import describe_machine, machine  # noqa: E402
from miaotui import LLM  # noqa: E402
from miaotui.data import WIKITEXT2_TEST, read_text  # noqa: E402
from miaotui.eval.bench_serve import bench_serve  # noqa: E402
from miaotui.eval.perplexity import decode_perplexity, perplexity  # noqa: E402
from miaotui.loaders.model_store import pull  # noqa: E402
from tests.unit.server_process import running_server  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = ("auto", "int8", "fp8")
CTX, WINDOWS = 512, 40
INPUT_LEN, OUTPUT_LEN, CONCURRENCY = 512, 128, 16
_SEEDS = itertools.count(0, 1000)  # every run its own random prompts: no prefix-cache hits across runs


def quality(model: str, decode_windows: int) -> dict:
    """{dtype: {ppl_full, ppl_half, ppl_decode}} through the paged cache of each dtype."""
    llm = LLM(model)
    ids = llm.tokenizer.encode(read_text(WIKITEXT2_TEST), add_special_tokens=False)[:WINDOWS * CTX]
    out = {}
    for dtype in DTYPES:
        full = perplexity(llm.model, ids, CTX, progress=False, kv_cache_dtype=dtype)
        half = perplexity(llm.model, ids, CTX, score_from=CTX // 2, progress=False, kv_cache_dtype=dtype)
        stepped = decode_perplexity(llm.model, ids[:decode_windows * CTX], CTX, progress=False, kv_cache_dtype=dtype)
        out[dtype] = {"ppl_full": full.ppl, "ppl_half": half.ppl, "ppl_decode": stepped.ppl,
                      "decode_tokens": stepped.tokens}
        print(f"{dtype}: ppl full {full.ppl:.4f}, second halves {half.ppl:.4f}, decode steps {stepped.ppl:.4f}",
              flush=True)
    return out


def room(model: str, megabytes: float) -> dict:
    """{dtype: {tokens, bytes}}: what a --kv-cache-mb cache holds."""
    out = {}
    for dtype in DTYPES:
        llm = LLM(model, kv_cache_mb=megabytes, kv_cache_dtype=dtype)
        engine = llm.engine
        out[dtype] = {"tokens": engine.capacity_tokens, "bytes": engine.cache.bytes}
    return out


def serving(model: str, megabytes: float, repeat: int, requests: int) -> dict:
    """{dtype: bench-serve row with the median output tok/s}, 16 concurrent requests."""
    out = {}
    for dtype in DTYPES:
        with running_server(model, "--threads", "2", "--kv-cache-mb", str(megabytes), "--kv-cache-dtype", dtype,
                            timeout=300) as (url, _):
            bench_serve(url, [4], 4, 64, 16)  # warm-up: kernels built, caches touched
            runs = sorted((bench_serve(url, [CONCURRENCY], requests, INPUT_LEN, OUTPUT_LEN, seed=next(_SEEDS))[0]
                           for _ in range(repeat)), key=lambda r: r["output_tok_s"])
        out[dtype] = runs[len(runs) // 2] | {"runs_output_tok_s": [r["output_tok_s"] for r in runs]}
        print(f"serve {megabytes:g} MB {dtype}: {out[dtype]['output_tok_s']:.1f} output tok/s "
              f"(runs {', '.join(f'{r:.1f}' for r in out[dtype]['runs_output_tok_s'])})", flush=True)
    return out


def llama_cpp_quality(gguf: Path, tools: Path, work: Path) -> dict:
    """llama-perplexity (40 x 512, second halves) with its f16 cache and its q8_0 cache."""
    out = {}
    for name, extra in (("f16", []), ("q8_0", ["-ctk", "q8_0", "-ctv", "q8_0"])):
        log = work / f"llama-perplexity-{name}.log"
        command = [str(tools / "llama-perplexity"), "-m", str(gguf), "-f", str(WIKITEXT2_TEST), "-c", str(CTX),
                   "--chunks", str(WINDOWS), "-t", "2", *extra]
        _, repack = run_llama(command, log)
        found = re.search(r"Final estimate: PPL = ([0-9.]+)", log.read_text(errors="replace"))
        if found is None:
            raise RuntimeError(f"llama-perplexity printed no estimate; see {log}")
        out[name] = {"ppl_half": float(found[1]), "repack": repack}
        print(f"llama.cpp {name} cache: ppl {out[name]['ppl_half']:.4f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="bench-serve runs per setting (the median is kept)")
    parser.add_argument("--requests", type=int, default=32, help="requests per bench-serve run")
    parser.add_argument("--decode-windows", type=int, default=8, help="windows scored through decode steps")
    parser.add_argument("--small-mb", type=float, default=128, help="the tight cache of the second serving run")
    parser.add_argument("--llama-cpp-bin", default=None, help="llama.cpp's tools (default: the cached build, if any)")
    parser.add_argument("--skip-serving", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = str(pull("smollm2-135m"))
    results: dict = {"machine": machine(), "model": "SmolLM2-135M-Instruct Q4_1 GGUF, bf16 activations",
                     "windows": WINDOWS, "ctx": CTX, "decode_windows": args.decode_windows}
    results["quality"] = quality(model, args.decode_windows)
    results["room_512mb"] = room(model, 512)
    if not args.skip_serving:
        results["serving"] = {f"{mb:g}": serving(model, mb, args.repeat, args.requests) for mb in (512, args.small_mb)}
    tools = _llama_tools(args.llama_cpp_bin)
    if tools is not None:
        with tempfile.TemporaryDirectory() as work:
            results["llama_cpp"] = llama_cpp_quality(Path(model), tools, Path(work))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kv_cache.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "kv_cache.md").write_text(markdown(results))
    plot(results)
    print((RESULTS / "kv_cache.md").read_text())


def _llama_tools(given: str | None) -> Path | None:
    """llama.cpp's tools if given or already built (this benchmark does not build them)."""
    from benchmarks.llama_cpp import _has_tools, cache_root

    for candidate in (given, cache_root() / "build" / "bin"):
        if candidate and _has_tools(Path(candidate)):
            return Path(candidate)
    return None


def markdown(r: dict) -> str:
    q, base = r["quality"], r["quality"]["auto"]
    lines = [f"{describe_machine(r['machine'])}, 2 threads. {r['model']}; WikiText-2 test, {r['windows']} windows "
             f"of {r['ctx']} (decode steps: the first {r['decode_windows']}).", "",
             "| KV cache | bytes/token | tokens in 512 MB | PPL, whole windows | Δ | PPL, second halves | Δ "
             "| PPL, decode steps | Δ |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    room = r["room_512mb"]
    for dtype in DTYPES:
        row, held = q[dtype], room[dtype]
        cells = [f"{row[k]:.4f} | {row[k] / base[k] - 1:+.2%}" for k in ("ppl_full", "ppl_half", "ppl_decode")]
        lines.append(f"| {_label(dtype)} | {held['bytes'] / held['tokens']:,.0f} | {held['tokens']:,} "
                     f"({held['tokens'] / room['auto']['tokens']:.2f}x) | " + " | ".join(cells) + " |")
    if "llama_cpp" in r:
        f16, q8 = r["llama_cpp"]["f16"], r["llama_cpp"]["q8_0"]
        repack = "" if f16["repack"] else " (weight repacking off: the default crashed here)"
        change = q8["ppl_half"] / f16["ppl_half"] - 1
        lines += ["", f"llama.cpp on the same GGUF (llama-perplexity, second halves{repack}): f16 cache "
                      f"{f16['ppl_half']:.4f}, q8_0 cache {q8['ppl_half']:.4f} ({change:+.2%})."]
    if "serving" in r:
        lines += ["", f"`miaotui serve --threads 2`, bench-serve: {CONCURRENCY} concurrent requests, {INPUT_LEN} "
                      f"tokens in, {OUTPUT_LEN} out (median run).", "",
                  "| --kv-cache-mb | KV cache | output tok/s | vs bf16 | TTFT p50 ms | TPOT p50 ms |",
                  "|---:|---|---:|---:|---:|---:|"]
        for mb, rows in r["serving"].items():
            for dtype in DTYPES:
                row = rows[dtype]
                lines.append(f"| {mb} | {_label(dtype)} | {row['output_tok_s']:.1f} | "
                             f"{row['output_tok_s'] / rows['auto']['output_tok_s']:.2f}x | {row['ttft_p50_ms']:.0f} | "
                             f"{row['tpot_p50_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def _label(dtype: str) -> str:
    return {"auto": "bf16 (auto)", "int8": "int8", "fp8": "fp8 e4m3"}[dtype]


def plot(r: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if "serving" in r else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    base = r["quality"]["auto"]
    width = 0.25
    for i, key in enumerate(("ppl_full", "ppl_half", "ppl_decode")):
        values = [100 * (r["quality"][d][key] / base[key] - 1) for d in DTYPES]
        ax.bar([x + (i - 1) * width for x in range(len(DTYPES))], values, width,
               label={"ppl_full": "whole windows", "ppl_half": "second halves", "ppl_decode": "decode steps"}[key])
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(DTYPES)), [_label(d) for d in DTYPES])
    ax.set_ylabel("Δ perplexity vs the bf16 cache (%)")
    ax.set_title("Quality")
    ax.legend(fontsize=8)
    if panels == 2:
        ax = axes[0][1]
        for i, (mb, rows) in enumerate(r["serving"].items()):
            ax.bar([x + (i - 0.5) * 0.4 for x in range(len(DTYPES))], [rows[d]["output_tok_s"] for d in DTYPES], 0.4,
                   label=f"--kv-cache-mb {mb}")
        ax.set_xticks(range(len(DTYPES)), [_label(d) for d in DTYPES])
        ax.set_ylabel("output tok/s")
        ax.set_title(f"Serving, {CONCURRENCY} concurrent requests")
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M: KV-cache dtype", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / "kv_cache.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
