"""miaotui vs Hugging Face transformers (float32, eager PyTorch) on the default model, same run.

Measures prefill of 512 tokens, batch-1 greedy decode of 128 tokens and 8 prompts generated as
one batch (miaotui) against one after another (transformers). Medians over repetitions.
Writes benchmarks/results/core_vs_transformers.{json,png}. Run: `make bench`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from miaotui import LLM, SamplingParams
from miaotui.loaders.model_store import pull
from miaotui.runtime import describe_device, dtype_name

RESULTS = Path(__file__).resolve().parent / "results"
BATCH_PROMPTS = [
    "Write a short story about a robot learning to paint.",
    "Explain why the sky is blue.",
    "List three uses of a paperclip:",
    "The history of the printing press begins",
    "In Python, a decorator is",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "The best way to learn a new language is",
    "Describe the water cycle for a ten-year-old.",
]


def timed(fn, repeat: int) -> float:
    """Median wall time of fn() over `repeat` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--gen-tokens", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    path = pull("smollm2-135m")
    ours = LLM(str(path))
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    tok = ours.tokenizer
    prompt = torch.randint(0, ours.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    gen = args.gen_tokens
    greedy = SamplingParams(temperature=0.0, max_tokens=gen, ignore_eos=True)
    short = tok.encode("Once upon a time, in a small village by the sea, there lived")
    batch_ids = [tok.encode(p) for p in BATCH_PROMPTS]

    fresh = torch.Generator().manual_seed(1)

    def ours_prefill():  # through the engine, a new prompt each time (the prefix cache must not answer)
        ids = torch.randint(0, ours.config.vocab_size, (512,), generator=fresh).tolist()
        ours.generate([ids], SamplingParams(temperature=0.0, max_tokens=1))

    def ref_prefill():
        with torch.inference_mode():
            ref(prompt, logits_to_keep=1)  # as transformers' generate() prefills

    def ref_generate(ids: list[int]):
        with torch.inference_mode():
            ref.generate(torch.tensor([ids]), max_new_tokens=gen, min_new_tokens=gen, do_sample=False,
                         pad_token_id=ref.config.eos_token_id)

    rows = {}
    print("prefill 512 ...", flush=True)
    rows["prefill_512_tok_s"] = (512 / timed(ours_prefill, args.repeat), 512 / timed(ref_prefill, args.repeat))
    print("batch-1 decode ...", flush=True)
    rows["decode_batch1_tok_s"] = (gen / timed(lambda: ours.generate([short], greedy), args.repeat),
                                   gen / timed(lambda: ref_generate(short), max(1, args.repeat - 1)))
    print("8 prompts ...", flush=True)
    ours_batch = timed(lambda: ours.generate(batch_ids, greedy), 1)
    start = time.perf_counter()
    for ids in batch_ids:
        ref_generate(ids)
    ref_sequential = time.perf_counter() - start
    rows["8_prompts_tok_s"] = (8 * gen / ours_batch, 8 * gen / ref_sequential)

    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "device": describe_device("cpu"),
                    "threads": args.threads, "torch": torch.__version__, "transformers": transformers.__version__},
        "miaotui": {"dtype": dtype_name(ours.dtype), "decode_weight_dtype":
                    None if ours.decode_weight_dtype is None else dtype_name(ours.decode_weight_dtype)},
        "transformers": {"dtype": "float32", "attention": ref.config._attn_implementation},
        "rows": {name: {"miaotui": a, "transformers": b, "speedup": a / b}
                 for name, (a, b) in rows.items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "core_vs_transformers.json").write_text(json.dumps(result, indent=2))
    for name, row in result["rows"].items():
        print(f"{name:<22} miaotui {row['miaotui']:8.1f}  transformers {row['transformers']:8.1f}  "
              f"speedup {row['speedup']:.2f}x")
    plot(result)


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["rows"])
    labels = ["prefill 512", "decode, batch 1", "8 prompts"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [result["rows"][n]["transformers"] for n in names], 0.4, label="transformers fp32")
    ax.bar([x + 0.2 for x in xs], [result["rows"][n]["miaotui"] for n in names], 0.4, label="miaotui (auto dtype)")
    for x, n in zip(xs, names, strict=True):
        row = result["rows"][n]
        ax.text(x + 0.2, row["miaotui"], f"{row['speedup']:.2f}×", ha="center", va="bottom")
    ax.set_xticks(list(xs), labels)
    ax.set_yscale("log")
    ax.set_ylabel("tokens / s (log)")
    ax.set_title(f"SmolLM2-135M, {result['machine']['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "core_vs_transformers.png", dpi=120)


if __name__ == "__main__":
    main()
