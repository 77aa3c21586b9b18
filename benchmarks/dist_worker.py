"""One distributed configuration, run under torchrun by benchmarks/distributed.py: times batch-1
decode and an 8-prompt batch, and measures loopback send/recv latency and bandwidth (rank 0 writes JSON)."""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
import torch.distributed as dist

from miaotui import LLM, SamplingParams


def timed(fn, repeat: int = 3) -> float:
    fn()
    runs = []
    for _ in range(repeat):
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def link() -> dict[str, float]:
    """Ping-pong between ranks 0 and 1: one-way latency (8 bytes) and bandwidth (4 MB)."""
    out = {}
    for name, numel in (("small", 2), ("large", 1 << 20)):
        x = torch.zeros(numel)

        def pingpong(x=x):
            for _ in range(20):
                if dist.get_rank() == 0:
                    dist.send(x, 1)
                    dist.recv(x, 1)
                elif dist.get_rank() == 1:
                    dist.recv(x, 0)
                    dist.send(x, 0)
        out[name] = timed(pingpong) / 40  # one-way
    return {"latency_s": out["small"], "bandwidth_Bps": (4 << 20) / max(out["large"] - out["small"], 1e-9)}


def collectives(hidden: int, vocab: int) -> dict[str, float]:
    """Seconds per call of the collectives the modes use, at decode (1 and 8 rows) and prefill
    (64 and 512 rows) sizes: all-reduce of rows x D (TP), all-gather of rows x V/2 (TP's
    vocabulary-parallel head), broadcast of rows x D (PP's hidden states)."""
    world = dist.get_world_size()
    out = {}
    for rows in (1, 8, 64, 512):
        x = torch.zeros(rows * hidden)
        out[f"all_reduce_{rows}"] = timed(lambda x=x: [dist.all_reduce(x) for _ in range(20)]) / 20
        out[f"broadcast_{rows}"] = timed(lambda x=x: [dist.broadcast(x, 0) for _ in range(20)]) / 20
        part = torch.zeros(rows * vocab // world)
        parts = [torch.empty_like(part) for _ in range(world)]
        out[f"all_gather_{rows}"] = timed(lambda p=part, ps=parts: [dist.all_gather(ps, p) for _ in range(5)]) / 5
    return out


def matmul_share(llm: LLM, prompt: list[int], gen: int) -> float:
    """Share of a batch-1 generation's CPU time spent in matrix multiplies (what TP divides)."""
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(temperature=0, max_tokens=gen, ignore_eos=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        llm.generate([prompt], params)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    return mm / total


def in_run_comm_s(llm: LLM, prompt: list[int], gen: int) -> float:
    """Seconds a batch-1 generation spends inside collectives, on this rank: the isolated timings of
    collectives() plus whatever the real pattern adds (waiting for a peer still computing)."""
    spent = [0.0]
    names = ("all_reduce", "all_gather", "broadcast", "send", "recv")
    originals = {name: getattr(dist, name) for name in names}

    def timer(fn):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
        return call

    for name, fn in originals.items():
        setattr(dist, name, timer(fn))
    try:
        runs = []
        for _ in range(3):
            spent[0] = 0.0
            dist.barrier()
            llm.generate([prompt], SamplingParams(temperature=0, max_tokens=gen, ignore_eos=True))
            runs.append(spent[0])
        return statistics.median(runs)
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def main() -> None:
    model, out, tp, pp, dp, threads, tokens = sys.argv[1:8]
    torch.set_num_threads(int(threads))
    llm = LLM(model, dtype="float32", tensor_parallel_size=int(tp), pipeline_parallel_size=int(pp),
              data_parallel_size=int(dp))
    if not dist.is_initialized():  # world size 1: no parallel model, but barriers still need a group
        dist.init_process_group("gloo")
    gen = int(tokens)
    params = SamplingParams(temperature=0, max_tokens=gen, ignore_eos=True)
    base = min(1000, llm.config.vocab_size - 80)
    prompt = list(range(base, base + 64))
    batch = [list(range(base + i, base + 64 + i)) for i in range(8)]
    one = timed(lambda: llm.generate([prompt], params))
    eight = timed(lambda: llm.generate(batch, params))
    result = {"tp": int(tp), "pp": int(pp), "dp": int(dp), "threads": int(threads), "batch1_s": one,
              "batch1_tok_s": gen / one, "batch8_s": eight, "batch8_tok_s": 8 * gen / eight}
    if dist.get_world_size() > 1:
        result["link"] = link()
        result["collectives"] = collectives(llm.config.hidden_size, llm.config.vocab_size)
        result["batch1_comm_s"] = in_run_comm_s(llm, prompt, gen)
    elif int(threads) == 1:  # the calibration run: one core, as each of two processes gets
        result["batch4_s"] = timed(lambda: llm.generate(batch[:4], params))
        result["matmul_share"] = matmul_share(llm, prompt, gen)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
