"""WikiText-2 perplexity of the default model under both protocols, for README and comparisons.

- full-window (Hugging Face's): every token of each 512-token window after the first is scored.
- llama.cpp's (`llama-perplexity -c 512`): only the second half of each window is scored.
First 40 x 512 tokens of the bundled wiki.test.raw (llama-perplexity's -c 512 --chunks 40).
With --llama-perplexity PATH, llama.cpp scores the same GGUF file in the same run.
Writes benchmarks/results/perplexity.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from miaotui import LLM
from miaotui.data import WIKITEXT2_TEST, read_text
from miaotui.eval.perplexity import perplexity
from miaotui.loaders.model_store import pull
from miaotui.runtime import dtype_name

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TEXT = WIKITEXT2_TEST  # the WikiText-2 test split that ships with miaotui


def llama_cpp_ppl(binary: str, gguf: Path, text: str, threads: int) -> tuple[float, bool]:
    """llama-perplexity -c 512 --chunks 40 at its defaults otherwise (weight repacking on; off only if
    the default crashes): -> (its final estimate, whether repacking was on)."""
    import re
    import subprocess

    command = [binary, "-m", str(gguf), "-f", text, "-c", "512", "--chunks", "40", "-t", str(threads)]
    for repack in (True, False):
        done = subprocess.run(command + ([] if repack else ["--no-repack"]), capture_output=True, text=True,
                              timeout=3600)
        found = re.search(r"Final estimate: PPL = ([0-9.]+)", done.stdout + done.stderr)
        if done.returncode == 0 and found is not None:
            return float(found[1]), repack
        print(f"llama-perplexity with repack={repack} failed (exit code {done.returncode})", flush=True)
    raise SystemExit("llama-perplexity failed with and without weight repacking")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--text-file", default=str(DEFAULT_TEXT))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,auto")
    parser.add_argument("--llama-perplexity", default=None, help="llama.cpp's llama-perplexity, to score the file too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = pull("smollm2-135m")
    rows = []
    for dtype in args.dtypes.split(","):
        llm = LLM(str(path), dtype=dtype)
        ids = llm.tokenizer.encode(read_text(Path(args.text_file)), add_special_tokens=False)
        ids = ids[:40 * 512]
        for protocol, score_from in (("llama.cpp (second half of each window)", 256), ("full window", 0)):
            r = perplexity(llm.model, ids, ctx=512, stride=512, score_from=score_from)
            rows.append({"dtype": dtype_name(llm.dtype), "requested": dtype, "protocol": protocol,
                         "score_from": score_from, "ppl": r.ppl, "tokens": r.tokens, "seconds": r.seconds})
            print(f"{dtype:>8} {protocol:<42} ppl {r.ppl:.3f} ({r.tokens} tokens, {r.seconds:.0f} s)")
    peer = None
    if args.llama_perplexity:
        ppl, repack = llama_cpp_ppl(args.llama_perplexity, path, args.text_file, args.threads)
        peer = {"tool": "llama-perplexity", "file": path.name, "ppl": ppl, "repack": repack}
        print(f"llama.cpp {path.name} ppl {ppl:.3f} (second half of each window; repack {'on' if repack else 'off'})")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "perplexity.json").write_text(json.dumps({"rows": rows, "llama_cpp": peer}, indent=2))


if __name__ == "__main__":
    main()
