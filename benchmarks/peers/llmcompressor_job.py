"""One llm-compressor run, inside its own environment (it pins transformers and compressed-tensors
versions of its own; benchmarks/quality_vs_peers.py makes that venv and calls this script there).

Reads a float Hugging Face directory and calibration token windows (a JSON list of lists, the same
windows miaotui calibrates on), runs llm-compressor's oneshot with its defaults for the scheme, saves
the compressed directory, prints one JSON line: {"seconds": wall time of oneshot, "skipped": [...]}.
Not importable by miaotui (it never imports miaotui).
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True, help="JSON: [[token ids], ...]")
    parser.add_argument("--scheme", required=True, choices=["gptq-w4a16", "smoothquant-gptq-w8a8"])
    parser.add_argument("--group-size", type=int, default=128, help="gptq-w4a16: W4A16's group (128)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()

    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    windows = json.loads(open(args.calib).read())
    data = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.scheme == "gptq-w4a16":  # llm-compressor's README example: W4A16 = int4 symmetric, g128
        weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=args.group_size)
        recipe = [GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                               ignore=["lm_head"])]
    else:  # its W8A8 example: SmoothQuant (strength 0.8) then GPTQ int8 weights, dynamic per-token activations
        recipe = [SmoothQuantModifier(smoothing_strength=0.8),
                  GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    start = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=len(windows[0]),
            num_calibration_samples=len(windows), tokenizer=tokenizer)
    seconds = time.perf_counter() - start
    model.save_pretrained(args.output, save_compressed=True)
    tokenizer.save_pretrained(args.output)
    print(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    main()
