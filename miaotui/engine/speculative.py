"""Lossless speculative decoding: a cheap draft proposes k tokens, the target checks them in one
forward pass, and the output is exactly the target's.

- Greedy: the longest prefix of the draft that the target would have chosen is kept, then
  the target's own next token: identical output to decoding the target alone.
- Sampling: the rule of Leviathan et al. / Chen et al. (2023). A drafted token d is accepted with
  probability min(1, p(d) / q(d)). On rejection the token is drawn from norm(max(0, p − q)).
  If every drafted token is accepted, one more token comes from p. The output distribution is
  the target's.
- Drafts: a small model sharing the tokenizer (any miaotui checkpoint: quantized, pruned,
  distilled), or prompt lookup (n-gram matching in the context, no model; q is one-hot).
- k adapts: +1 after a fully accepted draft, −1 after a rejection (within [1, k_max]).
Not for batching many requests into one step (llm_engine.py); here each sequence is decoded in turn.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from miaotui.engine.detokenizer import IncrementalDetokenizer
from miaotui.engine.generator import StreamEvent, append_token_text, validate_prompt
from miaotui.engine.sampler import filter_logits
from miaotui.engine.sampling_params import SamplingParams
from miaotui.errors import MiaotuiError
from miaotui.loaders.tokenizer import Tokenizer
from miaotui.models.llama import Transformer


@dataclass(slots=True)
class SpecStats:
    steps: int = 0  # target verification passes
    drafted: int = 0
    accepted: int = 0
    generated: int = 0

    @property
    def mean_accepted_per_step(self) -> float:
        """Tokens produced per target pass (accepted drafts + the target's own token)."""
        return self.generated / max(self.steps, 1)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [V] -> the distribution the target samples from (temperature, top-k/p, min-p)."""
    return torch.softmax(filter_logits(logits.float() / params.temperature, params), -1)


class NgramDraft:
    """Prompt lookup: find the latest earlier occurrence of the context's last n tokens (n from
    max_n down to min_n) and propose the tokens that followed it."""

    def __init__(self, max_n: int = 3, min_n: int = 1) -> None:
        self.max_n, self.min_n = max_n, min_n

    def reset(self, prompt: list[int], capacity: int) -> None:
        pass

    def propose(self, context: list[int], k: int, params: SamplingParams, generator: torch.Generator
                ) -> tuple[list[int], list[torch.Tensor] | None]:
        for n in range(self.max_n, self.min_n - 1, -1):
            if len(context) <= n:
                continue
            tail = context[-n:]
            for start in range(len(context) - n - 1, -1, -1):
                if context[start:start + n] == tail:
                    follow = context[start + n:start + n + k]
                    if follow:
                        return follow, None  # q is one-hot on each proposed token
        return [], None


class ModelDraft:
    """A small model with its own KV cache; proposes k tokens autoregressively."""

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.cache = None
        self.max_len = 0
        self.cached: list[int] = []  # tokens whose keys/values are in the draft's cache

    def reset(self, prompt: list[int], capacity: int) -> None:
        self.max_len = capacity
        self.cache = self.model.allocate_kv_cache(1, capacity)
        self.cached = []

    @torch.inference_mode()
    def propose(self, context: list[int], k: int, params: SamplingParams, generator: torch.Generator
                ) -> tuple[list[int], list[torch.Tensor] | None]:
        # Keep the cached prefix that still matches the context; feed the rest (at least one token).
        keep = 0
        while keep < min(len(self.cached), len(context) - 1) and self.cached[keep] == context[keep]:
            keep += 1
        feed = context[keep:]
        k = min(k, self.max_len - len(context) - 1)
        tokens, probs = [], []
        for _ in range(max(k, 0)):
            ids = torch.tensor([feed])
            pos = torch.arange(keep, keep + len(feed))[None]
            logits = self.model(ids, pos, self.cache, keep, None, last_only=True)[0]
            keep += len(feed)
            if params.greedy:
                token = int(logits.argmax())
            else:
                q = target_probs(logits, params)
                token = int(torch.multinomial(q, 1, generator=generator))
                probs.append(q)
            tokens.append(token)
            feed = [token]
        self.cached = context + tokens[:-1]
        return tokens, (probs if not params.greedy else None)


@dataclass(slots=True)
class _Seq:
    prompt: list[int]
    params: SamplingParams
    max_new: int
    detok: IncrementalDetokenizer
    stop_ids: set[int]
    output: list[int] = field(default_factory=list)


class SpeculativeGenerator:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_model_len: int, draft, k: int = 4,
                 k_max: int = 8, adaptive: bool = True) -> None:
        if k < 1:
            raise MiaotuiError(f"speculation length k must be >= 1, got {k}")
        self.model, self.tokenizer, self.max_model_len = model, tokenizer, max_model_len
        self.draft, self.k, self.k_max, self.adaptive = draft, k, max(k_max, k), adaptive
        self.stats = SpecStats()

    def stream(self, prompts: list[list[int]], params: list[SamplingParams]) -> Iterator[StreamEvent]:
        for req, (ids, p) in enumerate(zip(prompts, params, strict=True)):
            if p.repetition_penalty != 1.0:
                raise MiaotuiError("speculative decoding does not support repetition_penalty")
            max_new = validate_prompt(ids, p, self.max_model_len)
            stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.tokenizer.eos_token_ids))
            for sample in range(p.n):
                seq = _Seq(list(ids), p, max_new, IncrementalDetokenizer(self.tokenizer, p.skip_special_tokens,
                                                                           p.stop), stop_ids)
                seed = None if p.seed is None else p.seed + sample
                yield from self._one(req, sample, seq, seed)

    @torch.inference_mode()
    def _one(self, req: int, sample: int, seq: _Seq, seed: int | None) -> Iterator[StreamEvent]:
        gen = torch.Generator()
        gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,))))
        p = seq.params
        model = self.model
        capacity = len(seq.prompt) + seq.max_new + self.k_max + 1
        cache = model.allocate_kv_cache(1, capacity)
        self.draft.reset(seq.prompt, capacity)
        logits = model(torch.tensor([seq.prompt]), torch.arange(len(seq.prompt))[None], cache, 0, None,
                       last_only=True)[0]
        pos = len(seq.prompt)  # tokens in the target's cache
        k = self.k
        pending = self._pick(logits, p, gen)  # the next token, decided by the target
        while True:
            done, events = self._emit(req, sample, seq, pending)
            yield from events
            if done:
                return
            context = seq.prompt + seq.output
            room = seq.max_new - len(seq.output)
            drafted, q = self.draft.propose(context, min(k, room), p, gen)
            # Verify [pending token, d1..dk] in one pass: logits i predict the token after position i.
            block = [pending] + drafted
            out = model(torch.tensor([block]), torch.arange(pos, pos + len(block))[None], cache, pos, None)[0]
            pos += len(block)
            self.stats.steps += 1
            self.stats.drafted += len(drafted)
            accepted = 0
            nxt = None
            for i, d in enumerate(drafted):
                if p.greedy:
                    choice = int(out[i].argmax())
                    if choice == d:
                        accepted += 1
                        continue
                    nxt = choice
                    break
                probs = target_probs(out[i], p)
                qd = 1.0 if q is None else float(q[i][d])
                if float(torch.rand((), generator=gen)) < min(1.0, float(probs[d]) / max(qd, 1e-20)):
                    accepted += 1
                    continue
                residual = probs - (torch.nn.functional.one_hot(torch.tensor(d), probs.shape[0]).float()
                                    if q is None else q[i])
                residual = residual.clamp(min=0)
                nxt = int(torch.multinomial(residual / residual.sum(), 1, generator=gen)) if residual.sum() > 0 \
                    else int(torch.multinomial(probs, 1, generator=gen))
                break
            self.stats.accepted += accepted
            if nxt is None:  # all accepted: the bonus token comes from the last position
                nxt = self._pick(out[len(drafted)], p, gen)
            # Tokens after the last accepted draft are stale in the cache: later writes overwrite them.
            pos -= len(drafted) - accepted
            for d in drafted[:accepted]:
                done, events = self._emit(req, sample, seq, d)
                yield from events
                if done:
                    return
            if self.adaptive:
                k = min(k + 1, self.k_max) if drafted and accepted == len(drafted) else max(k - 1, 1)
            pending = nxt

    def _pick(self, logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
        if p.greedy:
            return int(logits.argmax())
        return int(torch.multinomial(target_probs(logits, p), 1, generator=gen))

    def _emit(self, req: int, sample: int, seq: _Seq, token: int) -> tuple[bool, list[StreamEvent]]:
        """Append one token of output, with the usual stop rules."""
        seq.output.append(token)
        self.stats.generated += 1
        text, reason = append_token_text(seq.detok, token, seq.stop_ids, len(seq.output), seq.max_new)
        return reason is not None, [StreamEvent(req, sample, token, text, reason is not None, reason)]
