"""lm-evaluation-harness on miaotui's Python API: `MiaotuiLM(LLM(...))` is an lm_eval model
(`lm_eval.simple_evaluate(model=MiaotuiLM(llm), tasks=[...])`), scoring loglikelihoods with the
model's own forward and generating with its engine, so a task scored through the server
(`local-completions`, `local-chat-completions`) can be checked against the same task in process.

Not installed with miaotui: `pip install lm_eval` first. Not for perplexity (perplexity.py).
"""

from __future__ import annotations

import torch
from lm_eval.api.model import TemplateLM

from miaotui.engine.sampling_params import SamplingParams


class MiaotuiLM(TemplateLM):
    def __init__(self, llm) -> None:
        super().__init__()
        self.llm = llm
        self.tokenizer = llm.tokenizer

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_ids[0]

    @property
    def tokenizer_name(self) -> str:
        return "miaotui"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Sum of the continuation's log-probabilities given the context, and whether each of its
        tokens is the greedy pick."""
        model, out = self.llm.model, []
        for _, context, continuation in requests:
            ids = (context + continuation)[-self.llm.max_model_len:]
            logits = model(torch.tensor([ids]), torch.arange(len(ids))[None])[0].float()  # [T, V]
            scores = torch.log_softmax(logits[len(ids) - len(continuation) - 1:-1], dim=-1)
            wanted = torch.tensor(continuation)
            out.append((float(scores.gather(1, wanted[:, None]).sum()), bool((scores.argmax(-1) == wanted).all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("rolling loglikelihood: use `miaotui eval ppl`")

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation (temperature 0) up to the request's `until` strings and max_gen_toks, as
        the server generates for local-chat-completions / local-completions."""
        out = []
        for request in requests:
            context, kwargs = request.args
            until = kwargs.get("until") or []
            params = SamplingParams(temperature=0.0, max_tokens=int(kwargs.get("max_gen_toks", 256)),
                                    stop=[until] if isinstance(until, str) else list(until))
            ids = self.tokenizer.encode(context, add_special_tokens=False)
            out.append(self.llm.generate([ids], params)[0].outputs[0].text)
        return out
