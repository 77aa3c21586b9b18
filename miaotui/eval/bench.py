"""Speed benchmark of the real generation path: prefill, time to first token, inter-token latency.

Like llama-bench: random prompt tokens, fixed lengths, EOS ignored, medians over repeats.
Not for quality (perplexity.py) or for comparing with other tools (benchmarks/).
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Any

import torch
from tqdm import tqdm

from miaotui.api import LLM
from miaotui.engine.sampling_params import SamplingParams
from miaotui.errors import MiaotuiError
from miaotui.layers.kernel_choice import KernelLog
from miaotui.runtime import dtype_name


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def run_once(llm: LLM, prompts: list[list[int]], gen_tokens: int) -> dict[str, Any]:
    """One timed generation through the engine; -> ttft (s: every prompt prefilled, its first token
    out), the gaps between later decode steps (s), decode time (s)."""
    params = SamplingParams(temperature=0.0, max_tokens=gen_tokens, ignore_eos=True)
    step_times: dict[int, float] = {}  # engine step -> when its first token arrived
    first_token_step: dict[int, int] = {}
    tokens_per_step: dict[int, int] = {}
    start = time.perf_counter()
    for event in llm.stream(prompts, params):
        step_times.setdefault(event.step, time.perf_counter())
        first_token_step.setdefault(event.request_index, event.step)
        tokens_per_step[event.step] = tokens_per_step.get(event.step, 0) + 1
    prefilled = max(first_token_step.values())  # the step that gave the last prompt its first token
    decode = [t for step, t in sorted(step_times.items()) if step >= prefilled]
    gaps = [b - a for a, b in zip(decode, decode[1:], strict=False)]
    return {"ttft": decode[0] - start, "gaps": gaps, "decode_seconds": decode[-1] - decode[0],
            "decode_tokens": sum(n for step, n in tokens_per_step.items() if step > prefilled)}


def run_bench(llm: LLM, prompt_tokens: int = 512, gen_tokens: int = 128, batch: int = 1, repeat: int = 5,
              warmup: int = 1, seed: int = 0, progress: bool = True,
              decode_prompt_tokens: int | None = None) -> dict[str, Any]:
    """`batch` rows in all: with data parallelism each replica runs batch / dp of them at once.
    decode_prompt_tokens: measure decode in runs of their own after prompts of this length (as
    llama-bench's tg test decodes from an empty context); None: after the prefill runs' prompts."""
    if llm.parallel is not None and llm.parallel.config.dp > 1:
        if decode_prompt_tokens is not None:
            raise MiaotuiError("separate decode runs are not supported with data parallelism")
        return _run_bench_data_parallel(llm, prompt_tokens, gen_tokens, batch, repeat, warmup, seed, progress)
    return _run_bench_here(llm, prompt_tokens, gen_tokens, batch, repeat, warmup, seed, progress,
                           decode_prompt_tokens)


def _run_bench_here(llm: LLM, prompt_tokens: int, gen_tokens: int, batch: int, repeat: int, warmup: int,
                    seed: int, progress: bool, decode_prompt_tokens: int | None = None) -> dict[str, Any]:
    """This process's engine alone (with data parallelism: this replica's)."""
    generator = torch.Generator().manual_seed(seed)
    vocab = llm.config.vocab_size

    def prompts(length: int = prompt_tokens) -> list[list[int]]:  # new every run: no prefix-cache hits
        return [torch.randint(0, vocab, (length,), generator=generator).tolist() for _ in range(batch)]

    for _ in range(warmup):
        run_once(llm, prompts(), min(gen_tokens, 8))
    with KernelLog() as kernels:
        runs = [run_once(llm, prompts(), gen_tokens if decode_prompt_tokens is None else 1)
                for _ in tqdm(range(repeat), desc=f"bench b={batch} pp{prompt_tokens} tg{gen_tokens}",
                              unit="run", disable=not progress)]
        decode_runs = runs if decode_prompt_tokens is None else \
            [run_once(llm, prompts(decode_prompt_tokens), gen_tokens) for _ in range(repeat)]
    decode_tok_s = statistics.median(r["decode_tokens"] / r["decode_seconds"] for r in decode_runs) \
        if all(r["decode_seconds"] > 0 for r in decode_runs) else None
    read_bytes = llm.model.decode_read_bytes()
    gaps_ms = [g * 1000 for r in decode_runs for g in r["gaps"]]
    return {
        "model": str(llm.path),
        "dtype": dtype_name(llm.dtype),
        "decode_weight_dtype": None if llm.decode_weight_dtype is None else dtype_name(llm.decode_weight_dtype),
        "threads": torch.get_num_threads(),
        "batch": batch,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "decode_prompt_tokens": prompt_tokens if decode_prompt_tokens is None else decode_prompt_tokens,
        "repeat": repeat,
        "prefill_tok_s": statistics.median(batch * prompt_tokens / r["ttft"] for r in runs),
        "decode_tok_s": decode_tok_s,
        # weight bytes a decode step reads x steps per second (batch rows share one read)
        "decode_read_bytes": read_bytes,
        "decode_gb_s": None if decode_tok_s is None else read_bytes * decode_tok_s / batch / 1e9,
        "kernels": dict(sorted(kernels.calls.items(), key=lambda kv: -kv[1])),
        "ttft_ms": statistics.median(r["ttft"] * 1000 for r in runs),
        "itl_p50_ms": _percentile(gaps_ms, 50) if gaps_ms else None,
        "itl_p99_ms": _percentile(gaps_ms, 99) if gaps_ms else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_seconds": llm.load_seconds,
        "load_peak_rss_mb": llm.load_peak_rss_mb,
        "weight_bytes": llm.model.weight_bytes(),
        "params": llm.model.num_parameters(),
    }


def _run_bench_data_parallel(llm: LLM, prompt_tokens: int, gen_tokens: int, batch: int, repeat: int, warmup: int,
                             seed: int, progress: bool) -> dict[str, Any]:
    """Every replica times its share of the batch at the same time (they start together); the
    throughputs add up, the latencies are the slowest replica's."""
    import torch.distributed as dist

    ctx = llm.parallel
    dp = ctx.config.dp
    if batch % dp:
        raise MiaotuiError(f"--batch {batch} must be a multiple of --dp {dp} (each replica runs batch / dp rows)")
    dist.barrier()
    mine = _run_bench_here(llm, prompt_tokens, gen_tokens, batch // dp, repeat, warmup, seed + ctx.dp_rank,
                           progress and ctx.is_driver)
    replicas: list[dict[str, Any] | None] = [None] * dp
    dist.all_gather_object(replicas, mine, group=ctx.dp_group)
    result = dict(mine)
    result.update(batch=batch, data_parallel_size=dp,
                  prefill_tok_s=sum(r["prefill_tok_s"] for r in replicas),
                  decode_tok_s=None if gen_tokens <= 1 else sum(r["decode_tok_s"] for r in replicas),
                  ttft_ms=max(r["ttft_ms"] for r in replicas),
                  itl_p50_ms=None if gen_tokens <= 1 else max(r["itl_p50_ms"] for r in replicas),
                  itl_p99_ms=None if gen_tokens <= 1 else max(r["itl_p99_ms"] for r in replicas),
                  replica_decode_tok_s=[r["decode_tok_s"] for r in replicas])
    return result
