"""`miaotui demo` (what `make run` runs): the whole story on the default model in one command.

1. Build compressed variants of the model (cached under $MIAOTUI_HOME/demo/ after the first run):
   int8 (RTN per channel), 4-bit AWQ (g32, Q4_0's grid) and a layer-pruned + distilled draft.
2. Measure each one — params, size on disk, perplexity, prefill and decode tok/s — and print the
   before/after table, with a PNG plot.
3. Answer a chat question with every lossless decoding configuration (plain, prompt-lookup and
   draft-model speculation: the same text, token for token), and show the fastest.
4. Point to the next commands.

Perplexities are cached with the variants (they are deterministic); speeds are measured anew on
every run (short runs: benchmarks/ holds the careful, repeated measurements).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miaotui.api import LLM
from miaotui.data import read_text, text_path
from miaotui.engine.sampling_params import SamplingParams
from miaotui.eval.bench import run_bench
from miaotui.eval.perplexity import perplexity
from miaotui.loaders.model_store import cache_dir

QUESTION = "In one sentence: why does quantization make language models faster?"
EVAL_TOKENS = 4096  # perplexity over the first 8 windows of 512 tokens
SKIP = 40 * 512  # calibration and distillation text starts after the benchmarks' evaluated tokens


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    what: str
    stages: list[dict[str, Any]]
    about: str  # roughly how long building it takes on a 2-core CPU


def _variants(text: str) -> list[Variant]:
    calib = {"calib_file": text, "calib_seq_len": 512, "calib_skip_tokens": SKIP}
    return [
        Variant("int8", "int8 RTN, per channel", [{"stage": "quantize", "method": "rtn", "bits": 8,
                                                   "group_size": -1, "symmetric": True}], "about 10 s"),
        Variant("awq-int4", "4-bit AWQ, g32 symmetric", [{"stage": "quantize", "method": "awq", "bits": 4,
                                                          "group_size": 32, "symmetric": True, "calib_samples": 8,
                                                          **calib}], "1-4 min, by CPU (a few seconds a layer)"),
        # The draft: 9 of 30 layers kept (Taylor-ranked), then distilled from the original for 4 minutes.
        Variant("draft", "pruned to 9 layers + distilled", [
            {"stage": "prune", "structured": "layers", "sparsity": 0.7, "method": "taylor", "calib_samples": 4,
             **calib},
            {"stage": "distill", "text_file": text, "skip_tokens": SKIP, "steps": 100_000, "max_minutes": 4.0,
             "lr": 3.0e-4, "batch": 2, "seq_len": 256}], "about 5 min: a 4-minute distillation budget"),
    ]


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 66 - len(title)), flush=True)


def _build(model: str, variant: Variant, home: Path) -> Path:
    """The variant's checkpoint, built on first use (into a temporary directory, then renamed, so an
    interrupted build never leaves a half-written cache entry)."""
    from miaotui.compress.recipe import parse_recipe, run_recipe

    out = home / variant.name
    if (out / "miaotui_model.json").is_file():
        return out
    print(f"building {variant.name} ({variant.what}), {variant.about}; cached for later runs", flush=True)
    building = home / f".building-{variant.name}-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    started = time.perf_counter()
    run_recipe(model, parse_recipe({"stages": variant.stages}, f"demo:{variant.name}"), building)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(building, out)
    print(f"  built in {time.perf_counter() - started:.0f} s", flush=True)
    return out


def _measure(label: str, llm: LLM, ids: list[int] | None, cache: dict[str, Any], key: str) -> dict[str, Any]:
    path = Path(llm.path)
    stamp = (path / "miaotui_model.json") if path.is_dir() else path
    key = f"{key}:{stamp.stat().st_mtime_ns}"  # a rebuilt checkpoint is measured again
    size = sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size
    if ids is not None and key not in cache:
        cache[key] = perplexity(llm.model, ids, ctx=512, progress=False).ppl
    speed = run_bench(llm, prompt_tokens=128, gen_tokens=32, batch=1, repeat=2, progress=False)
    row = {"label": label, "params": llm.model.num_parameters(), "size_mb": size / 1e6, "ppl": cache.get(key),
           "prefill_tok_s": speed["prefill_tok_s"], "decode_tok_s": speed["decode_tok_s"]}
    ppl = "—" if row["ppl"] is None else f"{row['ppl']:.2f}"
    print(f"  {label:<34} {row['params'] / 1e6:6.1f} M {row['size_mb']:7.1f} MB  ppl {ppl:>7}  "
          f"prefill {row['prefill_tok_s']:6.0f}  decode {row['decode_tok_s']:5.1f} tok/s", flush=True)
    return row


def _lossless(model: str, draft: Path) -> list[dict[str, Any]]:
    """The chat answer under each lossless configuration: same text, different speed."""
    configs: list[tuple[str, dict[str, Any]]] = [
        ("plain", {}), ("prompt lookup (ngram)", {"speculate": "ngram"}),
        ("draft model (pruned + distilled)", {"speculative_model": str(draft), "num_speculative_tokens": 3})]
    params = SamplingParams(temperature=0.0, max_tokens=64)
    rows = []
    for label, kwargs in configs:
        llm = LLM(model, **kwargs)
        messages = [{"role": "user", "content": QUESTION}]
        llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
        stats = llm.speculation_stats
        before = (0, 0) if stats is None else (stats.steps, stats.generated)
        start = time.perf_counter()
        out = llm.chat(messages, params)[0].outputs[0]
        seconds = time.perf_counter() - start
        stats = llm.speculation_stats  # a snapshot: read it again
        per_pass = None if stats is None else (stats.generated - before[1]) / max(stats.steps - before[0], 1)
        rows.append({"label": label, "text": out.text, "tokens": len(out.token_ids), "seconds": seconds,
                     "tok_s": len(out.token_ids) / seconds, "tokens_per_pass": per_pass})
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    base = rows[0]
    lines = ["| model | params | size MB | ppl | prefill tok/s | decode tok/s | decode speedup |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ppl = "—" if r["ppl"] is None else f"{r['ppl']:.2f}"
        lines.append(f"| {r['label']} | {r['params'] / 1e6:.1f} M | {r['size_mb']:.1f} | {ppl} | "
                     f"{r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
                     f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}× |")
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], lossless: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    labels = [r["label"] for r in rows]
    axes[0].barh(labels, [r["decode_tok_s"] for r in rows], color="tab:blue")
    axes[0].set_xlabel("batch-1 decode tok/s")
    axes[1].barh(labels, [r["size_mb"] for r in rows], color="tab:gray")
    axes[1].set_xlabel("size on disk (MB)")
    axes[2].barh([r["label"] for r in lossless], [r["tok_s"] for r in lossless], color="tab:green")
    axes[2].set_xlabel("chat answer tok/s (identical text)")
    for ax in axes[:2]:
        ax.invert_yaxis()
    fig.suptitle("miaotui demo: compressed variants and lossless speculative decoding (this machine)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def run_demo(model: str, text_file: str | None, rebuild: bool = False) -> None:
    start = time.perf_counter()
    text = text_path(text_file, "--text-file")
    home = cache_dir() / "demo" / Path(model).name
    if rebuild:
        shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True, exist_ok=True)
    metrics_file = home / "ppl.json"
    ppl_cache: dict[str, Any] = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}

    variants = _variants(str(text))
    _section("1. compress: three variants, built once and cached (first run 7-12 min, by CPU, then skipped)")
    built = {variant.name: _build(model, variant, home) for variant in variants}

    _section("2. measure, about 30 s (ppl: WikiText-2, 4,096 tokens, ctx 512; speed: pp128 / tg32, batch 1)")
    original = LLM(model)
    ids = original.tokenizer.encode(read_text(text), add_special_tokens=False)[:EVAL_TOKENS]
    text_key = f"{hashlib.sha256(text.read_bytes()).hexdigest()[:16]}:{EVAL_TOKENS}"
    dtype = str(original.dtype).removeprefix("torch.")  # the device default: bf16 or float32
    rows = [_measure(f"original (Q4_1 GGUF in its own bits, {dtype})", original, ids, ppl_cache,
                     f"original-native:{text_key}")]
    del original
    for variant in variants:
        rows.append(_measure(f"{variant.name}: {variant.what}", LLM(str(built[variant.name])), ids,
                                 ppl_cache, f"{variant.name}:{text_key}"))
    metrics_file.write_text(json.dumps(ppl_cache, indent=2))

    _section("3. lossless, about 30 s: speculative decoding answers the same, faster or not")
    lossless = _lossless(model, built["draft"])
    reference = lossless[0]["text"]
    for r in lossless:
        same = "identical" if r["text"] == reference else "DIFFERENT"
        per_pass = "" if r["tokens_per_pass"] is None else f", {r['tokens_per_pass']:.2f} tokens per target pass"
        print(f"  {r['label']:<34} {r['tok_s']:5.1f} tok/s ({same}{per_pass})")
    fastest = max(lossless, key=lambda r: r["tok_s"])

    _section("before / after")
    table = _table(rows)
    print(table)
    png = home / "demo.png"
    _plot(rows, lossless, png)
    (home / "demo.json").write_text(json.dumps({"model": model, "rows": rows, "lossless": lossless}, indent=2))
    print(f"\nplot: {png}\nfigures: {home / 'demo.json'}")

    _section(f"chat, with the fastest lossless configuration: {fastest['label']}")
    print(f"user:      {QUESTION}")
    print(f"assistant: {fastest['text'].strip()}")
    print(f"({fastest['tokens']} tokens at {fastest['tok_s']:.1f} tok/s, "
          f"{fastest['tok_s'] / lossless[0]['tok_s']:.2f}× plain decoding)")

    _section("next")
    print(f"miaotui chat -m {model}")
    print(f"miaotui serve -m {model} --port 8000          # OpenAI-compatible API")
    print(f"miaotui serve -m {built['awq-int4']} --port 8000   # the 4-bit variant built above")
    print(f"miaotui generate -m {model} --speculate ngram -p 'Repeat: a b c d e f'")
    print(f"miaotui compress -m {model} --recipe recipes/prune-distill-int4.yaml -o out/pdq")
    print(f"miaotui eval ppl -m {model} --score-from 256   # WikiText-2, llama.cpp's protocol")
    print(f"miaotui bench -m {model} --batch 8")
    print(f"\ndone in {time.perf_counter() - start:.0f} s")
    sys.stdout.flush()
