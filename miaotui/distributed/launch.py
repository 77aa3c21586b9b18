"""Process groups and launching: torchrun (single or multi node) or local workers started by
miaotui itself (`--tp/--pp/--dp` on generate, bench and serve).

Rank layout: rank = dp_rank * (pp * tp) + pp_rank * tp + tp_rank. Every rank runs the same
command (SPMD); rank 0 alone prints. gloo on CPU, NCCL on CUDA. A collective that waits longer
than the timeout, or a peer that dies, becomes an error on the ranks still alive.
Not for how layers are split (tensor_parallel.py, pipeline.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from miaotui.errors import MiaotuiError

DEFAULT_TIMEOUT_S = 30  # a collective waiting longer is an error (override: MIAOTUI_DIST_TIMEOUT_S)


@dataclass(frozen=True, slots=True)
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    dp: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp"):
            if getattr(self, name) < 1:
                raise MiaotuiError(f"--{name} must be >= 1, got {getattr(self, name)}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass(slots=True)
class ParallelContext:
    config: ParallelConfig
    rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: object
    pp_group: object
    dp_group: object
    pp_ranks: list[int]  # global ranks of this rank's pipeline, stage by stage
    dp_ranks: list[int]
    model_group: object  # every rank of this rank's model replica (its tp x pp ranks)
    model_ranks: list[int]  # ... in rank order: the first is the replica's leader

    @property
    def is_driver(self) -> bool:
        return self.rank == 0


def in_distributed_env() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_local_workers(config: ParallelConfig, argv: list[str]) -> list[subprocess.Popen]:
    """Start ranks 1..W-1 of this command on this machine and make this process rank 0."""
    port = free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(config.world_size),
           "LOCAL_WORLD_SIZE": str(config.world_size)}
    os.environ.update({**{k: env[k] for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_WORLD_SIZE")},
                       "RANK": "0", "LOCAL_RANK": "0"})
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    workers = []
    for rank in range(1, config.world_size):
        log = open(logs / f"miaotui-rank{rank}-{port}.log", "w")  # noqa: SIM115 - lives as long as the worker
        workers.append(subprocess.Popen([sys.executable, "-m", "miaotui.cli", *argv],
                                        env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                        stdout=subprocess.DEVNULL, stderr=log))
    return workers


def group_layouts(config: ParallelConfig) -> dict[str, list[list[int]]]:
    """The global ranks of every tp, pp and dp group."""
    tp, pp, dp = config.tp, config.pp, config.dp

    def rank(d: int, p: int, t: int) -> int:
        return d * tp * pp + p * tp + t

    return {"tp": [[rank(d, p, t) for t in range(tp)] for d in range(dp) for p in range(pp)],
            "pp": [[rank(d, p, t) for p in range(pp)] for d in range(dp) for t in range(tp)],
            "dp": [[rank(d, p, t) for d in range(dp)] for p in range(pp) for t in range(tp)],
            "model": [[rank(d, p, t) for p in range(pp) for t in range(tp)] for d in range(dp)]}


def init_parallel(config: ParallelConfig, device: str = "cpu", timeout_s: float | None = None) -> ParallelContext:
    """Join (or reuse) the default process group and build the tp / pp / dp subgroups."""
    if timeout_s is None:
        timeout_s = float(os.environ.get("MIAOTUI_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    if not dist.is_initialized():
        if not in_distributed_env():
            raise MiaotuiError(f"{config.world_size} processes needed: run under torchrun, or use --tp/--pp/--dp "
                               f"on the miaotui command line (it starts local workers)")
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != config.world_size:
        raise MiaotuiError(f"tp x pp x dp = {config.world_size}, but {world} processes were started")
    tp, pp = config.tp, config.pp
    tp_rank, pp_rank, dp_rank = rank % tp, (rank // tp) % pp, rank // (tp * pp)
    groups: dict[str, object] = {}
    members: dict[str, list[int]] = {}
    for kind, layouts in group_layouts(config).items():
        for ranks in layouts:  # every rank must create every group, in the same order
            g = dist.new_group(ranks, timeout=timedelta(seconds=timeout_s))  # subgroups default to 30 min
            if rank in ranks:
                groups[kind], members[kind] = g, ranks
    # Identical unseeded sampling on every rank of a model replica: one shared RNG seed.
    seed = torch.tensor([int(torch.randint(0, 2**31 - 1, (1,)))])
    dist.broadcast(seed, src=0)
    torch.manual_seed(int(seed) + dp_rank)
    return ParallelContext(config, rank, tp_rank, pp_rank, dp_rank, groups["tp"], groups["pp"], groups["dp"],
                           members["pp"], members["dp"], groups["model"], members["model"])


def check_workers(workers: list[subprocess.Popen]) -> str | None:
    """A line about the first local worker that has exited with an error, if any."""
    for rank, proc in enumerate(workers, start=1):
        code = proc.poll()
        if code not in (None, 0):
            return f"worker rank {rank} exited with code {code}"
    return None
