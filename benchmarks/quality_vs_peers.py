"""Quality against peers, side by side on one model, one reference, one text (`make bench-quality`).

The reference is the default model (SmolLM2-135M) dequantized to float32. Every method compresses it
and is scored on the first 40 x 512 tokens of the bundled WikiText-2 test text; calibration text is
the same file after those tokens (64 windows of 512 for importance matrices, --calib-samples for the
GPTQ-family methods, the same windows for every tool):

- llama.cpp: `llama-imatrix`, then `llama-quantize --imatrix` to Q4_0, Q4_K_M, IQ4_XS, Q3_K_M.
- miaotui: `export-gguf --imatrix` and `export-gguf --gptq` (GPTQ onto the GGUF grids) to Q4_0, Q4_K_M
  and Q3_K_M, its own GPTQ (int4 g128), AWQ+GPTQ (int4 g32, exported as Q4_0) and SmoothQuant W8A8.
- llm-compressor (its own venv; it pins older transformers): GPTQ W4A16 (its default group 128, or
  the largest group that divides every row where 128 does not) and SmoothQuant + GPTQ W8A8.

Each row: bits per weight counted from the file(s), perplexity and KL divergence from the reference
in llama.cpp's protocol (second half of each 512-window; GGUF files scored by `llama-perplexity
--kl-divergence` itself) and in the full-window protocol (miaotui's scorer), top-1 agreement, and
the wall time the method took. Writes benchmarks/results/quality_vs_peers.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.llama_cpp import llama_cpp_bin  # noqa: E402
from miaotui.compress.calibration import load_calibration  # noqa: E402
from miaotui.data import EVALUATED_TOKENS, WIKITEXT2_TEST, read_text  # noqa: E402
from miaotui.eval.perplexity import fidelity, reference_log_probs  # noqa: E402
from miaotui.loaders.load import load_model  # noqa: E402
from miaotui.loaders.model_store import cache_dir  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
MIAOTUI = [sys.executable, "-m", "miaotui.cli"]
LLMC_VENV = cache_dir() / "llmcompressor-venv"
LLMC_PIN = ["llmcompressor==0.14.0.1", "torch==2.13.0"]


def cpu_name() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    wanted = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    return f"{model} ({', '.join(wanted)})"


def run(command: list[str], log: Path, **kwargs) -> float:
    """Run a command, its output to `log`; -> wall seconds. Raises with the log's tail on failure."""
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, **kwargs)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"{' '.join(map(str, command[:3]))} failed ({done.returncode}):\n" + "\n".join(tail))
    return seconds


def run_llama(command: list[str], log: Path) -> tuple[float, bool]:
    """A llama.cpp tool at its defaults (weight repacking on); off only where the default crashes."""
    try:
        return run(command, log), True
    except RuntimeError as exc:
        print(f"  {Path(command[0]).name} failed with its defaults, again with --no-repack ({str(exc)[:80]})",
              flush=True)
        return run(command + ["--no-repack"], log), False


def gguf_bpw(path: Path) -> float:
    import gguf

    reader = gguf.GGUFReader(path)
    return sum(int(t.n_bytes) for t in reader.tensors) * 8 / sum(int(t.n_elements) for t in reader.tensors)


def dir_bpw(path: Path, params: int) -> float:
    """Bytes of the safetensors tensor data (headers excluded) per weight of the float model."""
    total = 0
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as handle:
            header = int.from_bytes(handle.read(8), "little")
        total += f.stat().st_size - 8 - header
    return total * 8 / params


def calibration_text(work: Path, tokenizer) -> Path:
    """The bundled text from the first calibration token on (after the evaluated ones), as bytes:
    llama-imatrix reads the same tokens the other tools calibrate on."""
    raw = read_text(WIKITEXT2_TEST)
    encoding = tokenizer.backend.encode(raw, add_special_tokens=False)
    start = encoding.offsets[EVALUATED_TOKENS][0]
    path = work / "calibration.txt"
    path.write_bytes(raw[start:].encode("utf-8"))
    return path


def llama_scores(tools: Path, gguf_file: Path, base: Path, text: Path, log: Path) -> dict:
    """llama-perplexity's own PPL and KLD (second halves of 40 x 512) against the base logits file."""
    command = [str(tools / "llama-perplexity"), "-m", str(gguf_file), "-f", str(text), "-c", "512", "--chunks", "40",
               "-t", "2", "--kl-divergence-base", str(base), "--kl-divergence"]
    run_llama(command, log)
    out = log.read_text(errors="replace")
    ppl = re.search(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", out)
    kld = re.search(r"Mean\s+KLD:\s*(-?[0-9.]+)", out)
    same = re.search(r"Same top p:\s*([0-9.]+)", out)
    if ppl is None or kld is None:
        raise RuntimeError(f"llama-perplexity printed no PPL/KLD; see {log}")
    return {"llama_ppl_half": float(ppl[1]), "llama_kl_half": float(kld[1]),
            "llama_top1_agree": float(same[1]) / 100 if same else None}


def ensure_llmcompressor() -> Path:
    python = LLMC_VENV / "bin" / "python"
    if not (LLMC_VENV / ".installed").is_file():
        print(f"llm-compressor: installing into {LLMC_VENV} (its own venv: it pins transformers)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LLMC_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *LLMC_PIN], check=True)
        (LLMC_VENV / ".installed").touch()
    return python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-samples", type=int, default=32, help="GPTQ-family calibration windows of 512")
    parser.add_argument("--imatrix-chunks", type=int, default=64, help="importance-matrix windows of 512")
    parser.add_argument("--skip-llmcompressor", action="store_true")
    parser.add_argument("--llama-cpp-bin", default=None)
    parser.add_argument("--work", default=str(cache_dir() / "quality-bench"))
    parser.add_argument("--only", default=None, help="comma-separated row names to (re)run; others are kept")
    args = parser.parse_args()
    torch.set_num_threads(2)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tools = llama_cpp_bin(args.llama_cpp_bin)
    out_json = RESULTS / "quality_vs_peers.json"
    previous = {r["name"]: r for r in json.loads(out_json.read_text())["rows"]} if out_json.is_file() else {}
    only = set(args.only.split(",")) if args.only else None

    # the reference: the default model dequantized to float32, as a GGUF file and a Hugging Face directory
    f32_gguf, f32_dir = work / "reference-f32.gguf", work / "reference-f32"
    if not f32_gguf.is_file():
        run(MIAOTUI + ["export-gguf", "-m", "smollm2-135m", "--type", "f32", "-o", str(f32_gguf)], work / "ref.log")
    if not (f32_dir / "config.json").is_file():
        run(MIAOTUI + ["export", "-m", "smollm2-135m", "--dtype", "float32", "-o", str(f32_dir)], work / "ref2.log")
    reference_model = load_model(f32_dir, torch.float32).model
    tokenizer = load_model(f32_gguf, torch.float32).tokenizer
    params = sum(p.numel() for p in reference_model.parameters())
    ids = tokenizer.encode(read_text(WIKITEXT2_TEST), add_special_tokens=False)[:EVALUATED_TOKENS]
    reference = reference_log_probs(reference_model, ids, 512)  # [511, V] float16 per window, kept for every row
    del reference_model
    calib_txt = calibration_text(work, tokenizer)
    calib = load_calibration(None, tokenizer, args.calib_samples, 512)
    calib_json = work / f"calibration-{args.calib_samples}.json"
    calib_json.write_text(json.dumps(calib.tokens.tolist()))
    kld_base = work / "reference.kld"
    if not kld_base.is_file():
        run_llama([str(tools / "llama-perplexity"), "-m", str(f32_gguf), "-f", str(WIKITEXT2_TEST), "-c", "512",
                   "--chunks", "40", "-t", "2", "--kl-divergence-base", str(kld_base)], work / "kld-base.log")

    rows: list[dict] = []

    def wanted(name: str) -> bool:
        return only is None or name in only

    def keep_previous(name: str) -> bool:
        """True where the row is not to be (re)run now: its earlier result, if any, is kept."""
        if wanted(name):
            return False
        if name in previous:
            rows.append(previous[name])
        return True

    def score(name: str, tool: str, artifact: Path, seconds: float, note: str = "") -> None:
        print(f"scoring {name}", flush=True)
        is_gguf = artifact.suffix == ".gguf"
        model = load_model(artifact, torch.float32).model
        fid = fidelity(model, reference, ids, 512, progress=False)
        row = {"name": name, "tool": tool, "file": artifact.name, "seconds": round(seconds, 1), "note": note,
               "bpw": gguf_bpw(artifact) if is_gguf else dir_bpw(artifact, params),
               "bytes": artifact.stat().st_size if is_gguf else sum(f.stat().st_size for f in artifact.iterdir()),
               **{k: v for k, v in fid.to_dict().items()}}
        if is_gguf:
            row |= llama_scores(tools, artifact, kld_base, WIKITEXT2_TEST, work / f"{artifact.stem}.kld.log")
        rows.append(row)
        print(f"  {name}: {row['bpw']:.2f} bpw, ppl half {row['ppl_half']:.3f} full {row['ppl_full']:.3f}, "
              f"KL {row['kl_half']:.4f}, {seconds:.0f} s", flush=True)
        write(rows, work)

    # float32 reference rows (the baselines every delta is against)
    if not keep_previous("float32"):
        score("float32", "reference", f32_gguf, 0.0)

    # llama.cpp: importance matrix, then llama-quantize
    imatrix = work / "imatrix.gguf"
    imatrix_seconds = 0.0
    if any(wanted(f"llama.cpp {t}") for t in ("Q4_0", "Q4_K_M", "IQ4_XS", "Q3_K_M")):
        imatrix_seconds, _ = run_llama([str(tools / "llama-imatrix"), "-m", str(f32_gguf), "-f", str(calib_txt),
                                        "-o", str(imatrix), "--chunks", str(args.imatrix_chunks), "-c", "512",
                                        "-t", "2"], work / "imatrix.log")
    for qtype in ("Q4_0", "Q4_K_M", "IQ4_XS", "Q3_K_M"):
        name = f"llama.cpp {qtype}"
        if keep_previous(name):
            continue
        out = work / f"llama-{qtype.lower()}.gguf"
        seconds = run([str(tools / "llama-quantize"), "--imatrix", str(imatrix), str(f32_gguf), str(out), qtype, "2"],
                      work / f"quantize-{qtype}.log")
        score(name, "llama.cpp", out, seconds + imatrix_seconds, "imatrix 64 x 512")

    # miaotui: the same GGUF types with its importance matrix
    for type_name in ("q4_0", "q4_k_m", "q3_k_m"):
        for how in ("imatrix", "gptq"):  # importance-weighted blocks, or GPTQ onto the same grids
            name = f"miaotui {type_name.upper()} {how}"
            if keep_previous(name):
                continue
            out = work / f"miaotui-{type_name}-{how}.gguf"
            seconds = run(MIAOTUI + ["export-gguf", "-m", str(f32_dir), "--type", type_name, f"--{how}",
                                     "--calib-samples", str(args.imatrix_chunks), "-o", str(out)],
                          work / f"{out.stem}.log")
            score(name, "miaotui", out, seconds, f"calibration {args.imatrix_chunks} x 512")

    # miaotui's own methods
    n = str(args.calib_samples)
    methods = {"miaotui GPTQ int4 g128": ["--method", "gptq", "--bits", "4", "--group-size", "128", "--symmetric"],
               "miaotui GPTQ int4 g64": ["--method", "gptq", "--bits", "4", "--group-size", "64", "--symmetric"],
               "miaotui AWQ+GPTQ int4 g32": ["--method", "awq-gptq", "--bits", "4", "--group-size", "32",
                                            "--symmetric"],
               "miaotui SmoothQuant W8A8": ["--method", "smoothquant", "--alpha-search"],
               "miaotui SmoothQuant+GPTQ W8A8": ["--method", "smoothquant-gptq", "--alpha-search"]}
    for name, flags in methods.items():
        if keep_previous(name):
            if name == "miaotui AWQ+GPTQ int4 g32":
                keep_previous("miaotui AWQ+GPTQ g32 as Q4_0")
            continue
        out = work / name.split(" ", 1)[1].replace(" ", "-").replace("+", "").lower()
        seconds = run(MIAOTUI + ["quantize", "-m", str(f32_dir), *flags, "--calib-samples", n, "-o", str(out)],
                      work / f"{out.name}.log")
        score(name, "miaotui", out, seconds, f"calibration {n} x 512" + ("; alpha searched" if "smooth" in out.name
                                                                          else ""))
        if name == "miaotui AWQ+GPTQ int4 g32":
            gguf_out = work / "miaotui-awq-gptq-q4_0.gguf"
            extra = run(MIAOTUI + ["export-gguf", "-m", str(out), "--type", "q4_0", "-o", str(gguf_out)],
                        work / "awq-gptq-export.log")
            score("miaotui AWQ+GPTQ g32 as Q4_0", "miaotui", gguf_out, seconds + extra, f"calibration {n} x 512")

    # llm-compressor, in its own environment, on the same float32 directory and calibration windows
    if not args.skip_llmcompressor:
        python = ensure_llmcompressor()
        job = ROOT / "benchmarks" / "peers" / "llmcompressor_job.py"
        # W4A16's group of 128 does not divide 576-wide rows: llm-compressor refuses, and crashes when told
        # to go on; its largest group that divides every row of this model is 64
        for name, flags, note in (("llm-compressor GPTQ W4A16 g64", ["--scheme", "gptq-w4a16", "--group-size", "64"],
                                   "g128 crashes on 576-wide rows"),
                                  ("llm-compressor SmoothQuant+GPTQ W8A8", ["--scheme", "smoothquant-gptq-w8a8"], "")):
            if keep_previous(name):
                continue
            out = work / name.replace(" ", "-").replace("+", "").lower()
            log = work / f"{out.name}.log"
            run([str(python), str(job), "--model", str(f32_dir), "--calib", str(calib_json), *flags,
                 "--threads", "2", "-o", str(out)], log)
            seconds = json.loads(log.read_text().strip().splitlines()[-1])["seconds"]
            score(name, "llm-compressor", out, seconds, f"calibration {n} x 512; {note}".rstrip("; "))
    write(rows, work)


def write(rows: list[dict], work: Path) -> None:
    RESULTS.mkdir(exist_ok=True)
    base = next((r for r in rows if r["name"] == "float32"), None)
    for r in rows:
        if base is not None:
            r["dppl_half"] = r["ppl_half"] / base["ppl_half"] - 1
            r["dppl_full"] = r["ppl_full"] / base["ppl_full"] - 1
            if r.get("llama_ppl_half") and base.get("llama_ppl_half"):
                r["llama_dppl_half"] = r["llama_ppl_half"] / base["llama_ppl_half"] - 1
    meta = {"machine": cpu_name(), "threads": 2, "torch": torch.__version__, "text": "WikiText-2 test, 40 x 512",
            "reference": "SmolLM2-135M-Instruct Q4_1 dequantized to float32"}
    (RESULTS / "quality_vs_peers.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"Machine: {meta['machine']}, 2 threads. Reference: {meta['reference']}; text: {meta['text']}.", "",
             "| method | tool | bits/weight | Δppl llama.cpp protocol | Δppl full window | KL (half) | KL (full) | "
             "top-1 agree | wall time | note |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        dl = r.get("llama_dppl_half", r.get("dppl_half"))
        kl = r.get("llama_kl_half", r["kl_half"])
        scorer = "" if "llama_dppl_half" in r else "*"
        lines.append(f"| {r['name']} | {r['tool']} | {r['bpw']:.2f} | {100 * (dl or 0):+.2f}%{scorer} | "
                     f"{100 * r.get('dppl_full', 0):+.2f}% | {kl:.4f}{scorer} | {r['kl_full']:.4f} | "
                     f"{100 * r['top1_agree_half']:.1f}% | {r['seconds']:.0f} s | {r['note']} |")
    lines += ["", "GGUF rows: llama.cpp protocol figures by `llama-perplexity --kl-divergence` on the file; "
              "* scored by miaotui on the same windows and targets. Full-window figures by miaotui. Bits per weight "
              "count every tensor in the file (the tied float embedding too, for the Hugging Face directories). "
              "Wall time: the whole command for llama.cpp and miaotui (imatrix included), llm-compressor's "
              "oneshot() alone (its model load and save excluded)."]
    (RESULTS / "quality_vs_peers.md").write_text("\n".join(lines) + "\n")
    _plot(rows)


def _plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for tool, marker in (("llama.cpp", "s"), ("miaotui", "o"), ("llm-compressor", "^")):
        points = sorted((r["bpw"], 100 * r.get("llama_dppl_half", r.get("dppl_half", math.nan)), r["name"])
                        for r in rows if r["tool"] == tool)
        if not points:
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=tool)
        for x, y, name in points:
            ax.annotate(name.split(" ", 1)[1], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("bits per weight (from the file)")
    ax.set_ylabel("Δ perplexity vs float32, llama.cpp protocol (%)")
    ax.set_title("SmolLM2-135M: quality against size")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "quality_vs_peers.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
