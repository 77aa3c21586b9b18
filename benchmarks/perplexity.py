"""WikiText-2 perplexity of the default model under both protocols, for README and comparisons.

- full-window (Hugging Face's): every token of each 512-token window after the first is scored.
- llama.cpp's (`llama-perplexity -c 512`): only the second half of each window is scored.
First 40 x 512 tokens of wiki.test.raw, as in ../shared/PERF.md. Writes benchmarks/results/perplexity.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from miaotui import LLM
from miaotui.eval.perplexity import perplexity
from miaotui.loaders.model_store import pull
from miaotui.runtime import dtype_name

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
LLAMA_CPP_F32 = 22.50  # ../shared/PERF.md, llama-perplexity -c 512 --chunks 40


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--text-file", default=str(DEFAULT_TEXT))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,auto")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = pull("smollm2-135m")
    rows = []
    for dtype in args.dtypes.split(","):
        llm = LLM(str(path), dtype=dtype)
        ids = llm.tokenizer.encode(Path(args.text_file).read_text(encoding="utf-8"), add_special_tokens=False)
        ids = ids[:40 * 512]
        for protocol, score_from in (("llama.cpp (second half of each window)", 256), ("full window", 0)):
            r = perplexity(llm.model, ids, ctx=512, stride=512, score_from=score_from)
            rows.append({"dtype": dtype_name(llm.dtype), "requested": dtype, "protocol": protocol,
                         "score_from": score_from, "ppl": r.ppl, "tokens": r.tokens, "seconds": r.seconds})
            print(f"{dtype:>8} {protocol:<42} ppl {r.ppl:.3f} ({r.tokens} tokens, {r.seconds:.0f} s)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "perplexity.json").write_text(json.dumps({"llama_cpp_f32_reference": LLAMA_CPP_F32, "rows": rows},
                                                        indent=2))


if __name__ == "__main__":
    main()
