"""The `miaotui` command: one subcommand per job, each a thin layer over the Python API.

Not for logic: parse, call, print. Every user mistake ends as one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from miaotui.data import default_skip, read_text, text_path
from miaotui.errors import MiaotuiError
from miaotui.loaders.model_store import DEFAULT_MODEL


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage dump: the user sees what was wrong and where to look.
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got '{text}'")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=DEFAULT_MODEL,
                   help=f"model name, .gguf file or Hugging Face directory (default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto (fastest sound one here), float32, bfloat16")
    p.add_argument("--decode-weight-dtype", default="auto",
                   help="extra narrow weight copy for batch-1 decode: auto, none, float16, bfloat16")
    p.add_argument("--gguf-weights", default="auto", choices=("auto", "native", "float"),
                   help="a GGUF file's quantized matrices: native (in their own bits), float (dequantized, "
                        "the float path); auto: native unless --dtype float32")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: all cores)")


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=_positive_int, default=1, help="tensor-parallel processes")
    p.add_argument("--pp", type=_positive_int, default=1, help="pipeline-parallel stages")
    p.add_argument("--dp", type=_positive_int, default=1, help="data-parallel replicas")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    """EngineConfig's options (engine/config.py), the same for generate, bench and serve."""
    p.add_argument("--max-model-len", type=_positive_int, default=None, help="context length (default: the model's)")
    p.add_argument("--kv-cache-mb", type=float, default=512, help="memory for the paged KV cache")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8", "fp8"],
                   help="KV-cache storage: the model's dtype, or one-byte codes with a scale per token and head "
                        "(about twice the tokens in the same memory)")
    p.add_argument("--block-size", type=_positive_int, default=16, help="tokens per KV-cache block")
    p.add_argument("--max-num-seqs", type=_positive_int, default=64, help="requests decoded together at most")
    p.add_argument("--max-num-batched-tokens", type=_positive_int, default=512,
                   help="tokens per engine step (decode rows + prefill chunks)")
    p.add_argument("--draft", default=None, help="speculative decoding with this draft model (same tokenizer)")
    p.add_argument("--speculate", default=None, choices=["ngram"], help="speculative decoding by prompt lookup")
    p.add_argument("--num-speculative-tokens", type=_positive_int, default=4,
                   help="drafted tokens per step (a draft model's adapts)")


def _engine_config(args: argparse.Namespace):
    from miaotui.engine.config import EngineConfig

    return EngineConfig(max_model_len=args.max_model_len, kv_cache_mb=args.kv_cache_mb,
                        kv_cache_dtype=args.kv_cache_dtype, block_size=args.block_size,
                        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        speculate=args.speculate, draft_model=args.draft,
                        num_speculative_tokens=args.num_speculative_tokens)


def _add_calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-file", default=None,
                   help="calibration text for methods that look at activations (default: the bundled WikiText-2)")
    p.add_argument("--calib-samples", type=_positive_int, default=128)
    p.add_argument("--calib-seq-len", type=_positive_int, default=512)
    p.add_argument("--calib-skip-tokens", type=_non_negative_int, default=None,
                   help="skip this many tokens of the file first (default: 0; for the bundled WikiText-2, "
                        "the 20,480 tokens perplexity is measured on)")


def _add_training_args(p: argparse.ArgumentParser, lr: float) -> None:
    p.add_argument("--text-file", default=None, help="training text (default: the bundled WikiText-2)")
    p.add_argument("--skip-tokens", type=_non_negative_int, default=None,
                   help="skip this many tokens of the text first (default as --calib-skip-tokens)")
    p.add_argument("--steps", type=_positive_int, default=None)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--batch", type=_positive_int, default=4)
    p.add_argument("--seq-len", type=_positive_int, default=256)
    p.add_argument("--max-minutes", type=float, default=None, help="stop early after this much training time")


def _add_sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-tokens", type=_positive_int, default=128)
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="miaotui", description="秒推 — run, compress and measure LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("pull", help="fetch a named model into the cache")
    p.add_argument("model", help="model name, e.g. smollm2-135m")
    sub.add_parser("models", help="list cached and known models")

    p = sub.add_parser("info", help="architecture, size and runtime of a model")
    _add_model_args(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("generate", help="complete one prompt")
    _add_model_args(p)
    _add_parallel_args(p)
    p.add_argument("-p", "--prompt", required=True, action="append",
                   help="prompt (repeatable: several prompts run as one batch)")
    p.add_argument("--json", action="store_true", help="print texts, token ids and finish reasons as JSON")
    _add_engine_args(p)
    _add_sampling_args(p, temperature=0.0)
    p.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")

    p = sub.add_parser("chat", help="interactive chat that keeps the history")
    _add_model_args(p)
    _add_sampling_args(p, temperature=0.7)
    p.add_argument("--system", default=None)

    p = sub.add_parser("eval", help="evaluate a model")
    eval_sub = p.add_subparsers(dest="eval_command", required=True, parser_class=_Parser)
    p = eval_sub.add_parser("ppl", help="perplexity over a text file")
    _add_model_args(p)
    p.add_argument("--text-file", default=None, help="text to score (default: the bundled WikiText-2 test split)")
    p.add_argument("--ctx", type=_positive_int, default=512)
    p.add_argument("--stride", type=_positive_int, default=None, help="window step (default: ctx)")
    p.add_argument("--score-from", type=_non_negative_int, default=0,
                   help="score predictions from this window index on (llama.cpp's protocol: ctx/2)")
    p.add_argument("--max-tokens", type=_positive_int, default=None, help="use only the first N tokens")
    p.add_argument("--kv-cache-dtype", default=None, choices=["auto", "int8", "fp8"],
                   help="score each window through a paged KV cache of this dtype (as serving runs it); "
                        "default: attention over the window's own keys and values")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("bench", help="prefill and decode speed (llama-bench style)")
    _add_model_args(p)
    _add_parallel_args(p)
    p.add_argument("--prompt-tokens", type=_positive_int, default=512)
    p.add_argument("--gen-tokens", type=_positive_int, default=128)
    p.add_argument("--batch", type=_positive_int, default=1)
    p.add_argument("--repeat", type=_positive_int, default=5)
    p.add_argument("--decode-prompt-tokens", type=_positive_int, default=None,
                   help="time decode in runs of its own after prompts of this length (1: from an empty context, "
                        "as llama-bench's tg test); default: after the --prompt-tokens prompts")
    _add_engine_args(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("quantize", help="quantize a model's linear layers and save the result")
    _add_model_args(p)
    p.add_argument("--method", required=True,
                   choices=["rtn", "gptq", "awq", "awq-gptq", "smoothquant", "smoothquant-gptq", "binary", "ternary"])
    p.add_argument("--bits", type=int, default=4, help="8, 4, 3 or 2 (ignored by binary/ternary)")
    p.add_argument("--group-size", type=int, default=128, help="columns per scale; -1 = one per output row")
    p.add_argument("--symmetric", action="store_true", help="zero point fixed at 0 (default: asymmetric)")
    p.add_argument("--integer-zero", action="store_true",
                   help="asymmetric: whole-code zero points (GPTQ / compressed-tensors; default: real-valued, as "
                        "GGUF Q4_1)")
    _add_calib_args(p)
    p.add_argument("--act-order", action="store_true", help="gptq: quantize columns by decreasing Hessian diagonal")
    p.add_argument("--damp", type=float, default=0.01, help="gptq: damping, fraction of the mean Hessian diagonal")
    p.add_argument("--alpha", type=float, default=0.5, help="smoothquant(-gptq): migration strength in [0, 1]")
    p.add_argument("--alpha-search", action="store_true",
                   help="smoothquant(-gptq): choose each layer's alpha by the W8A8 output error on calibration rows")
    p.add_argument("-o", "--output", required=True, help="output directory")

    p = sub.add_parser("qat", help="quantization-aware training, saved as a packed model")
    _add_model_args(p)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--kind", default="int", choices=["int", "ternary", "binary"])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--text-file", default=None, help="training text (default: the bundled WikiText-2)")
    p.add_argument("--skip-tokens", type=_non_negative_int, default=None,
                   help="skip this many tokens of the text first (default: 0; 20,480 for the bundled WikiText-2)")
    p.add_argument("--steps", type=_positive_int, required=True)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--batch", type=_positive_int, default=4)
    p.add_argument("--seq-len", type=_positive_int, default=256)
    p.add_argument("--max-minutes", type=float, default=None, help="stop early after this much training time")
    p.add_argument("-o", "--output", required=True)

    p = sub.add_parser("prune", help="prune a model (unstructured, N:M, structured or gradual) and save it")
    _add_model_args(p)
    p.add_argument("--method", default="magnitude", choices=["magnitude", "wanda", "sparsegpt", "taylor", "gradient"],
                   help="importance criterion (structured: magnitude, wanda, taylor or gradient)")
    p.add_argument("--sparsity", type=float, default=None, help="share removed, in [0, 1) (N:M sets it)")
    p.add_argument("--pattern", default=None, help="N:M semi-structured pattern, e.g. 2:4")
    p.add_argument("--structured", default=None, choices=["channels", "heads", "experts", "layers"],
                   help="remove whole MLP channels, attention heads, experts or layers: a smaller model")
    p.add_argument("--owl", action="store_true", help="outlier-weighted per-layer sparsity (OWL)")
    p.add_argument("--targets", action="append", default=None, help="regex of module names to prune (repeatable)")
    p.add_argument("--ignore", action="append", default=None, help="regex of module names to leave (repeatable)")
    _add_calib_args(p)
    p.add_argument("--gradual", action="store_true", help="prune gradually while fine-tuning on --text-file")
    p.add_argument("--initial-sparsity", type=float, default=0.0)
    p.add_argument("--begin-step", type=_non_negative_int, default=0)
    p.add_argument("--end-step", type=_positive_int, default=None)
    p.add_argument("--frequency", type=_positive_int, default=10)
    _add_training_args(p, lr=5e-5)
    p.add_argument("-o", "--output", required=True, help="output directory")

    p = sub.add_parser("distill", help="knowledge distillation from a teacher into a student")
    p.add_argument("--teacher", default=DEFAULT_MODEL)
    p.add_argument("--student", required=True, help="student model (e.g. a pruned teacher)")
    p.add_argument("--threads", type=_positive_int, default=None)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.1, help="weight of the hard-label cross-entropy")
    p.add_argument("--hidden-weight", type=float, default=0.0, help="weight of the final hidden-state MSE")
    p.add_argument("--grad-accum", type=_positive_int, default=1)
    p.add_argument("--autocast", default="auto", choices=["auto", "bf16", "none"])
    p.add_argument("--checkpoint-every", type=_positive_int, default=50)
    _add_training_args(p, lr=1e-4)
    p.add_argument("-o", "--output", required=True)

    p = sub.add_parser("compress", help="run a recipe of compression stages (prune, distill, quantize, ...)")
    p.add_argument("-m", "--model", default=DEFAULT_MODEL)
    p.add_argument("--recipe", required=True, help="YAML recipe (see recipes/)")
    p.add_argument("--threads", type=_positive_int, default=None)
    p.add_argument("-o", "--output", required=True)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching, paged KV cache)")
    _add_model_args(p)
    _add_parallel_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_positive_int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set MIAOTUI_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="model id clients use (default: the -m value)")
    p.add_argument("--max-queue", type=_positive_int, default=256, help="waiting requests before 429")
    p.add_argument("--max-body-mb", type=float, default=1.0, help="largest request body (413 above)")
    _add_engine_args(p)

    p = sub.add_parser("bench-serve", help="load-test a running server (throughput, TTFT, TPOT)")
    p.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8000")
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated levels")
    p.add_argument("--requests", type=_positive_int, default=64, help="requests per level")
    p.add_argument("--input-len", type=_positive_int, default=128)
    p.add_argument("--output-len", type=_positive_int, default=128)
    p.add_argument("--api-key", default=None)
    p.add_argument("--request-rate", default=None,
                   help="comma-separated requests/s (Poisson arrivals), each a run; --concurrency's first level "
                        "then caps the requests in flight")
    p.add_argument("--dataset", default=None, help="prompts from a ShareGPT-style JSON file instead of random ids")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("export-gguf", help="write the model as a GGUF file for llama.cpp")
    _add_model_args(p)
    p.add_argument("--type", required=True, choices=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1",
                                                      "q3_k", "q4_k", "q5_k", "q6_k", "q3_k_m", "q4_k_m", "q5_k_m"],
                   help="one type for every matrix, or a mix chosen per tensor as llama-quantize does (q*_k_m)")
    p.add_argument("--imatrix", action="store_true",
                   help="weigh each block's rounding by activation importance from calibration text (what "
                        "llama-imatrix gives llama-quantize); --calib-* choose the text")
    p.add_argument("--gptq", action="store_true",
                   help="round each matrix into its GGUF type by GPTQ (error feedback through the inputs' "
                        "Hessian, calibration text as --calib-*), not block by block")
    p.add_argument("--damp", type=float, default=0.01, help="--gptq: damping, fraction of the mean Hessian diagonal")
    p.add_argument("--act-order", action="store_true",
                   help="--gptq: columns by decreasing input energy, each block's grid chosen beforehand")
    p.add_argument("--awq", action="store_true",
                   help="--gptq: fold AWQ's activation-aware scales into each layer first (as awq-gptq)")
    _add_calib_args(p)
    p.add_argument("-o", "--output", required=True, help="output .gguf file")

    p = sub.add_parser("export", help="write the model as a Hugging Face directory (compressed-tensors: vLLM, "
                                      "transformers, llm-compressor's format)")
    p.add_argument("-m", "--model", default=DEFAULT_MODEL,
                   help=f"model name, .gguf file, Hugging Face or miaotui directory (default: {DEFAULT_MODEL})")
    p.add_argument("--format", default="compressed-tensors", choices=["compressed-tensors"],
                   help="integer layers as pack-quantized / int-quantized; float models as plain checkpoints")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="float tensors and scales (default bfloat16, as llm-compressor saves; float32 keeps "
                        "miaotui's scales exactly)")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: all cores)")

    p = sub.add_parser("demo", help="the showcase that `make run` runs")
    p.add_argument("-m", "--model", default=DEFAULT_MODEL)
    p.add_argument("--text-file", default=None,
                   help="text for calibration, distillation and perplexity (default: the bundled WikiText-2)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached compressed variants")
    return parser


def _load(args: argparse.Namespace):
    import torch

    from miaotui.api import LLM

    if args.threads:
        torch.set_num_threads(args.threads)
    return LLM(args.model, dtype=args.dtype, device=args.device, decode_weight_dtype=args.decode_weight_dtype,
               gguf_weights=args.gguf_weights, tensor_parallel_size=getattr(args, "tp", 1),
               pipeline_parallel_size=getattr(args, "pp", 1), data_parallel_size=getattr(args, "dp", 1),
               engine_config=_engine_config(args) if hasattr(args, "kv_cache_mb") else None)


def _sampling(args: argparse.Namespace):
    from miaotui.engine.sampling_params import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed, max_tokens=args.max_tokens,
                          stop=args.stop, ignore_eos=getattr(args, "ignore_eos", False))


def cmd_pull(args: argparse.Namespace) -> None:
    from miaotui.loaders.model_store import pull

    print(pull(args.model))


def cmd_models(args: argparse.Namespace) -> None:
    from miaotui.loaders.model_store import KNOWN_MODELS, cache_dir, list_cached

    cached = {name: (path, size) for name, path, size in list_cached()}
    print(f"cache: {cache_dir()}")
    for name, model in KNOWN_MODELS.items():
        if name in cached:
            path, size = cached[name]
            print(f"  {name:<16} {size / 2**20:8.1f} MiB  {path}")
        else:
            print(f"  {name:<16} {'':>8}      (not pulled: miaotui pull {name}) — {model.description}")


def model_info(llm) -> dict[str, Any]:
    from miaotui.kernels import native_ops
    from miaotui.runtime import describe_device, resolve_dtypes

    c = llm.config
    return {
        "path": str(llm.path), "format": llm.format, "architecture": c.architecture,
        "params": llm.model.num_parameters(), "weight_bytes": llm.model.weight_bytes(),
        "dtype": _name(llm.dtype), "decode_weight_dtype": _name(llm.decode_weight_dtype),
        "auto_dtypes": [_name(d) for d in resolve_dtypes("auto", "auto", llm.device)],
        "device": describe_device(llm.device), "context_length": c.max_position_embeddings,
        "layers": c.num_layers, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "heads": c.num_heads, "kv_heads": c.num_kv_heads, "head_dim": c.head_dim, "vocab_size": c.vocab_size,
        "tied_embeddings": c.tie_word_embeddings, "rope_theta": c.rope_theta,
        "chat_template": bool(llm.tokenizer.chat_template),
        "native_cpu_kernels": llm.device.type == "cpu" and native_ops() is not None,
        "load_seconds": llm.load_seconds, "load_peak_rss_mb": llm.load_peak_rss_mb,
    }


def _name(dtype) -> str:
    from miaotui.runtime import dtype_name

    return "none" if dtype is None else dtype_name(dtype)


def format_info(info: dict[str, Any]) -> str:
    lines = [
        f"model         {info['path']} ({info['format']})",
        f"architecture  {info['architecture']}: {info['layers']} layers, hidden {info['hidden_size']}, "
        f"MLP {info['intermediate_size']}, {info['heads']} heads / {info['kv_heads']} KV heads × {info['head_dim']}",
        f"parameters    {info['params']:,} ({info['params'] / 1e6:.1f} M)",
        f"weights       {info['weight_bytes']:,} bytes ({info['weight_bytes'] / 2**20:.1f} MiB)",
        f"dtype         {info['dtype']}, batch-1 decode copy {info['decode_weight_dtype']} "
        f"(auto here: {info['auto_dtypes'][0]}, decode copy {info['auto_dtypes'][1]})",
        f"device        {info['device']}; native CPU kernels {'on' if info['native_cpu_kernels'] else 'off'}",
        f"context       {info['context_length']:,} tokens; vocabulary {info['vocab_size']:,}",
        f"load          {info['load_seconds']:.2f} s; peak RSS {info['load_peak_rss_mb']:,.0f} MB",
    ]
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> None:
    info = model_info(_load(args))
    print(json.dumps(info, indent=2) if args.json else format_info(info))


def cmd_generate(args: argparse.Namespace) -> None:
    if any(not p for p in args.prompt):
        raise MiaotuiError("prompt is empty")
    if args.stream and (len(args.prompt) > 1 or args.dp > 1):
        raise MiaotuiError("--stream takes one prompt and no --dp")
    params = _sampling(args)
    llm = _load(args)
    prompts: list[str | list[int]] = list(args.prompt)
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompts = [llm.tokenizer.encode_chat([*system, {"role": "user", "content": p}]) for p in args.prompt]
    if args.stream:
        for event in llm.stream(prompts[0], params):
            sys.stdout.write(event.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    outputs = llm.generate(prompts, params)
    if args.json:
        print(json.dumps([{"prompt": text, "text": o.outputs[0].text, "token_ids": o.outputs[0].token_ids,
                           "finish_reason": o.outputs[0].finish_reason} for text, o in zip(args.prompt, outputs,
                                                                                          strict=True)],
                         ensure_ascii=False))
        return
    for o in outputs:
        print(o.outputs[0].text)


def cmd_chat(args: argparse.Namespace) -> None:
    llm = _load(args)
    params = _sampling(args)
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat with the model — /reset clears the history, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": text})
        reply = ""
        for event in llm.stream_chat(history, params):
            reply += event.text
            sys.stdout.write(event.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": reply})


def cmd_eval(args: argparse.Namespace) -> None:
    from miaotui.eval.perplexity import perplexity

    path = text_path(args.text_file)
    llm = _load(args)
    ids = llm.tokenizer.encode(read_text(path), add_special_tokens=False)
    if args.max_tokens:
        ids = ids[:args.max_tokens]
    result = perplexity(llm.model, ids, ctx=args.ctx, stride=args.stride, score_from=args.score_from,
                        progress=not args.json, kv_cache_dtype=args.kv_cache_dtype)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"perplexity {result.ppl:.4f} over {result.tokens:,} scored tokens "
              f"({result.windows} windows of {result.ctx}, stride {result.stride}, scored from {result.score_from}) "
              f"in {result.seconds:.1f} s")


def cmd_bench(args: argparse.Namespace) -> None:
    from miaotui.eval.bench import run_bench

    if args.batch % args.dp:  # before loading anything (run_bench checks again for API callers)
        raise MiaotuiError(f"--batch {args.batch} must be a multiple of --dp {args.dp} (each replica runs "
                           f"batch / dp rows)")
    llm = _load(args)
    if max(args.prompt_tokens, args.decode_prompt_tokens or 0) + args.gen_tokens > llm.max_model_len:
        raise MiaotuiError(f"prompt tokens + --gen-tokens exceed the context length ({llm.max_model_len})")
    result = run_bench(llm, args.prompt_tokens, args.gen_tokens, args.batch, args.repeat, progress=not args.json,
                       decode_prompt_tokens=args.decode_prompt_tokens)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"pp{args.prompt_tokens} {result['prefill_tok_s']:.1f} tok/s   tg{args.gen_tokens} "
              f"{result['decode_tok_s']:.1f} tok/s   batch {args.batch}   TTFT {result['ttft_ms']:.0f} ms   "
              f"ITL p50 {result['itl_p50_ms']:.1f} ms p99 {result['itl_p99_ms']:.1f} ms   "
              f"peak RSS {result['peak_rss_mb']:.0f} MB   ({result['dtype']}, {result['threads']} threads)")
        print(f"load {result['load_seconds']:.2f} s, peak RSS after load {result['load_peak_rss_mb']:.0f} MB")
        if result["decode_gb_s"] is not None:
            print(f"decode reads {result['decode_read_bytes'] / 1e6:.1f} MB of weights a step: "
                  f"{result['decode_gb_s']:.1f} GB/s")


def _run_one_stage(args: argparse.Namespace, model: str, stage: dict[str, Any]) -> None:
    """quantize, prune and distill are one-stage recipes: the runner `compress --recipe` uses checks
    the stage (its messages name the fields, said here as the flags) and saves the result."""
    from miaotui.compress.recipe import checkpoint_dir, parse_recipe, run_recipe

    fields = {k: v for k, v in stage.items() if v is not None}
    try:
        recipe = parse_recipe({"stages": [fields]}, f"miaotui {args.command}")
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        run_recipe(model, recipe, args.output, device=getattr(args, "device", "cpu"))
    except MiaotuiError as exc:
        raise MiaotuiError(_as_flags(str(exc), stage["stage"])) from None
    except KeyboardInterrupt:
        if stage["stage"] == "distill":
            print(f"\ninterrupted: progress saved in {checkpoint_dir(args.output)}; run the same command again "
                  f"to resume", file=sys.stderr)
        raise
    print(f"saved to {_saved(Path(args.output))}")


_FLAG_OF_FIELD = {"final_sparsity": "sparsity"}  # a recipe field whose flag has another name


def _as_flags(message: str, kind: str) -> str:
    """'stage 1 (prune): field 'calib_file' ...' -> '--calib-file ...': the words of the command line."""
    import re

    message = re.sub(r"^stage 1 \([a-z_]+\): ", "", message)
    return re.sub(r"field '(\w+)'", lambda m: "--" + _FLAG_OF_FIELD.get(m[1], m[1]).replace("_", "-"), message)


def _calib_fields(args: argparse.Namespace) -> dict[str, Any]:
    return {"calib_file": args.calib_file, "calib_samples": args.calib_samples, "calib_seq_len": args.calib_seq_len,
            "calib_skip_tokens": args.calib_skip_tokens}


def _training_fields(args: argparse.Namespace) -> dict[str, Any]:
    return {"text_file": args.text_file, "skip_tokens": args.skip_tokens, "steps": args.steps, "lr": args.lr,
            "batch": args.batch, "seq_len": args.seq_len, "max_minutes": args.max_minutes}


def cmd_quantize(args: argparse.Namespace) -> None:
    _run_one_stage(args, args.model, {
        "stage": "quantize", "method": args.method, "bits": args.bits, "group_size": args.group_size,
        "symmetric": args.symmetric, "integer_zero": args.integer_zero, "damp": args.damp,
        "act_order": args.act_order, "alpha": args.alpha, "alpha_search": args.alpha_search,
        **_calib_fields(args)})


def cmd_qat(args: argparse.Namespace) -> None:
    import hashlib

    import torch

    from miaotui.compress.quantize.qat import pack_after_qat, train_qat
    from miaotui.layers.quant_formats import QuantFormat
    from miaotui.loaders.miaotui_dir import save_model

    fmt = QuantFormat(bits=args.bits if args.kind == "int" else 2, group_size=args.group_size,
                      symmetric=args.symmetric or args.kind != "int", kind=args.kind)
    path = text_path(args.text_file)
    args.dtype, args.decode_weight_dtype = "float32", "none"
    llm = _load(args)
    data = path.read_bytes()
    ids = llm.tokenizer.encode(data.decode("utf-8", errors="replace"),
                               add_special_tokens=False)[default_skip(path, args.skip_tokens):]
    if len(ids) < args.batch * args.seq_len + 1:
        raise MiaotuiError(f"text file '{path}' is too short for --batch x --seq-len ({len(ids):,} tokens)")
    result = train_qat(llm.model, torch.tensor(ids), fmt, args.steps, lr=args.lr, batch=args.batch,
                       seq_len=args.seq_len, max_seconds=None if args.max_minutes is None else args.max_minutes * 60)
    record = pack_after_qat(llm.model, fmt, result, hashlib.sha256(data).hexdigest())
    out = save_model(llm.model, llm.tokenizer, args.output, record.to_dict())
    print(f"trained {result.steps} steps in {result.seconds:.0f} s (loss {result.first_loss:.3f} -> "
          f"{result.last_loss:.3f}); saved to {out}")


def _saved(out: Path) -> str:
    return f"{out} ({sum(f.stat().st_size for f in out.iterdir()) / 2**20:.1f} MiB on disk)"


def cmd_prune(args: argparse.Namespace) -> None:
    selection = {"method": args.method, "targets": args.targets, "ignore": args.ignore}
    if args.gradual and (args.pattern or args.structured or args.owl):
        raise MiaotuiError("--gradual prunes unstructured: drop --pattern, --structured and --owl")
    if not args.gradual and (args.steps is not None or args.end_step is not None):
        raise MiaotuiError("--steps and --end-step belong to --gradual pruning")
    if args.gradual:
        stage = {"stage": "gradual_prune", **selection, "initial_sparsity": args.initial_sparsity,
                 "final_sparsity": args.sparsity, "begin_step": args.begin_step, "end_step": args.end_step,
                 "frequency": args.frequency, **_training_fields(args)}
    else:
        stage = {"stage": "prune", **selection, "sparsity": args.sparsity, "pattern": args.pattern,
                 "structured": args.structured, "owl": args.owl, **_calib_fields(args)}
    _run_one_stage(args, args.model, stage)


def cmd_distill(args: argparse.Namespace) -> None:
    _run_one_stage(args, args.student, {
        "stage": "distill", "teacher": args.teacher, "temperature": args.temperature, "alpha": args.alpha,
        "hidden_weight": args.hidden_weight, "grad_accum": args.grad_accum, "autocast": args.autocast,
        "checkpoint_every": args.checkpoint_every, **_training_fields(args)})


def cmd_compress(args: argparse.Namespace) -> None:
    from miaotui.compress.recipe import load_recipe, run_recipe

    recipe = load_recipe(args.recipe)  # validated before any model is loaded
    rows = run_recipe(args.model, recipe, args.output, threads=args.threads)
    if rows:
        print(f"{'checkpoint':<28} {'params':>12} {'MB':>8} {'ppl':>9} {'decode tok/s':>13}")
        for r in rows:
            print(f"{r['label']:<28} {r['params']:>12,} {r['size_mb']:>8.1f} {r['ppl']:>9.2f} "
                  f"{r['decode_tok_s']:>13.1f}")
    print(f"saved to {_saved(Path(args.output))}")


def cmd_serve(args: argparse.Namespace) -> None:
    import torch
    import uvicorn

    from miaotui.server.app import ServerConfig, create_app

    if args.max_body_mb <= 0:
        raise MiaotuiError("--max-body-mb must be > 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ServerConfig(model=args.model, engine=_engine_config(args), served_model_name=args.served_model_name,
                          api_key=args.api_key or os.environ.get("MIAOTUI_API_KEY"), max_queue=args.max_queue,
                          max_body_bytes=int(args.max_body_mb * 2**20), dtype=args.dtype,
                          decode_weight_dtype=args.decode_weight_dtype, gguf_weights=args.gguf_weights,
                          device=args.device,
                          tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp, data_parallel_size=args.dp)
    if os.environ.get("RANK", "0") != "0":  # a worker: no HTTP; a replica's steps, or a replica's requests
        from miaotui.distributed.serve_worker import connect_replica, serve_replica_leader, serve_replica_worker
        from miaotui.server.app import load_llm

        llm = load_llm(config)
        ctx = llm.parallel
        if ctx.rank != ctx.model_ranks[0]:
            serve_replica_worker(llm, ctx)
            return
        engine = llm.engine
        connect_replica(engine, ctx)
        serve_replica_leader(engine, ctx)
        return
    # Bind before the app starts any worker: a worker's gloo sockets take ephemeral ports, and one of them
    # could otherwise land on --port between our check and uvicorn's bind. A taken port fails here, in a second.
    sock = _listening_socket(args.host, args.port)
    # On SIGTERM uvicorn stops accepting, lets in-flight requests finish (up to the timeout), then exits.
    server = uvicorn.Server(uvicorn.Config(create_app(config), log_level="info", timeout_graceful_shutdown=120))
    server.run(sockets=[sock])


def _listening_socket(host: str, port: int):
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise MiaotuiError(f"--host {host}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise MiaotuiError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    return sock


def cmd_bench_serve(args: argparse.Namespace) -> None:
    from miaotui.eval.bench_serve import bench_serve

    try:
        levels = [int(v) for v in args.concurrency.split(",")]
    except ValueError:
        raise MiaotuiError(f"--concurrency must be comma-separated integers, got '{args.concurrency}'") from None
    if any(v < 1 for v in levels):
        raise MiaotuiError("--concurrency levels must be >= 1")
    rates = None
    if args.request_rate:
        try:
            rates = [float(v) for v in args.request_rate.split(",")]
        except ValueError:
            raise MiaotuiError(f"--request-rate must be comma-separated numbers, got '{args.request_rate}'") from None
        if any(not r > 0 for r in rates):
            raise MiaotuiError("--request-rate values must be > 0")
    rows = bench_serve(args.url, levels, args.requests, args.input_len, args.output_len, args.api_key,
                       rates=rates, dataset=args.dataset)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'conc':>5} {'rate':>6} {'req/s':>7} {'out tok/s':>10} {'TTFT p50/p99':>14} {'TPOT p50/p99':>14} "
          f"{'ITL p50/p99':>14} {'E2E p50/p99':>15} {'failed':>7}")
    for r in rows:
        rate = "inf" if r["request_rate"] is None else f"{r['request_rate']:g}"
        print(f"{r['concurrency']:>5} {rate:>6} {r['request_throughput']:>7.2f} {r['output_tok_s']:>10.1f} "
              f"{r['ttft_p50_ms']:>6.0f}/{r['ttft_p99_ms']:<5.0f}ms "
              f"{r['tpot_p50_ms']:>6.1f}/{r['tpot_p99_ms']:<5.1f}ms "
              f"{r['itl_p50_ms']:>6.1f}/{r['itl_p99_ms']:<5.1f}ms {r['e2e_p50_ms']:>6.0f}/{r['e2e_p99_ms']:<6.0f}ms "
              f"{r['failed']:>7}")


def cmd_export_gguf(args: argparse.Namespace) -> None:
    from miaotui.compress.streamed import open_streamed
    from miaotui.loaders.gguf_export import export_gguf

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, tokenizer = open_streamed(args.model)  # one decoder layer in memory at a time
    importance = encoded = None
    if args.imatrix or args.gptq:
        from miaotui.compress.calibration import load_calibration
        from miaotui.compress.importance import activation_importance

        calib = load_calibration(args.calib_file, tokenizer, args.calib_samples, args.calib_seq_len,
                                 args.calib_skip_tokens)
        if args.gptq:
            from miaotui.compress.quantize.gguf_gptq import gptq_gguf_model
            from miaotui.loaders.gguf_mixes import EXPORT_TYPES
            from miaotui.models.registry import spec_named

            if args.type not in EXPORT_TYPES:
                raise MiaotuiError(f"unknown GGUF type '{args.type}'")
            fused = spec_named(model.config.architecture).gguf_export_arch == "phi3"
            encoded = gptq_gguf_model(model, calib, EXPORT_TYPES[args.type], fused, args.damp, args.awq,
                                      args.act_order)
        if args.imatrix:
            importance = activation_importance(model, calib)
    out = export_gguf(model, tokenizer, args.output, args.type, importance, encoded)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.type})")


def cmd_export(args: argparse.Namespace) -> None:
    from miaotui.compress.streamed import open_streamed
    from miaotui.loaders.hf_export import export_compressed_tensors

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from miaotui.loaders.hf_quant import is_quantized_hf_dir
    from miaotui.loaders.model_store import resolve_model

    path = resolve_model(args.model)
    if is_quantized_hf_dir(path):  # GPTQ / AWQ / compressed-tensors: its integer layers kept as they are
        import torch

        from miaotui.loaders.load import load_model

        loaded = load_model(path, torch.float32)
        model, tokenizer = loaded.model, loaded.tokenizer
    else:
        model, tokenizer = open_streamed(args.model)  # one decoder layer in memory at a time
    out = export_compressed_tensors(model, tokenizer, args.output, args.dtype)
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"wrote {out} ({size:.1f} MiB, {args.format}, {args.dtype})")


def cmd_demo(args: argparse.Namespace) -> None:
    from miaotui.demo import run_demo

    run_demo(args.model, args.text_file, args.rebuild)


COMMANDS = {"pull": cmd_pull, "models": cmd_models, "info": cmd_info, "generate": cmd_generate, "chat": cmd_chat,
            "eval": cmd_eval, "bench": cmd_bench, "quantize": cmd_quantize, "qat": cmd_qat,
            "export-gguf": cmd_export_gguf, "export": cmd_export, "demo": cmd_demo, "prune": cmd_prune,
            "distill": cmd_distill, "compress": cmd_compress, "serve": cmd_serve,
            "bench-serve": cmd_bench_serve}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workers = []
    world = getattr(args, "tp", 1) * getattr(args, "pp", 1) * getattr(args, "dp", 1)
    try:
        if world > 1:
            from miaotui.distributed.launch import in_distributed_env, spawn_local_workers

            if not in_distributed_env():
                # This process becomes rank 0; ranks 1.. run the same command line.
                from miaotui.distributed.launch import ParallelConfig

                workers = spawn_local_workers(ParallelConfig(args.tp, args.pp, args.dp),
                                              sys.argv[1:] if argv is None else list(argv))
            if os.environ.get("RANK", "0") != "0":
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - only rank 0 speaks
        COMMANDS[args.command](args)
    except MiaotuiError as exc:
        print(f"miaotui: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except RuntimeError as exc:
        if world <= 1:
            raise
        # gloo/NCCL: a peer died or a collective timed out. Say which worker, in one line.
        from miaotui.distributed.launch import check_workers

        time.sleep(0.5)
        detail = check_workers(workers) or str(exc).strip().splitlines()[0][:200]
        print(f"miaotui: error: distributed inference failed: {detail}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable output paths, full disks: the user's to fix, not a crash
        print(f"miaotui: error: {exc.strerror or exc}: '{exc.filename}'" if exc.filename
              else f"miaotui: error: {exc}", file=sys.stderr)
        return 2
    finally:
        _stop_workers(workers)
    return 0


def _stop_workers(workers) -> None:
    """Let local workers finish (they end with the same command) or stop them."""
    import subprocess

    for proc in workers:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
