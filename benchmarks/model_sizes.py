"""Real model sizes: the GGUF quants people download, run in their own bits. For each file, in fresh
processes on THREADS threads:

- load: `miaotui info` (load time: reading, converting and laying out the weights; peak RSS of the
  whole process) against llama.cpp's whole `llama-bench -p 16 -n 4` run (its defaults; weight
  repacking off only where the default crashes, as said in the row), warm page cache;
- what is held: miaotui's weight bytes in memory against the file's tensor bytes;
- decode (1B, 8B): `miaotui bench` tg32 from an empty context against llama-bench tg32, alternating
  run by run (medians), and the GB/s each reaches (weight bytes a step reads x tok/s) against the
  read bandwidth measured here;
- a Hugging Face bf16 directory of the 8B shape (sharded safetensors): `miaotui info` (load time,
  peak RSS), then `quantize --method rtn --bits 4`, `quantize --method gptq --bits 4 --group-size 128
  --calib-samples 16` and `export-gguf --type q4_0` (each one's wall time and peak RSS; they stream
  one decoder layer at a time), and the exported file run by llama-bench;
- the same answers (the real SmolLM2-135M re-quantized by llama-quantize to Q4_K_M, Q5_K_M, Q6_K,
  Q8_0): WikiText-2 perplexity through the engine's decode steps (bf16, the few-row kernels) against
  the same weights dequantized to float32 (one pass), and greedy 32 tokens on 3 prompts with float32
  activations against the float path.

Files: the 135M bf16 GGUF export and random-weight Llama shapes (benchmarks/random_gguf.py: 1B and
8B, whose BF16 file takes 15 GB of disk), quantized by llama.cpp's llama-quantize (built from
the llama-cpp-python sdist on first use, benchmarks/llama_cpp.py). Writes
benchmarks/results/model_sizes.{json,md,png}. Run: `make bench-sizes`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import gguf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.llama_cpp import llama_cpp_bin  # noqa: E402
from benchmarks.random_gguf import SHAPES, write_random_hf_dir  # noqa: E402
from benchmarks.vs_llamacpp import (  # noqa: E402
    _LAUNCHER,
    THREADS,
    bf16_gguf,
    describe_machine,
    gguf_read_bytes,
    llama_quantize,
    machine,
    peak_rss_mb_of,
    read_bandwidth_gb_s,
)
from miaotui.loaders.model_store import cache_dir, pull  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]
QUALITY_TYPES = ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
MB = 1e6


def file_tensor_bytes(path: Path) -> int:
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)


def miaotui_load(model: Path, repeat: int) -> dict:
    """Fresh `miaotui info` processes: load seconds (median), the process's peak RSS (max), weights held."""
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        out, rss = peak_rss_mb_of([sys.executable, "-m", "miaotui.cli", "info", "-m", str(model), "--threads",
                                   str(THREADS), "--json"])
        info = json.loads(out)
        runs.append({"load_s": info["load_seconds"], "process_s": time.perf_counter() - start, "peak_rss_mb": rss,
                     "weight_bytes": info["weight_bytes"]})
    return {"load_s": statistics.median(r["load_s"] for r in runs),
            "process_s": statistics.median(r["process_s"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "weight_bytes": runs[0]["weight_bytes"], "runs": runs}


def llama_bench_run(bin_dir: Path, model: Path, prompt: int, gen: int, repeat: int) -> dict:
    """One llama-bench process (defaults; repacking off only if the default crashes): its wall time,
    peak RSS and tok/s."""
    failure = None
    for repack in (True, False):
        command = [str(bin_dir / "llama-bench"), "-m", str(model), "-t", str(THREADS), "-p", str(prompt), "-n",
                   str(gen), "-r", str(repeat), "-o", "json"] + ([] if repack else ["--repack", "0"])
        start = time.perf_counter()
        try:
            out, rss = peak_rss_mb_of(command)
        except RuntimeError as exc:
            failure = str(exc).split(":")[0]
            continue
        rows = json.loads(out)
        tg = next((r["avg_ts"] for r in rows if r["n_gen"] == gen and r["n_prompt"] == 0), None)
        return {"wall_s": time.perf_counter() - start, "peak_rss_mb": rss, "tg": tg, "repack": repack,
                "default_failure": failure, "build": rows[0]["build_commit"]}
    raise RuntimeError(f"llama-bench failed on {model.name}: {failure}")


def miaotui_decode(model: Path, gen: int) -> dict:
    out, rss = peak_rss_mb_of([sys.executable, "-m", "miaotui.cli", "bench", "-m", str(model), "--prompt-tokens",
                               "16", "--gen-tokens", str(gen), "--decode-prompt-tokens", "1", "--batch", "1",
                               "--repeat", "1", "--threads", str(THREADS), "--json"])
    return json.loads(out.strip().splitlines()[-1]) | {"process_peak_rss_mb": rss}


def size_row(bin_dir: Path, size: str, kind: str, source: Path, repeat: int, gen: int) -> dict:
    path = llama_quantize(bin_dir, source, kind)
    file_mb = path.stat().st_size / MB
    row = {"size": size, "type": kind, "file": path.name, "file_mb": file_mb,
           "tensor_bytes": file_tensor_bytes(path), "read_bytes": gguf_read_bytes(path)}
    print(f"{size} {kind}: {file_mb:,.0f} MB; loading ...", flush=True)
    row["miaotui_load"] = miaotui_load(path, repeat)
    row["llama_load"] = llama_bench_run(bin_dir, path, 16, 4, 1)  # the issue's reference: load + pp16 + tg4
    ours, theirs = [], []
    for _ in range(repeat):  # alternating, run by run
        theirs.append(llama_bench_run(bin_dir, path, 0, gen, 1))
        ours.append(miaotui_decode(path, gen))
    row["llama_tg"] = statistics.median(r["tg"] for r in theirs)
    row["llama_repack"] = theirs[0]["repack"]
    row["llama_default_failure"] = theirs[0]["default_failure"]
    row["miaotui_tg"] = statistics.median(r["decode_tok_s"] for r in ours)
    row["miaotui_read_bytes"] = ours[0]["decode_read_bytes"]
    row["miaotui_bench_peak_rss_mb"] = max(r["process_peak_rss_mb"] for r in ours)
    row["kernels"] = ours[0]["kernels"]
    row["tg_ratio"] = row["miaotui_tg"] / row["llama_tg"]
    row["miaotui_gb_s"] = row["miaotui_read_bytes"] * row["miaotui_tg"] / 1e9
    row["llama_gb_s"] = row["read_bytes"] * row["llama_tg"] / 1e9
    row["rss_target_mb"] = 1.3 * file_mb + (400 if size == "1b" else 1000)
    load = row["miaotui_load"]
    print(f"{size} {kind}: load {load['load_s']:.2f} s (process {load['process_s']:.1f} s), peak RSS "
          f"{load['peak_rss_mb']:,.0f} MB (target {row['rss_target_mb']:,.0f}); llama-bench run "
          f"{row['llama_load']['wall_s']:.1f} s, {row['llama_load']['peak_rss_mb']:,.0f} MB; tg{gen} "
          f"{row['miaotui_tg']:.1f} vs {row['llama_tg']:.1f} ({row['tg_ratio']:.2f}x)", flush=True)
    return row


def timed_job(command: list[str], log: Path) -> dict:
    """One command's wall time and peak RSS (MB); its progress bars go to `log` (tail -f it)."""
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *command], stdout=subprocess.PIPE, stderr=err,
                              text=True)
    report = next(line for line in reversed(log.read_text().splitlines()) if line.startswith("LAUNCHER "))
    code, max_kb = (int(v) for v in report.split()[1:])
    if code:
        raise RuntimeError(f"{' '.join(command[3:5])} failed ({code}): see {log}")
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": max_kb / 1024, "stdout": proc.stdout[-2000:]}


HF_JOBS = {  # name: (miaotui arguments besides model, threads and output; the output's name)
    "quantize rtn int4 g128": (["quantize", "--method", "rtn", "--bits", "4", "--group-size", "128"], "rtn4"),
    "quantize gptq int4 g128 (16 x 512 tokens)": (["quantize", "--method", "gptq", "--bits", "4", "--group-size",
                                                   "128", "--calib-samples", "16", "--calib-seq-len", "512"], "gptq4"),
    "export-gguf q4_0": (["export-gguf", "--type", "q4_0"], "export-q4_0.gguf"),
}


def hf_section(bin_dir: Path, size: str, work: Path, jobs: list[str], results: dict) -> dict:
    """The bf16 Hugging Face directory of `size`: load, then each compression / export job streamed;
    results are written after each job (a job not run keeps its last result, same machine)."""
    directory = write_random_hf_dir(SHAPES[size], pull("smollm2-135m"), work / f"random-{size}-hf")
    size_bytes = sum(f.stat().st_size for f in directory.iterdir())
    last = results.get("hf") if (results.get("hf") or {}).get("size") == size else {}
    out = results["hf"] = {"size": size, "dir_bytes": size_bytes, "load_rss_target_mb": (1.2 * size_bytes + 1e9) / MB,
                           "job_rss_target_mb": (size_bytes + 2e9) / MB,
                           "jobs": {k: v for k, v in (last.get("jobs") or {}).items() if k not in jobs}}
    if "exported_in_llama_cpp" in last and "export-gguf q4_0" not in jobs:
        out["exported_in_llama_cpp"] = last["exported_in_llama_cpp"]
    print(f"{size} HF bf16 directory: {size_bytes / 1e9:.1f} GB; loading ...", flush=True)
    out["load"] = miaotui_load(directory, 1)
    write_results(results)
    for name in jobs:
        args, output = HF_JOBS[name]
        target = work / f"random-{size}-hf-{output}"
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        log = work / f"{target.name}.log"
        print(f"{name}: running (progress: tail -f {log}) ...", flush=True)
        job = timed_job([sys.executable, "-m", "miaotui.cli", *args, "-m", str(directory), "--threads", str(THREADS),
                         "-o", str(target)], log)
        out["jobs"][name] = job
        print(f"{name}: {job['seconds']:.0f} s, peak RSS {job['peak_rss_mb']:,.0f} MB "
              f"(target {out['job_rss_target_mb']:,.0f})", flush=True)
        if args[0] == "export-gguf":
            out["exported_in_llama_cpp"] = llama_bench_run(bin_dir, target, 0, 16, 1)
            print(f"exported file in llama-bench: tg16 {out['exported_in_llama_cpp']['tg']:.2f} tok/s", flush=True)
        write_results(results)
    return out


def quality_row(bin_dir: Path, source: Path, kind: str, windows: int) -> dict:
    """In this process: weights held, decode-path perplexity against the float path, greedy equality."""
    import torch

    from miaotui import LLM, SamplingParams
    from miaotui.data import WIKITEXT2_TEST, read_text
    from miaotui.eval.perplexity import decode_perplexity, perplexity

    path = llama_quantize(bin_dir, source, kind)
    types = sorted({t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors if len(t.shape) == 2})
    reference = LLM(str(path), dtype="float32", gguf_weights="float", decode_weight_dtype="none")
    ids = reference.tokenizer.encode(read_text(WIKITEXT2_TEST))[:windows * 512]
    float_ppl = perplexity(reference.model, ids, ctx=512, score_from=256, progress=False).ppl
    greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in reference.generate(PROMPTS, greedy)]
    del reference
    native32 = LLM(str(path), dtype="float32", gguf_weights="native", decode_weight_dtype="none")
    got = [o.outputs[0].token_ids for o in native32.generate(PROMPTS, greedy)]
    del native32
    served = LLM(str(path))  # as `miaotui run` loads it
    decode_ppl = decode_perplexity(served.model, ids, ctx=512, progress=False).ppl
    row = {"type": kind, "file": path.name, "matrix_types": types, "tensor_bytes": file_tensor_bytes(path),
           "weight_bytes": served.model.weight_bytes(), "float_ppl": float_ppl, "decode_ppl": decode_ppl,
           "ppl_change": decode_ppl / float_ppl - 1, "greedy_equal": [a == b for a, b in zip(got, want, strict=True)],
           "dtype": str(served.dtype).removeprefix("torch.")}
    del served
    torch.set_num_threads(THREADS)
    print(f"135m {kind}: weights {row['weight_bytes'] / MB:.1f} MB for {row['tensor_bytes'] / MB:.1f} MB of tensors; "
          f"ppl {float_ppl:.3f} -> {decode_ppl:.3f} ({row['ppl_change']:+.2%}); greedy equal "
          f"{sum(row['greedy_equal'])}/{len(PROMPTS)}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", default="1b:Q4_0,8b:Q4_0,8b:Q4_K_M",
                        help="random-weight shape:llama-quantize type, comma-separated ('' skips; 8b: a 15 GB "
                             "BF16 file is written first)")
    parser.add_argument("--quality-types", default=",".join(QUALITY_TYPES), help="135M re-quantizations ('' skips)")
    parser.add_argument("--hf", default="8b", help="random-weight shape of the bf16 Hugging Face directory section "
                        "('' skips; 8b: a 15 GB directory is written first)")
    parser.add_argument("--hf-jobs", default=",".join(HF_JOBS), help="which of its jobs run (comma-separated)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--gen", type=int, default=32, help="decoded tokens per run")
    parser.add_argument("--windows", type=int, default=8, help="512-token windows for the perplexity")
    parser.add_argument("--llama-cpp-bin", default=None)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(THREADS)
    bin_dir = llama_cpp_bin(args.llama_cpp_bin)
    work = cache_dir() / "bench-files"
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine(), "read_gb_s": read_bandwidth_gb_s(), "sizes": [], "quality": []}
    print(f"machine: {results['machine']}; read bandwidth {results['read_gb_s']:.1f} GB/s", flush=True)
    previous = RESULTS / "model_sizes.json"
    if previous.exists():  # a section this run skips keeps its last results (same machine only)
        last = json.loads(previous.read_text())
        if last.get("machine") == results["machine"]:
            wanted = set(args.files.split(","))
            results["sizes"] = [r for r in last.get("sizes", []) if f"{r['size']}:{r['type']}" not in wanted]
            redo = set(args.quality_types.split(","))
            results["quality"] = [r for r in last.get("quality", []) if r["type"] not in redo]
            if "hf" in last:
                results["hf"] = last["hf"]
    ran_sizes, ran_quality = bool(args.files), bool(args.quality_types)
    for spec in [s for s in args.files.split(",") if s and ran_sizes]:
        size, _, kind = spec.partition(":")
        results["sizes"].append(size_row(bin_dir, size, kind, bf16_gguf(size, work), args.repeat, args.gen))
        results["sizes"].sort(key=lambda r: (r["size"], r["type"]))
        write_results(results)
    if args.hf:
        hf_section(bin_dir, args.hf, work, [j for j in args.hf_jobs.split(",") if j], results)
    source = bf16_gguf("135m", work)
    for kind in [k for k in args.quality_types.split(",") if k and ran_quality]:
        results["quality"].append(quality_row(bin_dir, source, kind, args.windows))
        results["quality"].sort(key=lambda r: QUALITY_TYPES.index(r["type"]) if r["type"] in QUALITY_TYPES else 99)
        write_results(results)
    results["read_gb_s"] = max(results["read_gb_s"], read_bandwidth_gb_s())  # best of start and end (shared host)
    write_results(results)


def write_results(results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "model_sizes.json").write_text(json.dumps(results, indent=2))
    m, bw = results["machine"], results["read_gb_s"]
    lines = [f"{describe_machine(m)}, {m['threads']} threads; read bandwidth {bw:.1f} GB/s; warm page cache, "
             "fresh processes.", ""]
    if results["sizes"]:
        lines += ["| model | file MB | miaotui load s (process s) | miaotui peak RSS MB (target) | weights held MB "
                  "| llama-bench run s / peak RSS MB | tg llama.cpp | tg miaotui | ratio | GB/s llama.cpp / miaotui |",
                  "|---|---:|---|---|---:|---|---:|---:|---:|---|"]
        for r in results["sizes"]:
            load, ref = r["miaotui_load"], r["llama_load"]
            repack = "" if r["llama_repack"] else f" (repack off: the default crashed, {r['llama_default_failure']})"
            lines.append(
                f"| {r['size']} {r['type']} | {r['file_mb']:,.0f} | {load['load_s']:.2f} ({load['process_s']:.1f}) | "
                f"{load['peak_rss_mb']:,.0f} ({r['rss_target_mb']:,.0f}) | {load['weight_bytes'] / MB:,.0f} | "
                f"{ref['wall_s']:.1f} / {ref['peak_rss_mb']:,.0f} | {r['llama_tg']:.1f}{repack} | "
                f"{r['miaotui_tg']:.1f} | {r['tg_ratio']:.2f}× | {r['llama_gb_s']:.1f} ({r['llama_gb_s'] / bw:.0%}) / "
                f"{r['miaotui_gb_s']:.1f} ({r['miaotui_gb_s'] / bw:.0%}) |")
    if results.get("hf"):
        h = results["hf"]
        load = h["load"]
        lines += ["", f"{h['size']} bf16 Hugging Face directory ({h['dir_bytes'] / 1e9:.1f} GB, sharded safetensors): "
                  f"load {load['load_s']:.1f} s, peak RSS {load['peak_rss_mb']:,.0f} MB (target "
                  f"{h['load_rss_target_mb']:,.0f}).", "",
                  "| job (streamed, one decoder layer at a time) | wall time | peak RSS MB (target) |",
                  "|---|---:|---:|"]
        for name, job in h["jobs"].items():
            lines.append(f"| {name} | {job['seconds'] / 60:.1f} min | {job['peak_rss_mb']:,.0f} "
                         f"({h['job_rss_target_mb']:,.0f}) |")
        if h.get("exported_in_llama_cpp"):
            ref = h["exported_in_llama_cpp"]
            repack = "" if ref["repack"] else f" (repack off: the default crashed, {ref['default_failure']})"
            lines += ["", f"The exported Q4_0 file in llama.cpp ({ref['build']}): llama-bench tg16 {ref['tg']:.2f} "
                      f"tok/s{repack}."]
    if results["quality"]:
        lines += ["", "| SmolLM2-135M | matrix types | tensor MB in file | weights held MB | float path PPL "
                  "| decode path PPL | change | greedy 32 = float path |", "|---|---|---:|---:|---:|---:|---:|---|"]
        for r in results["quality"]:
            lines.append(f"| {r['type']} | {', '.join(r['matrix_types'])} | {r['tensor_bytes'] / MB:.1f} | "
                         f"{r['weight_bytes'] / MB:.1f} | {r['float_ppl']:.3f} | {r['decode_ppl']:.3f} "
                         f"({r['dtype']}) | {r['ppl_change']:+.2%} | "
                         f"{sum(r['greedy_equal'])}/{len(r['greedy_equal'])} |")
    (RESULTS / "model_sizes.md").write_text("\n".join(lines) + "\n")
    plot(results)


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["sizes"]
    if not rows:
        return
    labels = [f"{r['size']} {r['type']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    x = range(len(rows))
    axes[0].bar([i - 0.2 for i in x], [r["llama_load"]["peak_rss_mb"] for r in rows], 0.4, label="llama-bench run")
    axes[0].bar([i + 0.2 for i in x], [r["miaotui_load"]["peak_rss_mb"] for r in rows], 0.4, label="miaotui load")
    axes[0].set_title("peak RSS (MB)")
    axes[1].bar([i - 0.2 for i in x], [r["llama_tg"] for r in rows], 0.4, label="llama.cpp")
    axes[1].bar([i + 0.2 for i in x], [r["miaotui_tg"] for r in rows], 0.4, label="miaotui")
    axes[1].set_title("batch-1 decode (tok/s)")
    for ax in axes:
        ax.set_xticks(list(x), labels)
        ax.legend()
    fig.suptitle(f"{results['machine']['cpu']}, {THREADS} threads: the same GGUF files")
    fig.tight_layout()
    fig.savefig(RESULTS / "model_sizes.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
