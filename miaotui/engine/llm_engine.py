"""The serving engine: continuous batching over a paged KV cache.

Every step the scheduler (1) drops aborted requests, (2) gives each running request one decode
token, preempting the newest requests (by recomputation) if blocks run out, and (3) fills the
rest of the token budget with prefill chunks (requests join as soon as they fit), reusing
cached prefix blocks. One forward pass then runs decode rows and prefill chunks together.
Outputs go to each request's sink as deltas. Thread-safe entry points: add_request, abort.
Not for HTTP (server/) or for static batches (generator.py).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from miaotui.engine.block_manager import BlockManager
from miaotui.engine.detokenizer import IncrementalDetokenizer
from miaotui.engine.generator import append_token_text, validate_prompt
from miaotui.engine.paged_cache import AttentionGroup, PagedKVCache, kv_bytes_per_token
from miaotui.engine.sampler import Sampler
from miaotui.engine.sampling_params import SamplingParams
from miaotui.engine.speculative import NgramDraft
from miaotui.errors import MiaotuiError
from miaotui.loaders.tokenizer import Tokenizer
from miaotui.models.llama import Transformer

HEARTBEAT: tuple = ()  # an empty step: "still here", sent to distributed workers when idle
HEARTBEAT_S = 2.0


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the k most likely tokens at this position


@dataclass(slots=True)
class EngineOutput:
    """What one step produced for one request."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once, when the prompt is scored
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | error
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0


@dataclass(slots=True)
class EngineRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[EngineOutput], None]
    logprobs: int | None = None  # top-k log-probs per generated token; None = off
    prompt_logprobs: int | None = None  # score the prompt too (completions' echo + logprobs)
    # -- state, owned by the engine thread ------------------------------------------------
    seq_id: int = 0
    max_new_tokens: int = 0
    output_ids: list[int] = field(default_factory=list)
    table: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose keys/values are in the cache
    detok: IncrementalDetokenizer | None = None
    stop_ids: set[int] = field(default_factory=set)
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    prompt_scores: list[TokenLogprob | None] = field(default_factory=list)
    draft: list[int] = field(default_factory=list)  # this step's speculative tokens (prompt lookup)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids


@dataclass(slots=True)
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    finished: int = 0
    spec_passes: int = 0  # decode rows that verified drafted tokens
    spec_drafted: int = 0
    spec_accepted: int = 0


def forward_step(model: Transformer, cache: PagedKVCache, step: tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One engine forward over packed rows: -> (logits at the packed positions `last` names [L, V],
    and all logits [N, V] when prompt tokens are scored, else None). Also what the other ranks of a
    model replica run. step: tokens, positions [1, N]; slots [N]; groups, a list of AttentionGroup
    fields (token_index [G, n], gather [G, T], mask [G, 1, n, T], lengths [G, n]); last [L]; score (bool)."""
    tokens, positions, slots, groups, last, score = step
    device = model.device
    views = cache.step_views(slots.to(device), [AttentionGroup(*(t.to(device) for t in g)) for g in groups])
    hidden = model.hidden_states(tokens.to(device), positions.to(device), views)[0]  # [N, D]
    last = last.to(device)
    if score:
        all_logits = model.logits(hidden)
        return all_logits[last], all_logits
    return model.logits(hidden[last]), None


class LLMEngine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_model_len: int, kv_cache_mb: float = 256,
                 block_size: int = 16, max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
                 enable_prefix_caching: bool = True, num_blocks: int | None = None,
                 num_speculative_tokens: int = 0) -> None:
        """num_speculative_tokens > 0: greedy requests draft that many tokens by prompt lookup each
        decode step and verify them in the same forward (lossless: the output is unchanged)."""
        self.model, self.tokenizer = model, tokenizer
        self.num_speculative_tokens = num_speculative_tokens
        self.ngram = NgramDraft() if num_speculative_tokens > 0 else None
        self.remote: Callable[[tuple], None] | None = None  # sends each step to tensor-parallel workers
        self.fatal: str | None = None  # set when the engine cannot go on (e.g. a worker died)
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max(max_num_batched_tokens, 1)
        dtype = model.dtype
        if num_blocks is None:
            num_blocks = int(kv_cache_mb * 2**20) // (block_size * kv_bytes_per_token(model.config, dtype))
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.cache = PagedKVCache(model.config, num_blocks, block_size, dtype, model.device)
        self.sampler = Sampler()
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
        self.stats = EngineStats()
        self._incoming: deque[EngineRequest] = deque()
        self._aborts: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._seq_ids = itertools.count(1)
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- thread-safe API ---------------------------------------------------------------------
    @property
    def capacity_tokens(self) -> int:
        return (self.blocks.num_blocks - 1) * self.blocks.block_size

    def add_request(self, req: EngineRequest) -> None:
        """Validate (raises MiaotuiError with a user-facing message) and queue a request."""
        self.validate(req)
        p = req.params
        req.stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.tokenizer.eos_token_ids))
        req.detok = IncrementalDetokenizer(self.tokenizer, p.skip_special_tokens, p.stop)
        with self._wake:
            self._incoming.append(req)
            self._wake.notify()

    def validate(self, req: EngineRequest) -> None:
        """Raise MiaotuiError (a user-facing message) for a request this engine could never run."""
        req.max_new_tokens = validate_prompt(req.prompt_ids, req.params, self.max_model_len)
        if len(req.prompt_ids) + req.max_new_tokens > self.capacity_tokens:
            raise MiaotuiError(f"the prompt ({len(req.prompt_ids)} tokens) plus max_tokens ({req.max_new_tokens}) "
                               f"exceed the KV cache ({self.capacity_tokens} tokens): raise --kv-cache-mb")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in req.prompt_ids):
            raise MiaotuiError(f"prompt token ids must be in [0, {vocab})")

    def abort(self, request_id: str) -> None:
        with self._wake:
            self._aborts.add(request_id)
            self._wake.notify()

    @property
    def num_unfinished(self) -> int:
        with self._lock:
            return len(self._incoming) + len(self.waiting) + len(self.running)

    @property
    def num_waiting(self) -> int:
        with self._lock:
            return len(self._incoming) + len(self.waiting)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="miaotui-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            idle = False
            with self._wake:
                while not self._stop and not (self._incoming or self.waiting or self.running or self._aborts):
                    # Distributed workers block in a collective with a timeout: an idle engine pings them.
                    if not self._wake.wait(timeout=None if self.remote is None else HEARTBEAT_S):
                        idle = True
                        break
                if self._stop:
                    return
            try:
                if idle:
                    self.remote(HEARTBEAT)
                    continue
                self.step()
            except Exception as exc:  # noqa: BLE001 - a failed step must fail its requests, not hang them
                message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                if self.remote is not None:  # a distributed step failed: a worker is gone; stop for good
                    self.fatal = f"distributed worker failure: {message}"
                    self._fail_all(self.fatal)
                    return
                self._fail_all(f"internal error: {message}")

    # -- one step ----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        with self._lock:
            while self._incoming:
                req = self._incoming.popleft()
                req.seq_id = next(self._seq_ids)
                self.sampler.add_sequence(req.seq_id, req.params.seed)
                self.waiting.append(req)
            aborts, self._aborts = self._aborts, set()
        for rid in aborts:
            self._abort_now(rid)
        batch = self._schedule()
        if not batch:
            return
        self._run(batch)
        self.stats.steps += 1

    def _abort_now(self, request_id: str) -> None:
        for queue in (self.waiting, self.running):
            for req in list(queue):
                if req.request_id == request_id:
                    queue.remove(req)
                    self._finish(req, "abort")

    def _finish(self, req: EngineRequest, reason: str, text: str = "", error: str | None = None,
                out: EngineOutput | None = None) -> None:
        self.blocks.release(req.table)
        self.sampler.remove_sequence(req.seq_id)
        self.stats.finished += 1
        out = out or EngineOutput(req.request_id)
        out.text += text
        out.finished, out.finish_reason, out.error = True, reason, error
        out.num_prompt_tokens, out.num_output_tokens = len(req.prompt_ids), len(req.output_ids)
        req.sink(out)

    def _fail_all(self, message: str) -> None:
        for req in list(self.waiting) + list(self.running):
            self._finish(req, "error", error=message)
        self.waiting.clear()
        self.running.clear()

    def _preempt_newest(self) -> EngineRequest:
        victim = max(self.running, key=lambda r: r.arrival)
        self.running.remove(victim)
        self.blocks.release(victim.table)
        victim.computed = 0
        self.waiting.appendleft(victim)
        self.stats.preemptions += 1
        return victim

    def _schedule(self) -> list[tuple[EngineRequest, int, int]]:
        """-> rows (request, first position, number of tokens) for this step."""
        rows: list[tuple[EngineRequest, int, int]] = []
        budget = self.max_num_batched_tokens
        # 1. Decode: one token each for requests whose prompt is in the cache.
        for req in sorted([r for r in self.running if r.computed == len(r.tokens) - 1], key=lambda r: r.arrival):
            if req not in self.running:
                continue  # preempted below to make room for an older request
            while not self.blocks.can_grow(req.table, len(req.tokens)):
                if self._preempt_newest() is req:
                    break
            if req in self.running:
                req.draft = self._draft(req)
                if req.draft and not self.blocks.can_grow(req.table, len(req.tokens) + len(req.draft)):
                    req.draft = []  # no room to verify drafts: plain decoding this step
                self.blocks.grow(req.table, len(req.tokens) + len(req.draft))
                rows.append((req, req.computed, 1 + len(req.draft)))
                budget -= 1 + len(req.draft)
        # 2. Prefill chunks: unfinished prompts of running requests, then new requests (FCFS).
        scheduled = {id(r) for r, _, _ in rows}
        candidates = [r for r in self.running if id(r) not in scheduled and r.computed < len(r.tokens) - 1]
        for req in candidates + list(self.waiting):
            if budget <= 0:
                break
            admitting = req not in self.running
            if admitting and len(self.running) >= self.max_num_seqs:
                break
            if admitting and not req.table and req.prompt_logprobs is None:
                req.table = self.blocks.match_prefix(req.tokens)
                req.computed = len(req.table) * self.blocks.block_size
            chunk = min(len(req.tokens) - req.computed, budget)
            if not self.blocks.can_grow(req.table, req.computed + chunk):
                if admitting:
                    self.blocks.release(req.table)
                    req.computed = 0
                break
            self.blocks.grow(req.table, req.computed + chunk)
            if admitting:
                self.waiting.remove(req)
                self.running.append(req)
            rows.append((req, req.computed, chunk))
            budget -= chunk
        return rows

    def _draft(self, req: EngineRequest) -> list[int]:
        """Prompt-lookup drafts for a greedy request (sampled ones, log-probs and penalties decode plainly)."""
        p = req.params
        if self.ngram is None or not p.greedy or req.logprobs is not None or p.repetition_penalty != 1.0:
            return []
        k = min(self.num_speculative_tokens, req.max_new_tokens - len(req.output_ids) - 1)
        return self.ngram.propose(req.tokens, k, p, None)[0] if k > 0 else []

    def _run(self, rows: list[tuple[EngineRequest, int, int]]) -> None:
        model = self.model
        step, offsets, row_logits = self._pack(rows)
        if self.remote is not None:
            self.remote(step)  # tensor-parallel workers run the same forward on their shards
        logits, all_logits = forward_step(model, self.cache, step)
        for row, (req, start, n) in enumerate(rows):
            if req.draft:
                self._verify(req, start, logits[row_logits[row]])
                continue
            if req.prompt_logprobs is not None and start < len(req.prompt_ids):
                self._score_prompt(req, start, n, all_logits[offsets[row]:offsets[row] + n])
            req.computed = start + n
            self.blocks.commit_full_blocks(req.table, req.tokens, req.computed)
            if start < len(req.prompt_ids):
                self.stats.prompt_tokens += min(n, len(req.prompt_ids) - start)
        sampling = [row for row, (req, start, n) in enumerate(rows) if req.computed == len(req.tokens)]
        if not sampling:
            return
        reqs = [rows[row][0] for row in sampling]
        seen = None
        if any(r.params.repetition_penalty != 1.0 for r in reqs):
            seen = torch.zeros(len(reqs), model.config.vocab_size, dtype=torch.bool)
            for i, r in enumerate(reqs):
                seen[i, r.tokens] = True
        picked = logits[[row_logits[row].start for row in sampling]]
        next_tokens = self.sampler.sample(picked, [r.seq_id for r in reqs], [r.params for r in reqs], seen)
        logprobs = torch.log_softmax(picked.float(), -1) if any(r.logprobs is not None for r in reqs) else None
        for i, req in enumerate(reqs):
            self._append(req, int(next_tokens[i]), None if logprobs is None else logprobs[i])

    def _pack(self, rows: list[tuple[EngineRequest, int, int]]) -> tuple[tuple, list[int], list[slice]]:
        """Rows (request, first position, n new tokens) -> (the step forward_step runs, each row's
        offset on the packed token axis, each row's slice of the logits forward_step returns)."""
        bs = self.blocks.block_size
        # Plain Python lists, one tensor each at the end: per-row tensor ops cost ~1 ms a step at 16 rows.
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        offsets: list[int] = []
        for req, start, n in rows:
            offsets.append(len(tokens))
            tokens += (req.tokens + req.draft)[start:start + n] if req.draft else req.tokens[start:start + n]
            positions += range(start, start + n)
            slots += [req.table[p // bs] * bs + p % bs for p in range(start, start + n)]
        by_length: dict[int, list[int]] = {}
        for row, (_, _, n) in enumerate(rows):
            by_length.setdefault(n, []).append(row)
        groups = []
        for n, members in by_length.items():
            ends = torch.tensor([rows[r][1] + n for r in members])  # [G] keys each row has after this step
            t = int(ends.max())
            width = (t + bs - 1) // bs
            table = torch.tensor([rows[r][0].table[:width] + [0] * (width - len(rows[r][0].table[:width]))
                                  for r in members])  # [G, blocks]
            ctx = torch.arange(t)
            gather = (table[:, ctx // bs] * bs + ctx % bs) * (ctx[None, :] < ends[:, None])  # unused -> slot 0, masked
            lengths = (ends - n)[:, None] + torch.arange(1, n + 1)[None, :]  # [G, n] keys query i sees
            mask = (ctx[None, None, :] < lengths[:, :, None])[:, None]  # [G, 1, n, T]: key <= the query's position
            index = torch.tensor([offsets[r] for r in members])[:, None] + torch.arange(n)[None, :]
            groups.append((index, gather, mask, lengths))
        # Logits at each row's last new token, or at every position of a row with drafts to verify.
        last, row_logits = [], []
        for row, (req, _, n) in enumerate(rows):
            first = len(last)
            last += range(offsets[row], offsets[row] + n) if req.draft else [offsets[row] + n - 1]
            row_logits.append(slice(first, len(last)))
        score = any(req.prompt_logprobs is not None and start < len(req.prompt_ids) for req, start, _ in rows)
        step = (torch.tensor(tokens)[None], torch.tensor(positions)[None], torch.tensor(slots), groups,
                torch.tensor(last), score)
        return step, offsets, row_logits

    def _verify(self, req: EngineRequest, start: int, logits: torch.Tensor) -> None:
        """Greedy verification of a drafted row. logits: [m, V] at [pending token, d1, ..., dk].
        Accept the drafts the target itself would have picked, then the target's next token."""
        draft, req.draft = req.draft, []
        picks = logits[:len(draft) + 1].argmax(-1).tolist()
        accepted = 0
        while accepted < len(draft) and picks[accepted] == draft[accepted]:
            accepted += 1
        self.stats.spec_passes += 1
        self.stats.spec_drafted += len(draft)
        self.stats.spec_accepted += accepted
        # Keys/values of the pending token and the accepted drafts are right; later slots are
        # overwritten when those positions are decoded again.
        req.computed = start + 1 + accepted
        for token in draft[:accepted] + [picks[accepted]]:
            self._append(req, token, None)
            if req not in self.running:  # finished (stop, length)
                return
        self.blocks.commit_full_blocks(req.table, req.tokens, req.computed)

    def _score_prompt(self, req: EngineRequest, start: int, n: int, logits: torch.Tensor) -> None:
        """Log-probs of each prompt token given the ones before it (the first has none)."""
        logp = torch.log_softmax(logits.float(), -1)  # [n, V]: position start + i predicts start + i + 1
        if start == 0:
            req.prompt_scores = [None]  # (re)computed from the start, e.g. after a preemption
        k = req.prompt_logprobs or 0
        for i in range(n):
            target = start + i + 1
            if target >= len(req.prompt_ids):
                break
            token = req.prompt_ids[target]
            top = torch.topk(logp[i], k) if k else None
            req.prompt_scores.append(TokenLogprob(token, float(logp[i, token]), [] if top is None else
                                                  list(zip(top.indices.tolist(), top.values.tolist(), strict=True))))

    def _append(self, req: EngineRequest, token: int, logp: torch.Tensor | None) -> None:
        now = time.perf_counter()
        req.first_token_at = req.first_token_at or now
        req.output_ids.append(token)
        self.stats.generated_tokens += 1
        out = EngineOutput(req.request_id, token_ids=[token])
        if len(req.output_ids) == 1 and req.prompt_logprobs is not None:
            out.prompt_logprobs = req.prompt_scores
        if logp is not None and req.logprobs is not None:
            top = torch.topk(logp, req.logprobs) if req.logprobs else None
            out.logprobs.append(TokenLogprob(token, float(logp[token]), [] if top is None else
                                             list(zip(top.indices.tolist(), top.values.tolist(), strict=True))))
        text, reason = append_token_text(req.detok, token, req.stop_ids, len(req.output_ids), req.max_new_tokens)
        if reason is None:
            out.text = text
            out.num_prompt_tokens, out.num_output_tokens = len(req.prompt_ids), len(req.output_ids)
            req.sink(out)
            return
        self.running.remove(req)
        self._finish(req, reason, text, out=out)
