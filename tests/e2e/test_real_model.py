"""The real default model (SmolLM2-135M-Instruct GGUF) against Hugging Face transformers.

transformers loads the same GGUF file independently (its own dequantization and q/k un-permutation).
"""

import math
import subprocess
import sys

import pytest
import torch

from miaotui import SamplingParams
from miaotui.eval.perplexity import decode_perplexity, perplexity

pytestmark = pytest.mark.e2e

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
]


@pytest.fixture(scope="module")
def hf_model(real_model_path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        real_model_path.parent, gguf_file=real_model_path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(real_model_path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(real_model_path.parent, gguf_file=real_model_path.name)


def hf_greedy(model, ids: list[int], steps: int) -> list[int]:
    out, tokens = None, []
    with torch.inference_mode():
        out = model(torch.tensor([ids]), use_cache=True)
        for _ in range(steps):
            nxt = int(out.logits[0, -1].argmax())
            tokens.append(nxt)
            out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def test_greedy_64_tokens_match_transformers(real_llm, hf_model):
    ours = real_llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True))
    for prompt, result in zip(PROMPTS, ours, strict=True):
        ids = real_llm.tokenizer.encode(prompt)
        assert result.outputs[0].token_ids == hf_greedy(hf_model, ids, 64), prompt


def test_last_position_logits_match_transformers(real_llm, hf_model):
    for prompt in PROMPTS:
        ids = torch.tensor([real_llm.tokenizer.encode(prompt)])
        with torch.inference_mode():
            ours = real_llm.model(ids, torch.arange(ids.shape[1])[None], last_only=True)[0]
            ref = hf_model(ids).logits[0, -1]
        assert float((ours - ref).abs().max() / ref.abs().max()) < 1e-3


def test_perplexity_matches_transformers(real_llm, hf_model, wikitext):
    ids = real_llm.tokenizer.encode(wikitext.read_text(encoding="utf-8"), add_special_tokens=False)[:16384]
    ours = perplexity(real_llm.model, ids, ctx=512, stride=512, progress=False)
    nll, count = 0.0, 0
    with torch.inference_mode():
        for begin in range(0, len(ids), 512):
            window = torch.tensor([ids[begin:begin + 512]])
            loss = hf_model(window, labels=window).loss  # mean over window length - 1 targets
            nll += float(loss) * (window.shape[1] - 1)
            count += window.shape[1] - 1
    reference = math.exp(nll / count)
    assert ours.tokens == count == 32 * 511
    assert abs(ours.ppl / reference - 1) < 1e-3, (ours.ppl, reference)


def test_the_q4_1_file_runs_in_its_own_bits_with_the_float_paths_answers(real_model_path, real_llm, wikitext):
    """The default GGUF (Q4_1) runs as int4 g32 asymmetric QuantLinear layers. With float32
    activations the few-row kernels keep the activations' int8 residual, so greedy picks equal the
    float path's (real_llm: the same weights dequantized); bf16 inference stays within 0.5% perplexity."""
    from miaotui import LLM
    from miaotui.layers.quantized_linear import QuantLinear

    native = LLM(str(real_model_path), dtype="float32", gguf_weights="native", decode_weight_dtype="none")
    assert all(isinstance(m, QuantLinear) for m in (native.model.layers[0].mlp.down_proj,
                                                   native.model.layers[29].self_attn.qkv_proj))
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    ours, floats = native.generate(PROMPTS, params), real_llm.generate(PROMPTS, params)
    for prompt, a, b in zip(PROMPTS, ours, floats, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids, prompt
    served = LLM(str(real_model_path))  # what `miaotui run` loads: native, the device's dtype
    assert isinstance(served.model.layers[0].mlp.down_proj, QuantLinear)
    ids = real_llm.tokenizer.encode(wikitext.read_text(encoding="utf-8"), add_special_tokens=False)[:4096]
    reference = perplexity(real_llm.model, ids, ctx=512, score_from=256, progress=False).ppl
    got = decode_perplexity(served.model, ids, ctx=512, progress=False).ppl
    assert abs(got / reference - 1) < 5e-3, (got, reference)


TEXTS = ["Hello world", "秒推：在几秒钟内完成推理。", "Emoji 😀🚀✨ and flags 🇫🇷", "  leading spaces\n\ttabs\r\n",
         "Numbers 1234567 and 3.14159", "Mixed: café naïve résumé — “quotes”"]


def test_tokenizer_round_trips_and_matches_transformers(real_llm, hf_tokenizer):
    for text in TEXTS:
        ids = real_llm.tokenizer.encode(text)
        assert real_llm.tokenizer.decode(ids) == text
        assert ids == hf_tokenizer(text, add_special_tokens=True)["input_ids"], text


def test_chat_template_matches_transformers(real_llm, hf_tokenizer):
    conversations = [
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "你好"},
         {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Tell me a joke 😀"}],
    ]
    for messages in conversations:
        for add in (True, False):
            assert real_llm.tokenizer.apply_chat_template(messages, add) == hf_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add)


def test_chat_answers_sensibly(real_llm):
    out = real_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                        SamplingParams(temperature=0.0, max_tokens=32))[0].outputs[0]
    assert "Paris" in out.text and out.finish_reason == "stop"


def test_default_dtype_batch_equals_single(real_model_path):
    """Batching may change low-order bits (a different kernel for a batch, bf16 rounding), so a
    greedy pick may flip only where the two best tokens are nearly tied: the batched text must
    equal the single one up to the first near-tie of the single run."""
    from miaotui import LLM

    llm = LLM(str(real_model_path))  # the device default (dtype and decode copy)
    tie = 0.25 if llm.dtype in (torch.bfloat16, torch.float16) else 0.02  # logits, a few roundings
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    batched = llm.generate(PROMPTS, params)
    for prompt, result in zip(PROMPTS, batched, strict=True):
        single = llm.generate(prompt, params)[0].outputs[0].token_ids
        ids = llm.tokenizer.encode(prompt) + single
        with torch.inference_mode():
            logits = llm.model(torch.tensor([ids]), torch.arange(len(ids))[None])[0, -len(single) - 1:-1]
        top2 = logits.topk(2, dim=-1).values
        near_ties = (top2[:, 0] - top2[:, 1] < tie).nonzero()
        agree_until = int(near_ties[0]) if len(near_ties) else len(single)  # the tied pick itself may flip
        assert result.outputs[0].token_ids[:agree_until] == single[:agree_until], agree_until


def test_cli_generate_stream_with_default_model():
    proc = subprocess.run([sys.executable, "-m", "miaotui.cli", "generate", "-m", "smollm2-135m", "-p",
                           "What is the capital of France?", "--chat", "--stream", "--max-tokens", "16"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
