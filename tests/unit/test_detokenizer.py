"""Incremental detokenization: UTF-8 safety and stop-string hold-back."""

from miaotui.engine.detokenizer import IncrementalDetokenizer
from miaotui.loaders.load import load_model


def _tokenizer(tiny_hf_dir):
    import torch

    return load_model(tiny_hf_dir, torch.float32).tokenizer


def test_multibyte_characters_are_never_split(tiny_hf_dir):
    tok = _tokenizer(tiny_hf_dir)
    text = "a😀b🚀你好✨ zebra 😀"
    ids = tok.encode(text)
    # The tiny vocabulary has no emoji tokens: they are split into byte tokens.
    assert len(ids) > len(text) // 2
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add_token(i) for i in ids] + [detok.finish()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_prefix_is_held_back_then_dropped(tiny_hf_dir):
    tok = _tokenizer(tiny_hf_dir)
    detok = IncrementalDetokenizer(tok, stop=["STOP"])
    shown = ""
    for i in tok.encode("hello ST"):
        shown += detok.add_token(i)
    assert shown == "hello "  # "ST" might begin "STOP": not shown yet
    for i in tok.encode("OP and more"):
        shown += detok.add_token(i)
        if detok.stopped_by:
            break
    assert detok.stopped_by == "STOP" and shown == "hello "


def test_held_back_prefix_is_released_when_it_does_not_stop(tiny_hf_dir):
    tok = _tokenizer(tiny_hf_dir)
    detok = IncrementalDetokenizer(tok, stop=["STOP"])
    shown = "".join(detok.add_token(i) for i in tok.encode("a STAR")) + detok.finish()
    assert shown == "a STAR" and detok.stopped_by is None
