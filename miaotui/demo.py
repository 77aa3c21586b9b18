"""`miaotui demo` (what `make run` runs): the first minute with miaotui, as one readable summary.

Not for measurements people compare: benchmarks/ holds those, with repetitions and plots.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from miaotui.api import LLM
from miaotui.cli import format_info, model_info
from miaotui.engine.sampling_params import SamplingParams
from miaotui.eval.bench import run_bench
from miaotui.eval.perplexity import perplexity

# Where the WikiText-2 test split sits in this project's checkouts (passed by path, never copied).
_DEFAULT_TEXTS = ("../shared/data/wikitext-2-raw/wiki.test.raw", "shared/data/wikitext-2-raw/wiki.test.raw")
QUESTION = "In one sentence: why does quantization make language models faster?"


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 60 - len(title)))


def run_demo(model: str, text_file: str | None) -> None:
    start = time.perf_counter()
    llm = LLM(model)
    _section("model")
    print(format_info(model_info(llm)))

    _section("chat")
    print(f"user:      {QUESTION}")
    sys.stdout.write("assistant: ")
    for event in llm.stream_chat([{"role": "user", "content": QUESTION}],
                                 SamplingParams(temperature=0.0, max_tokens=80)):
        sys.stdout.write(event.text)
        sys.stdout.flush()
    print()

    _section("speed (pp128 / tg32, batch 1 and 8, median of 3)")
    rows = [run_bench(llm, prompt_tokens=128, gen_tokens=32, batch=b, repeat=3, progress=False) for b in (1, 8)]
    for r in rows:
        print(f"batch {r['batch']}: prefill {r['prefill_tok_s']:7.1f} tok/s   decode {r['decode_tok_s']:6.1f} tok/s"
              f"   TTFT {r['ttft_ms']:6.0f} ms   ITL p50 {r['itl_p50_ms']:5.1f} ms")

    _section("quality (WikiText-2 perplexity, first 8,192 tokens, ctx 512)")
    path = Path(text_file) if text_file else next((Path(p) for p in _DEFAULT_TEXTS if Path(p).is_file()), None)
    if path is None or not path.is_file():
        print("no text file found; pass --text-file to measure perplexity")
    else:
        ids = llm.tokenizer.encode(path.read_text(encoding="utf-8"), add_special_tokens=False)[:8192]
        result = perplexity(llm.model, ids, ctx=512, progress=False)
        print(f"ppl {result.ppl:.3f} over {result.tokens:,} tokens of {path.name} ({result.seconds:.1f} s)")

    _section("next")
    print(f"miaotui generate -m {model} -p 'Once upon a time' --stream")
    print(f"miaotui chat -m {model}")
    print(f"miaotui eval ppl -m {model} --text-file FILE --score-from 256   # llama.cpp's protocol")
    print(f"miaotui bench -m {model} --batch 8")
    print(f"miaotui quantize -m {model} --method awq --bits 4 --group-size 32 --symmetric "
          "--calib-file FILE -o out/awq4")
    print("miaotui export-gguf -m out/awq4 --type q4_0 -o model-q4_0.gguf")
    print("miaotui compress -m smollm2-135m --recipe recipes/prune-distill-int4.yaml -o out/pdq")
    print("miaotui serve -m smollm2-135m --port 8000          # OpenAI-compatible API")
    print(f"\ndone in {time.perf_counter() - start:.0f} s")
