"""Peak memory of loading quantized checkpoints: never a full-precision copy.

Quantizes the default model (RTN; the load path does not depend on the method), saves it, then
loads it in a fresh process and reads that process's peak RSS. Target: peak RSS <= 1.3 x the
checkpoint's size on disk + 400 MB. Writes benchmarks/results/load_memory.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from miaotui import LLM
from miaotui.compress.quantize.apply import quantize_model, resolve_method
from miaotui.loaders.miaotui_dir import save_model
from miaotui.loaders.model_store import pull

RESULTS = Path(__file__).resolve().parent / "results"
FORMATS = [("int8", "rtn", 8, -1, True), ("int4 g128", "rtn", 4, 128, False), ("int4 g32 sym", "rtn", 4, 32, True),
           ("w8a8", "smoothquant", 8, -1, True), ("ternary g64", "ternary", 2, 64, True)]
# Linux copies the parent's peak-RSS mark into a forked child, so the child resets it first
# (clear_refs 5) and reads VmHWM itself: after loading, and after a short generation.
CHILD = """
import sys
open("/proc/self/clear_refs", "w").write("5")
def peak():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
import torch
torch.set_num_threads(2)
from miaotui import LLM
llm = LLM(sys.argv[1], dtype=sys.argv[2], decode_weight_dtype="none")
loaded = peak()
llm.generate("Hello, my name is", None)
print(loaded, peak())
"""


def main() -> None:
    base = str(pull("smollm2-135m"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, method, bits, group, sym in FORMATS:
            llm = LLM(base, dtype="float32", decode_weight_dtype="none")
            algo, fmt = resolve_method(method, bits, group, sym)
            calib = None
            if algo == "smoothquant":
                from miaotui.compress.calibration import load_calibration

                calib = load_calibration(None, llm.tokenizer, 4, 512)  # the bundled WikiText-2
            record = quantize_model(llm.model, algo, fmt, calib)
            out = save_model(llm.model, llm.tokenizer, Path(tmp) / label.replace(" ", "_"), record.to_dict())
            size = sum(f.stat().st_size for f in out.iterdir())
            for dtype in ("float32",):
                loaded, generated = (int(v) for v in subprocess.run(
                    [sys.executable, "-c", CHILD, str(out), dtype], capture_output=True, text=True,
                    check=True).stdout.split()[-2:])
                limit = 1.3 * size + 400e6
                rows.append({"label": label, "dtype": dtype, "size_mb": size / 1e6,
                             "peak_rss_load_mb": loaded / 1e6, "peak_rss_after_generate_mb": generated / 1e6,
                             "limit_mb": limit / 1e6, "ok": loaded <= limit})
                print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "load_memory.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
