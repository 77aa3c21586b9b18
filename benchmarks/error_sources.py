"""Where 4-bit error comes from on SmolLM2-135M: each part of the model rounded alone, the rest float32.

The default model dequantized to float32 is the reference (as in benchmarks/quality_vs_peers.py);
each probe rounds one part by RTN at the probe's format (default int4, symmetric groups of 128: the
g128 format whose gap the quality work closes) and scores WikiText-2 (40 x 512, llama.cpp's protocol:
second halves), against the float model:
- by role: every layer's qkv_proj, o_proj, gate_up_proj or down_proj;
- by depth: all linears of layers [i, i + 5);
- the token embedding, which is the tied output head too (rounded in the same groups);
- what the activations look like at each role's input: the largest channel's RMS over the median
  channel's (outlier channels make a group's range, and so its step, large for the rest).
Writes benchmarks/results/error_sources.{json,md,png}. Run: `.venv/bin/python benchmarks/error_sources.py`.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.vs_llamacpp import describe_machine, machine  # noqa: E402
from miaotui.compress.calibration import capture_inputs, layer_by_layer, load_calibration  # noqa: E402
from miaotui.compress.quantize.apply import quantize_model  # noqa: E402
from miaotui.data import WIKITEXT2_TEST, read_text  # noqa: E402
from miaotui.eval.perplexity import perplexity  # noqa: E402
from miaotui.layers.quant_formats import QuantFormat, compute_qparams, dequantize_codes, quantize_codes  # noqa: E402
from miaotui.loaders.load import load_model  # noqa: E402
from miaotui.models.plan import layer_plan  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CTX, WINDOWS, DEPTH_BIN = 512, 40, 5


def score(model, ids: list[int], base: float | None = None) -> dict:
    ppl = perplexity(model, ids, CTX, score_from=CTX // 2, progress=False).ppl
    return {"ppl": ppl} | ({} if base is None else {"change": ppl / base - 1})


def rounded_embedding(model, fmt: QuantFormat) -> None:
    """The embedding table (the tied head) rounded in place, row by row in the probe's groups."""
    weight = model.embed_tokens.weight.data
    scale, zero = compute_qparams(weight, fmt)
    weight.copy_(dequantize_codes(quantize_codes(weight, scale, zero, fmt), scale, zero, fmt))


def outlier_ratios(model, tokenizer, samples: int) -> dict[str, float]:
    """Per role, averaged over layers: max_j RMS(x_j) / median_j RMS(x_j) of the role's input channels."""
    calib = load_calibration(None, tokenizer, samples, CTX)
    ratios: dict[str, list[float]] = {}
    for i, layer, forward_all in layer_by_layer(model, calib, desc="activations", keep=False):
        names = list(layer_plan(model.config, i).linears)
        stats = capture_inputs(layer, names, forward_all)
        for name, acc in stats.items():
            rms = torch.diag(acc.hessian / 2).sqrt()  # H = 2 E[x x^T]: E[x_j^2] on its diagonal
            ratios.setdefault(name.split(".")[-1], []).append(float(rms.max() / rms.median()))
    return {role: sum(v) / len(v) for role, v in ratios.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--calib-samples", type=int, default=8, help="windows of 512 for the activation statistics")
    args = parser.parse_args()
    torch.set_num_threads(2)
    fmt = QuantFormat(args.bits, args.group_size, True)
    loaded = load_model("smollm2-135m", torch.float32)
    reference, config = loaded.model, loaded.config
    ids = loaded.tokenizer.encode(read_text(WIKITEXT2_TEST), add_special_tokens=False)[:WINDOWS * CTX]
    base = score(reference, ids)["ppl"]
    print(f"float32: {base:.4f}", flush=True)
    results: dict = {"machine": machine(), "format": f"int{fmt.bits} g{fmt.group_size} symmetric, RTN",
                     "float_ppl": base, "probes": []}

    def probe(kind: str, label: str, modules: list[str] | None, embedding: bool = False) -> None:
        model = copy.deepcopy(reference)
        if modules:
            quantize_model(model, "rtn", fmt, modules=modules)
        if embedding:
            rounded_embedding(model, fmt)
        row = {"kind": kind, "part": label, "weights": _weights(reference, modules, embedding)}
        row |= score(model, ids, base)
        results["probes"].append(row)
        print(f"{kind} {label}: {row['ppl']:.4f} ({row['change']:+.2%})", flush=True)

    layers = range(config.num_layers)
    linears = layer_plan(config, 0).linears
    everything = [f"layers.{i}.{n}" for i in layers for n in layer_plan(config, i).linears]
    probe("all", "every linear", everything)
    probe("all", "every linear + embedding/head", everything, embedding=True)
    for name in linears:
        probe("role", name.split(".")[-1], [f"layers.{i}.{name}" for i in layers])
    for first in range(0, config.num_layers, DEPTH_BIN):
        span = range(first, min(first + DEPTH_BIN, config.num_layers))
        probe("depth", f"layers {span.start}-{span.stop - 1}",
              [f"layers.{i}.{n}" for i in span for n in layer_plan(config, i).linears])
    probe("embedding", "embedding (= tied head)", None, embedding=True)
    results["outlier_ratio"] = outlier_ratios(copy.deepcopy(reference), loaded.tokenizer, args.calib_samples)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "error_sources.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "error_sources.md").write_text(markdown(results))
    plot(results)
    print((RESULTS / "error_sources.md").read_text())


def _weights(model, modules: list[str] | None, embedding: bool) -> int:
    count = sum(model.get_submodule(m).weight.numel() for m in modules or [])
    return count + (model.embed_tokens.weight.numel() if embedding else 0)


def markdown(r: dict) -> str:
    lines = [f"{describe_machine(r['machine'])}. SmolLM2-135M (float32 reference, PPL {r['float_ppl']:.4f}); each "
             f"part rounded alone to {r['format']}, the rest float32; WikiText-2 40 x 512, second halves.", "",
             "| probe | part | weights rounded | PPL | Δppl | Δppl per 10 M weights |", "|---|---|---:|---:|---:|---:|"]
    for p in r["probes"]:
        lines.append(f"| {p['kind']} | {p['part']} | {p['weights'] / 1e6:.1f} M | {p['ppl']:.3f} | {p['change']:+.2%} "
                     f"| {p['change'] / max(p['weights'], 1) * 1e7:+.2%} |")
    lines += ["", "Input channels, max over median of the per-channel RMS (mean over layers): " +
              ", ".join(f"{role} {ratio:.0f}×" for role, ratio in r["outlier_ratio"].items()) + "."]
    return "\n".join(lines) + "\n"


def plot(r: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probes = [p for p in r["probes"] if p["kind"] != "all"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = {"role": "tab:blue", "depth": "tab:orange", "embedding": "tab:green"}
    ax.barh([p["part"] for p in probes], [100 * p["change"] for p in probes],
            color=[colors[p["kind"]] for p in probes])
    ax.invert_yaxis()
    ax.set_xlabel(f"Δ perplexity vs float32 (%), that part alone at {r['format']}")
    ax.set_title("SmolLM2-135M: where 4-bit rounding error comes from")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "error_sources.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
