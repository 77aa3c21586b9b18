"""Per-call time of the linear-layer kernels for decode-sized calls (1-16 rows), on this CPU.

Each kernel runs over 30 different weights of one shape in turn, so weights stream from memory as
in a real model (a single weight would sit in cache). Shapes: SmolLM2-135M's fused layers and the
1B shape's MLP. Reports microseconds per call (median of repeats) and the achieved GB/s of weight
reads; the kernel kernel_choice.py picks is marked. Writes benchmarks/results/decode_kernels.{json,md}.
Run: `.venv/bin/python benchmarks/decode_kernels.py` (the figures behind docs/kernels.md).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.vs_llamacpp import machine  # noqa: E402
from miaotui.kernels import native_op  # noqa: E402
from miaotui.layers.kernel_choice import bf16_kernel, int4pack_fits, q_rows_fits, this_cpu  # noqa: E402
from miaotui.layers.linear import bf16_tiles_layout, tiled_linear  # noqa: E402
from miaotui.layers.quant_formats import QuantFormat, compute_qparams, quantize_codes  # noqa: E402
from miaotui.layers.quantized_linear import QuantLinear, int4pack_layout  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(3072, 576), (576, 1536), (960, 576), (8192, 2048)]  # [N, K]: 135M gate+up, down, qkv; 1B up
ROWS = [1, 2, 4, 8, 16, 40]
COPIES = 30
FORMATS = {"int4 g32 sym": QuantFormat(4, 32, True), "int4 g32 asym": QuantFormat(4, 32, False),
           "int8 per channel": QuantFormat(8, -1, True), "int8 g32 sym": QuantFormat(8, 32, True),
           "int8 g128 asym": QuantFormat(8, 128, False)}


def time_calls(fn, weights: list, x: torch.Tensor, repeat: int = 7) -> float:
    """Median over repeats of the mean time (us) of one call, cycling through the weights."""
    for w in weights[:3]:
        fn(w, x)
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        for w in weights:
            fn(w, x)
        samples.append((time.perf_counter() - start) / len(weights) * 1e6)
    return statistics.median(samples)


def quant_layers(fmt: QuantFormat, n: int, k: int) -> list[QuantLinear]:
    out = []
    for i in range(COPIES):
        torch.manual_seed(i)
        w = torch.randn(n, k) * 0.02
        layer = QuantLinear(k, n, False, fmt)
        scale, zero = compute_qparams(w, fmt)
        layer.set_codes(quantize_codes(w, scale, zero, fmt), scale, zero)
        # every layout a kernel could use here, also those this CPU's choice leaves unbuilt
        if q_rows_fits(fmt, k) and native_op("linear_q_rows") is not None:
            layer._q_affine = layer.scale, (-(layer.zero - fmt.qmin) * layer.scale).contiguous()
        if int4pack_fits(fmt, k, n) and layer._int4 is None:
            layer._int4, layer._int4_scales_zeros = int4pack_layout(layer.codes(), fmt, layer.scale, layer.zero)
        out.append(layer)
    return out


def forced(kernel: str):
    """Run a QuantLinear call through one named kernel (the choice overridden for the measurement)."""
    def call(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        layer.kernel_for = lambda rows, dtype=None: kernel
        try:
            return layer(x)
        finally:
            del layer.kernel_for
    return call


def main() -> None:
    torch.set_num_threads(2)
    caps = this_cpu()
    results: dict = {"machine": machine(), "caps": {f: getattr(caps, f) for f in caps.__slots__}, "rows": ROWS,
                     "quant": [], "bf16": []}
    with torch.no_grad():
        for n, k in SHAPES:
            for name, fmt in FORMATS.items():
                layers = quant_layers(fmt, n, k)
                nbytes = sum(t.numel() * t.element_size() for t in layers[0].decode_tensors())
                kernels = [name for name, layout in (("tiles_q", layers[0]._q_tiles), ("rows_q", layers[0]._q_affine),
                                                     ("int4pack", layers[0]._int4), ("int8pack", layers[0]._int8))
                           if layout is not None] + ["dense"]
                for kernel in kernels:
                    us = [time_calls(forced(kernel), layers, torch.randn(r, k, dtype=torch.bfloat16)) for r in ROWS]
                    chosen = [layers[0].kernel_for(r) == kernel for r in ROWS]
                    results["quant"].append({"shape": [n, k], "format": name, "kernel": kernel, "us": us,
                                             "chosen": chosen, "gb_s_1_row": nbytes / us[0] / 1e3})
                    print(f"{n}x{k} {name:16s} {kernel:9s} " + " ".join(f"{u:8.1f}" for u in us), flush=True)
            weights = [torch.randn(n, k, dtype=torch.bfloat16) for _ in range(COPIES)]
            variants = {"gemm": (weights, lambda w, x: F.linear(x, w))}
            if native_op("linear_bf16_tiles") is not None and caps.avx512_bf16 and k % 32 == 0:
                tiles = [bf16_tiles_layout(w) for w in weights]
                variants["tiles_bf16"] = (tiles, lambda t, x, n=n: tiled_linear(x, t, n, None, "tiles_bf16"))
                if caps.amx:
                    variants["amx_bf16"] = (tiles, lambda t, x, n=n: tiled_linear(x, t, n, None, "amx_bf16"))
            for kernel, (held, fn) in variants.items():
                us = [time_calls(fn, held, torch.randn(r, k, dtype=torch.bfloat16)) for r in ROWS]
                chosen = [(bf16_kernel(r, k, torch.bfloat16, torch.bfloat16, caps) or "gemm") == kernel for r in ROWS]
                results["bf16"].append({"shape": [n, k], "kernel": kernel, "us": us, "chosen": chosen,
                                        "gb_s_1_row": n * k * 2 / us[0] / 1e3})
                print(f"{n}x{k} bf16             {kernel:9s} " + " ".join(f"{u:8.1f}" for u in us), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "decode_kernels.json").write_text(json.dumps(results, indent=2))
    m = results["machine"]
    lines = [f"{m['cpu']} (family {m.get('family')} model {m.get('model')}; {', '.join(m['flags'])}), 2 threads; "
             f"us per call over {COPIES} weights streamed from memory; * = the kernel miaotui picks", "",
             "| shape N×K | weights | kernel | " + " | ".join(f"{r} row{'s' if r > 1 else ''}" for r in ROWS)
             + " | GB/s at 1 row |", "|---|---|---|" + "---:|" * (len(ROWS) + 1)]
    for row in results["quant"] + results["bf16"]:
        cells = " | ".join(f"{u:.0f}{'*' if c else ''}" for u, c in zip(row["us"], row["chosen"], strict=True))
        lines.append(f"| {row['shape'][0]}×{row['shape'][1]} | {row.get('format', 'bf16')} | {row['kernel']} | "
                     f"{cells} | {row['gb_s_1_row']:.1f} |")
    (RESULTS / "decode_kernels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
