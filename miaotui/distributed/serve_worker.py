"""Distributed serving. Rank 0 owns the HTTP server and the scheduler.

- Inside a model replica (tensor and/or pipeline parallel): the replica's leader broadcasts every
  engine step's input tensors to the replica's other ranks, which run the same forward on their
  shard or stage (joining its all-reduces, all-gathers and send/recvs) over a paged KV cache of
  the same block count.
- Across replicas (data parallel): rank 0 routes each request to the least-loaded replica. Each
  replica leader runs its own continuous-batching engine; every tick rank 0 broadcasts the new
  requests and aborts to the leaders and gathers the outputs they produced since the last tick.

Not for scheduling (engine/llm_engine.py): workers never see requests, only steps.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist

from miaotui.engine.llm_engine import LLMEngine
from miaotui.engine.paged_cache import PagedKVCache
from miaotui.engine.request import EngineOutput, EngineRequest
from miaotui.engine.sampling_params import SamplingParams
from miaotui.engine.step import ModelStep, Shutdown, WorkerMessage, run_model_step


@dataclass(frozen=True, slots=True)
class ReplicaWork:
    """Rank 0 -> replica leaders, every tick: new requests and aborts, by replica."""

    by_replica: dict[int, tuple[list[_Submit], list[str]]]


@dataclass(frozen=True, slots=True)
class ReplicaReport:
    """A replica leader -> rank 0, every tick: outputs since the last tick, its queue, its health."""

    outputs: list[EngineOutput]
    waiting: int
    fatal: str | None


TICK_BUSY_S = 0.01  # how often rank 0 exchanges with the replicas while they have work
TICK_IDLE_S = 2.0  # ... and while they have none (a heartbeat: collectives time out)


# -- inside one model replica -----------------------------------------------------------------
def broadcaster(group=None, src: int = 0):
    """The leader's side: a callable the engine hands each message to (a step, Heartbeat, Shutdown)."""

    def send(message: WorkerMessage) -> None:
        dist.broadcast_object_list([message], src=src, group=group)

    return send


@torch.inference_mode()
def run_worker(model, num_blocks: int, block_size: int, group=None, src: int = 0, kv_cache_dtype: str = "auto"
               ) -> None:
    """A non-leader rank of a model replica: run the leader's steps on this rank's shard or stage
    until it says Shutdown (or dies: the broadcast then raises). num_blocks: the count the replica's
    ranks agreed on (LLM.num_blocks), so block tables mean the same slots here."""
    cache = PagedKVCache(model.config, num_blocks, block_size, model.dtype, model.device, kv_cache_dtype)
    while True:
        box: list[WorkerMessage | None] = [None]
        dist.broadcast_object_list(box, src=src, group=group)
        message = box[0]
        if isinstance(message, Shutdown):
            return
        if isinstance(message, ModelStep):
            run_model_step(model, cache, message)


def connect_replica(engine: LLMEngine, ctx) -> None:
    """Make `engine` (on its replica's leader) drive the replica's other ranks, if it has any."""
    if len(ctx.model_ranks) > 1:
        engine.remote = broadcaster(ctx.model_group, ctx.model_ranks[0])


def serve_replica_worker(llm, ctx) -> None:
    """A non-leader rank of a replica: run the leader's steps on this rank's shard or stage."""
    run_worker(llm.model, llm.num_blocks, llm.engine_config.block_size, ctx.model_group, ctx.model_ranks[0],
               llm.engine_config.kv_cache_dtype)


# -- across replicas --------------------------------------------------------------------------
@dataclass(slots=True)
class _Submit:
    """A request as it travels to a replica (the sink stays on rank 0)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    logprobs: int | None
    prompt_logprobs: int | None


class DataParallelEngine:
    """Rank 0's engine for `serve --dp N`: replica 0 is the local engine, replicas 1..N-1 are
    reached through their leaders. Presents the LLMEngine interface the server uses."""

    def __init__(self, local: LLMEngine, ctx) -> None:
        self.local = local
        self.ctx = ctx
        self.dp = ctx.config.dp
        self.model, self.tokenizer, self.blocks, self.stats = local.model, local.tokenizer, local.blocks, local.stats
        self._fatal: str | None = None
        self._lock = threading.Condition()
        self._outbox: dict[int, list[_Submit]] = defaultdict(list)
        self._aborts: dict[int, list[str]] = defaultdict(list)
        self._remote: dict[str, tuple[int, EngineRequest]] = {}  # request id -> (replica, request)
        self._replica_load = [0] * self.dp  # unfinished requests per replica (0 = local, counted live)
        self._replica_waiting = [0] * self.dp
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- the LLMEngine interface --------------------------------------------------------------
    @property
    def fatal(self) -> str | None:
        return self._fatal or self.local.fatal

    @property
    def remote(self):
        return self.local.remote

    @property
    def running(self) -> list:
        with self._lock:
            remote_running = sum(self._replica_load[1:]) - sum(self._replica_waiting[1:])
        return list(self.local.running) + [None] * max(0, remote_running)

    @property
    def num_waiting(self) -> int:
        with self._lock:
            queued = sum(len(v) for v in self._outbox.values()) + sum(self._replica_waiting[1:])
        return self.local.num_waiting + queued

    def add_request(self, req: EngineRequest) -> None:
        self.local.validate(req)  # every replica has the same model and cache size
        with self._lock:
            loads = [self.local.num_unfinished] + self._replica_load[1:]
            replica = min(range(self.dp), key=lambda r: loads[r])
            if replica == 0:
                self.local.add_request(req)
                return
            self._replica_load[replica] += 1
            self._remote[req.request_id] = (replica, req)
            self._outbox[replica].append(_Submit(req.request_id, req.prompt_ids, req.params, req.logprobs,
                                                 req.prompt_logprobs))
            self._lock.notify()

    def abort(self, request_id: str) -> None:
        with self._lock:
            target = self._remote.get(request_id)
            if target is None:
                self.local.abort(request_id)
                return
            self._aborts[target[0]].append(request_id)
            self._lock.notify()

    def start(self) -> None:
        self.local.start()
        self._thread = threading.Thread(target=self._coordinate, name="miaotui-dp", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.local.stop()

    # -- the coordinator thread -------------------------------------------------------------
    def _coordinate(self) -> None:
        group = self.ctx.dp_group
        try:
            while True:
                with self._lock:
                    busy = bool(self._remote)
                    if not self._stop and not self._outbox and not self._aborts:
                        self._lock.wait(timeout=TICK_BUSY_S if busy else TICK_IDLE_S)
                    if self._stop:
                        dist.broadcast_object_list([Shutdown()], src=0, group=group)
                        return
                    work = ReplicaWork({r: (self._outbox.pop(r, []), self._aborts.pop(r, []))
                                        for r in range(1, self.dp)})
                dist.broadcast_object_list([work], src=0, group=group)
                gathered: list = [None] * self.dp
                dist.gather_object(ReplicaReport([], 0, None), gathered, dst=0, group=group)
                self._deliver(gathered)
        except Exception as exc:  # noqa: BLE001 - a replica died or hung: fail its requests, turn unhealthy
            message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            self._fail_remote(f"distributed worker failure: {message}")

    def _deliver(self, gathered: list) -> None:
        for replica in range(1, self.dp):
            report: ReplicaReport = gathered[replica]
            outputs, waiting, fatal = report.outputs, report.waiting, report.fatal
            if fatal and not self._fatal:  # a rank inside that replica died: the server turns unhealthy
                self._fatal = f"replica {replica}: {fatal}"
            with self._lock:
                self._replica_waiting[replica] = waiting
            for out in outputs:
                with self._lock:
                    entry = self._remote.get(out.request_id)
                    if entry is not None and out.finished:
                        del self._remote[out.request_id]
                        self._replica_load[replica] -= 1
                if entry is not None:
                    entry[1].sink(out)

    def _fail_remote(self, message: str) -> None:
        self._fatal = message
        with self._lock:
            failed, self._remote = list(self._remote.values()), {}
        for _, req in failed:
            req.sink(EngineOutput(req.request_id, finished=True, finish_reason="error", error=message))


def serve_replica_leader(engine: LLMEngine, ctx) -> None:
    """A replica leader (dp rank > 0): run requests rank 0 routes here until it says stop."""
    outbox: list[EngineOutput] = []
    lock = threading.Lock()

    def sink(out: EngineOutput) -> None:
        with lock:
            outbox.append(out)

    engine.start()
    try:
        while True:
            box: list[ReplicaWork | Shutdown | None] = [None]
            dist.broadcast_object_list(box, src=0, group=ctx.dp_group)
            if isinstance(box[0], Shutdown):
                return
            new, aborts = box[0].by_replica[ctx.dp_rank]
            for sub in new:
                if engine.fatal:  # this replica can no longer run anything: answer at once
                    sink(EngineOutput(sub.request_id, finished=True, finish_reason="error", error=engine.fatal))
                    continue
                engine.add_request(EngineRequest(sub.request_id, sub.prompt_ids, sub.params, sink,
                                                 logprobs=sub.logprobs, prompt_logprobs=sub.prompt_logprobs))
            for request_id in aborts:
                engine.abort(request_id)
            with lock:
                ready, outbox[:] = list(outbox), []
            dist.gather_object(ReplicaReport(ready, engine.num_waiting, engine.fatal), None, dst=0, group=ctx.dp_group)
    finally:
        engine.stop()
        if engine.remote is not None and engine.fatal is None:
            engine.remote(Shutdown())
