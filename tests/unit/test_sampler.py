"""The sampling filters, one by one, on hand-made logits."""

import torch

from miaotui.engine.sampler import Sampler, apply_repetition_penalty, filter_logits
from miaotui.engine.sampling_params import SamplingParams

LOGITS = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])


def kept(params: SamplingParams) -> list[int]:
    return torch.isfinite(filter_logits(LOGITS.clone(), params)).nonzero().flatten().tolist()


def test_top_k_keeps_k_best():
    assert kept(SamplingParams(top_k=2)) == [0, 1]


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = LOGITS.softmax(-1)  # [0.61, 0.22, 0.14, 0.03, 0.004]
    assert probs[0] < 0.7 < probs[:2].sum()
    assert kept(SamplingParams(top_p=0.7)) == [0, 1]
    assert kept(SamplingParams(top_p=0.5)) == [0]


def test_min_p_is_relative_to_the_top_probability():
    probs = LOGITS.softmax(-1)
    threshold = 0.3
    expected = (probs >= threshold * probs.max()).nonzero().flatten().tolist()
    assert kept(SamplingParams(min_p=threshold)) == expected == [0, 1]


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    seen = torch.tensor([True, False, False, True, False])
    out = apply_repetition_penalty(LOGITS, seen, 2.0)
    assert out.tolist() == [1.0, 1.0, 0.5, -2.0, -3.0]


def test_sampled_frequencies_follow_probabilities():
    sampler = Sampler()
    sampler.add_sequence(0, seed=0)
    params = [SamplingParams(temperature=1.0)]
    draws = torch.stack([sampler.sample(LOGITS[None], [0], params, None) for _ in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert torch.allclose(freq, LOGITS.softmax(-1), atol=0.03)
