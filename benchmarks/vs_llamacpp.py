"""Batch-1 speed against llama.cpp at its defaults: same machine, same files, same run.

For each model size and GGUF class (Q4_0, Q8_0, BF16):
- llama.cpp's `llama-bench` at its defaults (weight repacking on; 2 threads) on the GGUF file:
  pp512 and tg128 (tok/s) in processes of their own, peak RSS. A test whose default crashes (here:
  repacked prompt GEMMs, SIGILL on some CPUs) reruns with repacking off, and the table says so.
  It and `miaotui bench` run in turn, one run each, --repeat times (medians), so that both meet the
  host's load at the same moments.
- `miaotui bench` (LLM.generate through the engine, batch 1) on the same GGUF file: its quantized
  tensors run in their own bits (loaders/gguf_quant.py: Q4_0 as int4 in symmetric groups of 32,
  Q8_0 as int8 in symmetric groups of 32, the Q6_K / Q8_0 embedding llama-quantize writes beside
  them as 8-bit tiles).
- Achieved decode bandwidth, as gpt-fast reports it: weight bytes read per token x tok/s, against
  a read bandwidth this script measures on the same threads.
- For the sizes in --serve-sizes: llama-server (defaults, 16 slots) and `miaotui serve`, one
  request and 16 at once (128 in / 128 out), and the time from start to a healthy server.
- Where miaotui's decode is slower than llama.cpp's, a per-op profile of its decode steps.
Models: the default model (SmolLM2-135M; BF16 exported by miaotui, Q4_0 and Q8_0 made with
llama-quantize) and random-weight Llama shapes of ~1B and ~8B (benchmarks/random_gguf.py).
llama.cpp is built on first use (benchmarks/llama_cpp.py). Writes benchmarks/results/vs_llamacpp.
{json,md,png}. Run: `make bench-llamacpp`.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import gguf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.llama_cpp import llama_cpp_bin  # noqa: E402
from benchmarks.random_gguf import SHAPES, write_random_gguf  # noqa: E402
from benchmarks.serving import export_bf16_gguf, median_run  # noqa: E402
from miaotui.eval.bench_serve import bench_serve  # noqa: E402
from miaotui.loaders.model_store import cache_dir, pull  # noqa: E402
from tests.unit.server_process import free_port, running_http_process  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# miaotui's own equivalent of each class (`miaotui quantize`; benchmarks/decode_quality.py)
CLASSES = {"Q4_0": ("rtn", 4, 32), "Q8_0": ("rtn", 8, 32), "BF16": None}
THREADS = 2


def machine() -> dict:
    info = {"cpu": "unknown", "flags": []}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and info["cpu"] == "unknown":
            info["cpu"] = line.split(":", 1)[1].strip()
        elif line.startswith("cpu family"):
            info["family"] = int(line.split(":")[1])
        elif line.startswith("model") and ":" in line and line.split(":")[0].strip() == "model":
            info["model"] = int(line.split(":")[1])
        elif line.startswith("flags") and not info["flags"]:
            have = set(line.split(":", 1)[1].split())
            info["flags"] = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
                             if f in have]
    info["threads"] = THREADS
    return info


def describe_machine(m: dict) -> str:
    """The CPU a result was measured on, for the results' Markdown: model, family/model, flags."""
    return f"{m['cpu']} (family {m.get('family')} model {m.get('model')}; {', '.join(m['flags'])})"


def read_bandwidth_gb_s(gib: int = 1, repeat: int = 7) -> float:
    """GB/s of summing a 1 GiB float32 tensor on THREADS threads (median): what streaming weights
    from memory can reach here."""
    import torch

    torch.set_num_threads(THREADS)
    x = torch.ones(gib * 2**30 // 4)
    x.sum()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / statistics.median(times) / 1e9


def gguf_read_bytes(path: Path) -> int:
    """Bytes of the matrices one decode step reads: every weight matrix, plus the output head (the
    token embedding where the head is tied); one embedding row and the norms are left out."""
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    total = sum(int(t.n_bytes) for name, t in tensors.items() if name.startswith("blk.") and len(t.shape) == 2)
    head = tensors.get("output.weight") or tensors["token_embd.weight"]
    return total + int(head.n_bytes)


# Runs argv[1:] and reports its exit code and peak RSS (wait4). Linux folds the RSS a process has
# when it forks into its child's ru_maxrss, so a child forked from this script (which has held the
# 1 GiB bandwidth probe and imported PyTorch) would report at least this script's size: the command
# is forked from this small, freshly started launcher instead.
_LAUNCHER = ("import os, subprocess, sys\n"
             "p = subprocess.Popen(sys.argv[1:])\n"
             "_, status, usage = os.wait4(p.pid, 0)\n"
             "sys.stderr.write(f'\\nLAUNCHER {os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}\\n')\n")


def peak_rss_mb_of(command: list[str]) -> tuple[str, float]:
    """stdout and the peak RSS (MB) of one command, its own (wait4 in a small launcher)."""
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *command], capture_output=True, text=True)
    out, err = proc.stdout, proc.stderr
    report = next(line for line in reversed(err.splitlines()) if line.startswith("LAUNCHER "))
    code, max_kb = (int(v) for v in report.split()[1:])
    err = err[:err.rfind("LAUNCHER ")]
    if code:
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        raise RuntimeError(f"{Path(command[0]).name} {how}: {err[-2000:].strip()}")
    return out, max_kb / 1024


LLAMA_TESTS = {"pp512": ["-p", "512", "-n", "0"], "tg128": ["-p", "0", "-n", "128"]}


def llama_bench(bin_dir: Path, model: Path, test: str, repeat: int, repack: bool) -> dict:
    """pp512 or tg128 of llama-bench (2 threads; weight repacking on, its default, or off), in a
    process of its own: a default that crashes in one test (repacked prompt GEMMs: SIGILL on some
    CPUs) does not take the other test's default away."""
    command = [str(bin_dir / "llama-bench"), "-m", str(model), "-t", str(THREADS), *LLAMA_TESTS[test],
               "-r", str(repeat), "-o", "json"] + ([] if repack else ["--repack", "0"])
    out, rss = peak_rss_mb_of(command)
    rows = json.loads(out)
    return {test: rows[0]["avg_ts"], "peak_rss_mb": rss, "build": rows[0]["build_commit"]}


def miaotui_bench(model: Path, repeat: int) -> dict:
    # decode timed as llama-bench's tg128: 128 tokens from an (almost) empty context
    command = [sys.executable, "-m", "miaotui.cli", "bench", "-m", str(model), "--prompt-tokens", "512",
               "--gen-tokens", "128", "--decode-prompt-tokens", "1", "--batch", "1", "--repeat", str(repeat),
               "--threads", str(THREADS), "--json"]
    out, rss = peak_rss_mb_of(command)
    result = json.loads(out.strip().splitlines()[-1])
    return result | {"process_peak_rss_mb": rss}


def paired_runs(bin_dir: Path, gguf_file: Path, ours: Path, repeat: int) -> tuple[dict, dict]:
    """llama-bench at its defaults and `miaotui bench`, one run each in turn, `repeat` times (the
    host's load drifts: interleaving gives both the same conditions); medians of the runs. Weight
    repacking is turned off for one of llama.cpp's tests only if its default crashes in that test,
    and the result says so."""
    repack = {test: True for test in LLAMA_TESTS}
    failure: dict[str, str | None] = {test: None for test in LLAMA_TESTS}
    llama_runs: dict[str, list[dict]] = {test: [] for test in LLAMA_TESTS}
    our_runs = []
    for i in range(repeat):
        for name in ("llama", "miaotui") if i % 2 == 0 else ("miaotui", "llama"):
            if name == "miaotui":
                our_runs.append(miaotui_bench(ours, 1))
                continue
            for test in LLAMA_TESTS:
                try:
                    llama_runs[test].append(llama_bench(bin_dir, gguf_file, test, 1, repack[test]))
                except RuntimeError as exc:
                    if not repack[test]:
                        raise
                    failure[test] = str(exc).split(":")[0]
                    print(f"llama-bench {test} on {gguf_file.name} at its defaults failed ({failure[test]}); "
                          "repacking off for that test", flush=True)
                    repack[test] = False
                    llama_runs[test].append(llama_bench(bin_dir, gguf_file, test, 1, False))
    llama: dict = {"build": llama_runs["tg128"][0]["build"],
                   "peak_rss_mb": max(r["peak_rss_mb"] for runs in llama_runs.values() for r in runs)}
    for test in LLAMA_TESTS:
        llama[test] = statistics.median(r[test] for r in llama_runs[test])
        llama[f"{test}_runs"] = [r[test] for r in llama_runs[test]]
        llama[f"{test}_repack"] = repack[test]
        llama[f"{test}_default_failure"] = failure[test]
    ours_result = dict(our_runs[-1])
    for key in ("prefill_tok_s", "decode_tok_s", "decode_gb_s", "itl_p50_ms", "ttft_ms"):
        ours_result[key] = statistics.median(r[key] for r in our_runs)
    ours_result["decode_tok_s_runs"] = [r["decode_tok_s"] for r in our_runs]
    ours_result["prefill_tok_s_runs"] = [r["prefill_tok_s"] for r in our_runs]
    ours_result["process_peak_rss_mb"] = max(r["process_peak_rss_mb"] for r in our_runs)
    return llama, ours_result


def llama_quantize(bin_dir: Path, source: Path, kind: str) -> Path:
    out = source.with_name(source.name.replace("-bf16.gguf", f"-{kind.lower()}.gguf"))
    if not out.exists():
        subprocess.run([str(bin_dir / "llama-quantize"), str(source), str(out) + ".partial", kind, str(THREADS)],
                       check=True, capture_output=True)
        Path(str(out) + ".partial").rename(out)
    return out


def miaotui_quantize(source: Path, method: str, bits: int, group: int, out: Path) -> Path:
    if not (out / "miaotui_model.json").exists():
        subprocess.run([sys.executable, "-m", "miaotui.cli", "quantize", "-m", str(source), "--method", method,
                        "--bits", str(bits), "--group-size", str(group), "--symmetric", "--threads", str(THREADS),
                        "-o", str(out)], check=True, capture_output=True)
    return out


def bf16_gguf(size: str, work: Path) -> Path:
    if size == "135m":
        return Path(export_bf16_gguf(str(pull("smollm2-135m")), work / "smollm2-135m-bf16.gguf"))
    return write_random_gguf(SHAPES[size], pull("smollm2-135m"), work / f"random-{size}-bf16.gguf")


def serve_pair(bin_dir: Path, gguf_file: Path, ours: Path, requests: int, repeat: int) -> dict:
    """One request and 16 at once through llama-server (defaults, 16 slots; weight repacking off only
    if the default crashes) and `miaotui serve`, and each one's time from start to healthy."""
    out = {}
    llama = [str(bin_dir / "llama-server"), "-m", str(gguf_file), "-t", str(THREADS), "-np", "16", "-c", "16384",
             "--host", "127.0.0.1"]
    mine = [sys.executable, "-m", "miaotui.cli", "serve", "-m", str(ours), "--threads", str(THREADS),
            "--served-model-name", "m", "--kv-cache-mb", "1024", "--max-num-seqs", "64"]
    for name, commands in (("llama_server", [llama, llama + ["--no-repack"]]), ("miaotui", [mine])):
        for attempt, command in enumerate(commands):
            port = free_port()
            start = time.perf_counter()
            try:
                with running_http_process(command + ["--port", str(port)], port, name, timeout=600) as (url, _):
                    load_s = time.perf_counter() - start
                    bench_serve(url, [1], 2, 16, 16)  # warm-up
                    out[name] = {"load_s": load_s, "c1": median_run(url, 1, max(4, requests // 4), repeat),
                                 "c16": median_run(url, 16, requests, repeat), "repack": attempt == 0}
                break
            except RuntimeError as exc:  # the server process died (llama-server: SIGILL with repacking here)
                if attempt + 1 == len(commands):
                    raise
                print(f"{name} at its defaults failed ({str(exc).splitlines()[0]}); again with --no-repack",
                      flush=True)
        print(f"serving {gguf_file.name} {name}: load {load_s:.1f} s, 1 request "
              f"{out[name]['c1']['output_tok_s']:.1f} tok/s, 16 at once {out[name]['c16']['output_tok_s']:.1f}",
              flush=True)
    return out


PROFILE_CHILD = r"""
import json, sys, torch
from miaotui import LLM
from miaotui.engine.sampling_params import SamplingParams
torch.set_num_threads(int(sys.argv[2]))
llm = LLM(sys.argv[1])
params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
llm.generate([list(range(100, 164))], params)
from torch.profiler import ProfilerActivity, profile
with profile(activities=[ProfilerActivity.CPU]) as prof:
    llm.generate([list(range(200, 264))], params)
rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
total = sum(e.self_cpu_time_total for e in rows)
print(json.dumps([{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
                   "share": e.self_cpu_time_total / total} for e in rows[:15]]))
"""


def decode_profile(model: Path) -> list[dict]:
    """Where the time of 48 decode steps (after a 64-token prompt) goes: top ops by self CPU time."""
    done = subprocess.run([sys.executable, "-c", PROFILE_CHILD, str(model), str(THREADS)], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="135m,1b",
                        help="comma-separated: 135m, 1b, 8b (8b: 16 GB BF16 file), qwen3-1.7b")
    parser.add_argument("--classes", default="Q4_0,Q8_0,BF16")
    parser.add_argument("--serve-sizes", default="135m", help="sizes also measured through the servers")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each tool, interleaved (medians)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--llama-cpp-bin", default=None, help="directory with llama-bench, llama-server, "
                                                              "llama-quantize (default: build and cache them)")
    parser.add_argument("--work", default=None, help="where the model files go (default: $MIAOTUI_HOME/bench-files)")
    parser.add_argument("--name", default="vs_llamacpp",
                        help="results file stem in benchmarks/results (another name keeps the main table)")
    args = parser.parse_args()
    sizes, classes = args.sizes.split(","), args.classes.split(",")
    for s in sizes:
        if s != "135m" and s not in SHAPES:
            raise SystemExit(f"unknown size {s} (135m, {', '.join(SHAPES)})")
    bin_dir = llama_cpp_bin(args.llama_cpp_bin)
    work = Path(args.work) if args.work else cache_dir() / "bench-files"
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine(), "read_gb_s": read_bandwidth_gb_s(), "rows": [], "name": args.name}
    print(f"machine: {results['machine']}; read bandwidth {results['read_gb_s']:.1f} GB/s", flush=True)
    for size in sizes:
        source = bf16_gguf(size, work)
        for cls in classes:
            gguf_file = source if cls == "BF16" else llama_quantize(bin_dir, source, cls)
            ours = gguf_file  # the same file, in its own bits
            row = {"size": size, "class": cls, "gguf": gguf_file.name, "miaotui_model": ours.name,
                   "llama_read_bytes": gguf_read_bytes(gguf_file)}
            row["llama"], row["miaotui"] = paired_runs(bin_dir, gguf_file, ours, args.repeat)
            row["llama_gb_s"] = row["llama_read_bytes"] * row["llama"]["tg128"] / 1e9
            row["miaotui_gb_s"] = row["miaotui"]["decode_gb_s"]
            row["tg_ratio"] = row["miaotui"]["decode_tok_s"] / row["llama"]["tg128"]
            row["pp_ratio"] = row["miaotui"]["prefill_tok_s"] / row["llama"]["pp512"]
            if size in args.serve_sizes.split(","):
                row["serving"] = serve_pair(bin_dir, gguf_file, ours, args.requests, min(args.repeat, 3))
            if row["tg_ratio"] < 1.0 and size == "135m":
                row["miaotui_decode_profile"] = decode_profile(ours)
            results["rows"].append(row)
            print(f"{size} {cls}: tg128 llama.cpp {row['llama']['tg128']:.1f} vs miaotui "
                  f"{row['miaotui']['decode_tok_s']:.1f} ({row['tg_ratio']:.2f}x); pp512 {row['llama']['pp512']:.0f} "
                  f"vs {row['miaotui']['prefill_tok_s']:.0f} ({row['pp_ratio']:.2f}x); GB/s "
                  f"{row['llama_gb_s']:.1f} vs {row['miaotui_gb_s']:.1f}", flush=True)
            write_results(results)
    # The bandwidth a decode can reach: the best of a measurement at the start and one at the end
    # (the host is shared; one reading taken in a busy moment would understate it).
    results["read_gb_s_runs"] = [results["read_gb_s"], read_bandwidth_gb_s()]
    results["read_gb_s"] = max(results["read_gb_s_runs"])
    write_results(results)


def write_results(results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = results.get("name", "vs_llamacpp")
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2))
    m, bw = results["machine"], results["read_gb_s"]
    lines = [f"{describe_machine(m)}, {m['threads']} threads; read bandwidth {bw:.1f} GB/s. "
             f"llama.cpp {results['rows'][0]['llama']['build']} "
             f"at its defaults.", "",
             "| model | class | llama.cpp tg128 | miaotui tg128 | ratio | GB/s llama.cpp / miaotui (% of read bw) "
             "| llama.cpp pp512 | miaotui pp512 | ratio | peak RSS MB llama.cpp / miaotui |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|---|"]
    def fallback(llama: dict, test: str) -> str:
        if llama[f"{test}_repack"]:
            return ""
        return f" (repack off: at the default, {llama[f'{test}_default_failure'] or 'it failed'})"

    for r in results["rows"]:
        lines.append(
            f"| {r['size']} | {r['class']} | {r['llama']['tg128']:.1f}{fallback(r['llama'], 'tg128')} | "
            f"{r['miaotui']['decode_tok_s']:.1f} | "
            f"{r['tg_ratio']:.2f}× | {r['llama_gb_s']:.1f} ({r['llama_gb_s'] / bw:.0%}) / {r['miaotui_gb_s']:.1f} "
            f"({r['miaotui_gb_s'] / bw:.0%}) | {r['llama']['pp512']:.0f}{fallback(r['llama'], 'pp512')} | "
            f"{r['miaotui']['prefill_tok_s']:.0f} | "
            f"{r['pp_ratio']:.2f}× | {r['llama']['peak_rss_mb']:.0f} / {r['miaotui']['process_peak_rss_mb']:.0f} |")
    by_class = {(r["size"], r["class"]): r["miaotui"]["decode_tok_s"] for r in results["rows"]}
    pairs = [(size, by_class[size, "Q8_0"] / by_class[size, "BF16"]) for size, cls in by_class
             if cls == "Q8_0" and (size, "BF16") in by_class]
    if pairs:
        lines += ["", "miaotui's int8 (Q8_0 class) against its bf16 batch-1 decode, same model: "
                  + ", ".join(f"{size} {ratio:.2f}×" for size, ratio in pairs) + "."]
    served = [r for r in results["rows"] if "serving" in r]
    if served:
        lines += ["", "| model | class | load s llama-server / miaotui | 1 request tok/s | ratio | 16 at once tok/s "
                  "| ratio |", "|---|---|---|---|---:|---|---:|"]
        for r in served:
            s = r["serving"]
            repack = "" if s["llama_server"].get("repack", True) else " (repack off: the default crashed)"
            a1, b1 = s["llama_server"]["c1"]["output_tok_s"], s["miaotui"]["c1"]["output_tok_s"]
            a16, b16 = s["llama_server"]["c16"]["output_tok_s"], s["miaotui"]["c16"]["output_tok_s"]
            lines.append(f"| {r['size']} | {r['class']}{repack} | {s['llama_server']['load_s']:.1f} / "
                         f"{s['miaotui']['load_s']:.1f} | {a1:.1f} / {b1:.1f} | {b1 / a1:.2f}× | {a16:.1f} / "
                         f"{b16:.1f} | {b16 / a16:.2f}× |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    plot(results)


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    labels = [f"{r['size']} {r['class']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, ours, theirs, title in ((axes[0], [r["miaotui"]["decode_tok_s"] for r in rows],
                                     [r["llama"]["tg128"] for r in rows], "decode, batch 1 (tg128)"),
                                    (axes[1], [r["miaotui"]["prefill_tok_s"] for r in rows],
                                     [r["llama"]["pp512"] for r in rows], "prefill (pp512)")):
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], theirs, 0.4, label="llama.cpp (defaults)")
        ax.bar([i + 0.2 for i in x], ours, 0.4, label="miaotui")
        ax.set_xticks(list(x), labels, rotation=30, ha="right")
        ax.set_ylabel("tok/s")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend()
    m = results["machine"]
    fig.suptitle(f"{m['cpu']} ({', '.join(m['flags'])}), {m['threads']} threads")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{results.get('name', 'vs_llamacpp')}.png", dpi=120)


if __name__ == "__main__":
    main()
