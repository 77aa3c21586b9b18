"""The engine under every entry point (LLM.generate / chat / stream and the server): continuous
batching over a paged KV cache, with speculative decoding built in.

Every step the scheduler (1) drops aborted requests, (2) gives each running request one decode
token (plus drafted tokens to verify), preempting the newest requests (by recomputation) if blocks
run out, and (3) fills the rest of the token budget with prefill chunks (requests join as soon as
they fit), reusing cached prefix blocks. One forward pass then runs decode rows and prefill chunks
together. Outputs go to each request's sink, one token at a time.
Driven either step by step (LLM: `step()` until `num_unfinished` is 0) or by its own thread
(the server: `start()`; thread-safe entry points add_request and abort).
Not for HTTP (server/) or for the forward pass itself (step.py).
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from miaotui.engine.block_manager import BlockManager
from miaotui.engine.config import EngineConfig
from miaotui.engine.detokenizer import IncrementalDetokenizer
from miaotui.engine.paged_cache import PagedKVCache, blocks_for_memory
from miaotui.engine.request import EngineOutput, EngineRequest, TokenLogprob, append_token_text, validate_prompt
from miaotui.engine.sampler import Sampler
from miaotui.engine.speculative import MAX_ADAPTIVE_K, DraftModelProposer, NgramProposer, SpecStats, verify
from miaotui.engine.step import Heartbeat, PackRow, WorkerMessage, pack_rows, run_model_step
from miaotui.engine.structured import GrammarTokenizer, apply_allowed, compute_masks
from miaotui.errors import MiaotuiError

HEARTBEAT_S = 2.0
Row = tuple[EngineRequest, int, int]  # (request, first position, number of new tokens)


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
    spec_generated: int = 0  # tokens those rows produced

    @property
    def speculation(self) -> SpecStats:
        """A snapshot of the speculation counters."""
        return SpecStats(self.spec_passes, self.spec_drafted, self.spec_accepted, self.spec_generated)


class LLMEngine:
    def __init__(self, model, tokenizer, config: EngineConfig, max_model_len: int, draft_model=None,
                 num_blocks: int | None = None) -> None:
        """max_model_len: the resolved context length; draft_model: a loaded model when
        config.speculate == 'model'; num_blocks: the KV blocks (default: what config.kv_cache_mb holds)."""
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.max_model_len = max_model_len
        self.remote: Callable[[WorkerMessage], None] | None = None  # sends each step to a replica's other ranks
        self.fatal: str | None = None  # set when the engine cannot go on (e.g. a worker died)
        bs = config.block_size
        if num_blocks is None:
            num_blocks = blocks_for_memory(model.config, model.dtype, config.kv_cache_mb, bs, config.kv_cache_dtype)
        self.blocks = BlockManager(num_blocks, bs, config.enable_prefix_caching)
        self.cache = PagedKVCache(model.config, num_blocks, bs, model.dtype, model.device, config.kv_cache_dtype)
        self.proposer = None
        if config.speculate == "ngram":
            self.proposer = NgramProposer()
        elif config.speculate == "model":
            if draft_model is None:
                raise MiaotuiError("speculation by a draft model needs the draft model loaded")
            self.proposer = DraftModelProposer(draft_model, num_blocks, bs, config.kv_cache_dtype)
        # Every layer slides (Mistral, Mixtral v0.1, Phi-3): a row's blocks before its widest window
        # are given back as it grows, so a long chat holds a bounded cache. (Not with a draft model,
        # whose own cache shares the block tables.)
        whole = getattr(model, "whole_config", model.config)
        windows = [whole.window(i) for i in range(whole.num_layers)]
        self.window_span = max(windows) if None not in windows and config.speculate != "model" else None
        self.sampler = Sampler()
        self.grammar_tokenizer: GrammarTokenizer | None = None
        self.mask_worker: ThreadPoolExecutor | None = None
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

    @property
    def threaded(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def add_request(self, req: EngineRequest) -> None:
        """Validate (raises MiaotuiError with a user-facing message) and queue a request."""
        self.validate(req)
        p = req.params
        req.stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.tokenizer.eos_token_ids))
        req.detok = IncrementalDetokenizer(self.tokenizer, p.skip_special_tokens, p.stop)
        if p.structured is not None:
            req.matcher = self._grammar_tokenizer().matcher(p.structured)
        req.spec_k = self.config.speculative_tokens
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
            return len(self._incoming) + len(self.waiting) + len(self.running) + len(self._aborts)

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
                    self.remote(Heartbeat())
                    continue
                self.step()
            except Exception as exc:  # noqa: BLE001 - a failed step must fail its requests, not hang them
                message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                if self.remote is not None:  # a distributed step failed: a worker is gone; stop for good
                    self.fatal = f"distributed worker failure: {message}"
                    self.fail_all(self.fatal)
                    return
                self.fail_all(f"internal error: {message}")

    # -- one step ----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        for rid in self._take_new_requests_and_aborts():
            self._abort_now(rid)
        rows = self._schedule()
        if not rows:
            return
        self._run(rows)
        self.stats.steps += 1

    def _take_new_requests_and_aborts(self) -> set[str]:
        with self._lock:
            while self._incoming:
                req = self._incoming.popleft()
                req.seq_id = next(self._seq_ids)
                self.sampler.add_sequence(req.seq_id, req.params.seed)
                self.waiting.append(req)
            aborts, self._aborts = self._aborts, set()
        return aborts

    def abort_now(self, request_ids: set[str]) -> None:
        """Without the engine thread: finish these requests at once, no forward pass."""
        for rid in self._take_new_requests_and_aborts() | request_ids:
            self._abort_now(rid)

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

    def fail_all(self, message: str) -> None:
        """Finish every queued and running request with an error (the engine cannot run them)."""
        with self._lock:
            queued, self._incoming, self._aborts = list(self._incoming), deque(), set()
        for req in queued + list(self.waiting) + list(self.running):
            self._finish(req, "error", error=message)
        self.waiting.clear()
        self.running.clear()

    def _preempt_newest(self) -> EngineRequest:
        victim = max(self.running, key=lambda r: (r.arrival, r.seq_id))
        self.running.remove(victim)
        self.blocks.release(victim.table)
        victim.computed = victim.draft_computed = 0
        self.waiting.appendleft(victim)
        self.stats.preemptions += 1
        return victim

    def _schedule(self) -> list[Row]:
        rows: list[Row] = []
        budget = self.config.max_num_batched_tokens
        # 1. Decode: one token each for requests whose prompt is in the cache (oldest first,
        # preempting the newest when blocks run out) ...
        decoding: list[EngineRequest] = []
        for req in sorted([r for r in self.running if r.computed == len(r.tokens) - 1], key=lambda r: r.arrival):
            if req not in self.running:
                continue  # preempted below to make room for an older request
            while not self.blocks.can_grow(req.table, len(req.tokens)):
                if self._preempt_newest() is req:
                    break
            if req in self.running:
                self.blocks.grow(req.table, len(req.tokens))
                req.draft, req.draft_probs = [], None
                decoding.append(req)
                budget -= 1
        # ... then drafts to verify, from the blocks and the token budget left (never a preemption).
        drafting: list[tuple[EngineRequest, int]] = []
        for req in decoding:
            k = min(self._draft_length(req), max(budget, 0))
            if k and self.blocks.can_grow(req.table, len(req.tokens) + k):
                self.blocks.grow(req.table, len(req.tokens) + k)
                drafting.append((req, k))
                budget -= k
        if drafting:
            self.proposer.propose(drafting, [self.sampler.generator(r.seq_id) for r, _ in drafting])
        rows = [(req, req.computed, 1 + len(req.draft)) for req in decoding]
        # 2. Prefill chunks: unfinished prompts of running requests, then new requests (FCFS).
        scheduled = {id(r) for r, _, _ in rows}
        candidates = [r for r in self.running if id(r) not in scheduled and r.computed < len(r.tokens) - 1]
        for req in candidates + list(self.waiting):
            if budget <= 0:
                break
            admitting = req not in self.running
            if admitting and len(self.running) >= self.config.max_num_seqs:
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

    def _draft_length(self, req: EngineRequest) -> int:
        """Tokens to draft for a decode row: 0 without speculation, for log-probs and for logit processors
        (penalties, biases, a minimum length: verification would not see them)."""
        if self.proposer is None or req.logprobs is not None or req.params.adjusts_logits:
            return 0
        return max(0, min(req.spec_k, req.remaining))  # all accepted: the bonus token past the end is dropped

    def _run(self, rows: list[Row]) -> None:
        pack = [PackRow((req.tokens + req.draft)[start:start + n], start, req.table, bool(req.draft))
                for req, start, n in rows]
        score = any(req.prompt_logprobs is not None and start < len(req.prompt_ids) for req, start, _ in rows)
        step, offsets, row_logits = pack_rows(pack, self.blocks.block_size, score)
        if self.remote is not None:
            self.remote(step)  # the replica's other ranks run the same forward on their shards or stages
        # The masks of the constrained rows that sample after this step depend only on what they have
        # generated so far: computed on a worker thread while the forward runs (llguidance releases
        # the GIL), so the plain rows of the step do not wait for them.
        masked = [req for req, start, n in rows if req.matcher is not None and not req.draft
                  and start + n == len(req.tokens)]
        masks = self._mask_worker().submit(compute_masks, [r.matcher for r in masked],
                                           self.model.config.vocab_size) if masked else None
        logits, all_logits = run_model_step(self.model, self.cache, step)
        verified = set()
        for row, (req, start, n) in enumerate(rows):
            if req.draft:
                self._verify(req, start, logits[row_logits[row]])
                verified.add(row)
                continue
            if req.prompt_logprobs is not None and start < len(req.prompt_ids):
                self._score_prompt(req, start, n, all_logits[offsets[row]:offsets[row] + n])
            req.computed = start + n
            self.blocks.commit_full_blocks(req.table, req.tokens, req.computed)
            self._drop_passed_blocks(req)
            if start < len(req.prompt_ids):
                self.stats.prompt_tokens += min(n, len(req.prompt_ids) - start)
        sampling = [row for row, (req, start, n) in enumerate(rows)
                    if row not in verified and req.computed == len(req.tokens)]
        if not sampling:
            if masks is not None:
                masks.result()  # (the worker has read the matchers before any of them moves on)
            return
        reqs = [rows[row][0] for row in sampling]
        seen = None
        if any(r.params.repetition_penalty != 1.0 for r in reqs):
            seen = torch.zeros(len(reqs), self.model.config.vocab_size, dtype=torch.bool)
            for i, r in enumerate(reqs):
                seen[i, r.tokens] = True
        picked = logits[[row_logits[row].start for row in sampling]]  # a copy [L, V]
        if masks is not None:  # these rows only; the others are untouched
            allowed = masks.result()
            at = {id(r): i for i, r in enumerate(masked)}
            rows_here = [i for i, r in enumerate(reqs) if id(r) in at]
            if rows_here:
                apply_allowed(picked, rows_here, allowed[[at[id(reqs[i])] for i in rows_here]])
        next_tokens = self.sampler.sample(picked, [r.seq_id for r in reqs], [r.params for r in reqs], seen,
                                          [r.output_ids for r in reqs], [r.stop_ids for r in reqs])
        logprobs = torch.log_softmax(picked.float(), -1) if any(r.logprobs is not None for r in reqs) else None
        for i, req in enumerate(reqs):
            self._append(req, int(next_tokens[i]), None if logprobs is None else logprobs[i])

    def _verify(self, req: EngineRequest, start: int, logits: torch.Tensor) -> None:
        """A drafted row: logits [k + 1, V] at [pending token, d1, ..., dk]."""
        draft, req.draft = req.draft, []
        accepted, following = verify(draft, req.draft_probs, logits, req.params, self.sampler.generator(req.seq_id))
        req.draft_probs = None
        self.stats.spec_passes += 1
        self.stats.spec_drafted += len(draft)
        self.stats.spec_accepted += accepted
        if isinstance(self.proposer, DraftModelProposer):
            k_next = req.spec_k + 1 if accepted == len(draft) else req.spec_k - 1
            req.spec_k = min(max(k_next, 1), max(MAX_ADAPTIVE_K, self.config.num_speculative_tokens))
        # Keys/values of the pending token and the accepted drafts are right (in both caches); later
        # slots are overwritten when those positions are decoded again.
        req.computed = start + 1 + accepted
        req.draft_computed = min(req.draft_computed, req.computed)
        for token in draft[:accepted] + [following]:
            self.stats.spec_generated += 1
            self._append(req, token, None)
            if req not in self.running:  # finished (stop, length)
                return
        self.blocks.commit_full_blocks(req.table, req.tokens, req.computed)
        self._drop_passed_blocks(req)

    def _mask_worker(self) -> ThreadPoolExecutor:
        if self.mask_worker is None:
            self.mask_worker = ThreadPoolExecutor(1, thread_name_prefix="miaotui-masks")
        return self.mask_worker

    def _grammar_tokenizer(self) -> GrammarTokenizer:
        """llguidance's view of the tokenizer, built on the first structured request (~0.3 s)."""
        if self.grammar_tokenizer is None:
            self.grammar_tokenizer = GrammarTokenizer(self.tokenizer, self.model.config.vocab_size)
        return self.grammar_tokenizer

    def _drop_passed_blocks(self, req: EngineRequest) -> None:
        """The next query sits at position req.computed and sees keys after computed - window."""
        if self.window_span is not None:
            self.blocks.drop_before(req.table, req.computed - self.window_span)

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
            req.prompt_scores.append(_token_logprob(logp[i], token, k))

    def _append(self, req: EngineRequest, token: int, logp: torch.Tensor | None) -> None:
        req.output_ids.append(token)
        if req.matcher is not None:
            req.matcher.consume_token(token)
        self.stats.generated_tokens += 1
        out = EngineOutput(req.request_id, token_ids=[token])
        if len(req.output_ids) == 1 and req.prompt_logprobs is not None:
            out.prompt_logprobs = req.prompt_scores
        if logp is not None and req.logprobs is not None:
            out.logprobs.append(_token_logprob(logp, token, req.logprobs))
        text, reason = append_token_text(req.detok, token, req.stop_ids, len(req.output_ids), req.max_new_tokens)
        if reason is None and req.matcher is not None and req.matcher.is_stopped():
            reason, text = "stop", text + req.detok.finish()  # the structure is complete: nothing may follow
        if reason is None:
            out.text = text
            out.num_prompt_tokens, out.num_output_tokens = len(req.prompt_ids), len(req.output_ids)
            req.sink(out)
            return
        self.running.remove(req)
        self._finish(req, reason, text, out=out)


def _token_logprob(logp: torch.Tensor, token: int, k: int) -> TokenLogprob:
    top = torch.topk(logp, k) if k else None
    return TokenLogprob(token, float(logp[token]), [] if top is None else
                        list(zip(top.indices.tolist(), top.values.tolist(), strict=True)))
