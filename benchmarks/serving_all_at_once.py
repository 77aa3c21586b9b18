"""llama-server's parallel-slot protocol, both servers in the same run: 16 requests sent at once to
16 slots (no refill),
128 random prompt tokens and 128 output tokens each, the Q4_1 class (miaotui: RTN int4 g32 asym;
llama-server: the shipped Q4_1 GGUF), medians of 3 runs. benchmarks/serving.py's c16 row sends 32
requests with at most 16 in flight, so a second wave's prefill falls among the first's decode steps.
Needs llama.cpp's llama-server (docs/serving.md): `python benchmarks/serving_all_at_once.py PATH`.
Writes benchmarks/results/serving_all_at_once.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving import RESULTS, median_run, quantize_4bit, running_llama_server  # noqa: E402

from miaotui.eval.bench_serve import bench_serve  # noqa: E402
from miaotui.loaders.model_store import pull  # noqa: E402
from tests.unit.server_process import running_server  # noqa: E402


def main() -> None:
    binary = sys.argv[1]
    gguf = str(pull("smollm2-135m"))
    model = quantize_4bit(gguf, Path(tempfile.gettempdir()) / "miaotui-serving-int4")
    out = {}
    with running_llama_server(binary, gguf) as url:
        bench_serve(url, [1], 2, 16, 16)
        out["llama_server_q4_1"] = median_run(url, 16, 16, 3)
    with running_server(model, "--served-model-name", "m", "--threads", "2", "--kv-cache-mb", "1024",
                        "--max-num-seqs", "64") as (url, _):
        bench_serve(url, [1], 2, 16, 16)
        out["miaotui_int4"] = median_run(url, 16, 16, 3)
    out["ratio"] = out["miaotui_int4"]["output_tok_s"] / out["llama_server_q4_1"]["output_tok_s"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serving_all_at_once.json").write_text(json.dumps(out, indent=2))
    print(f"16 at once: miaotui int4 {out['miaotui_int4']['output_tok_s']:.1f} tok/s, llama-server Q4_1 "
          f"{out['llama_server_q4_1']['output_tok_s']:.1f} tok/s: {out['ratio']:.2f}x")


if __name__ == "__main__":
    main()
