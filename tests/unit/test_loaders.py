"""Both loaders (HF directory, GGUF) on tiny checkpoints, and the architectures we claim."""

import json

import gguf
import pytest
import torch

from miaotui.errors import MiaotuiError
from miaotui.loaders.load import load_model
from tests.tiny_models import write_gguf_from_hf_dir, write_hf_dir


def _logits(loaded, ids):
    x = torch.tensor([ids])
    with torch.inference_mode():
        return loaded.model(x, torch.arange(len(ids))[None])[0]


def _transformers_logits(directory, ids):
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.inference_mode():
        return ref(torch.tensor([ids])).logits[0]


IDS = [5, 17, 42, 99, 7, 3, 250, 11, 64, 8]


@pytest.mark.parametrize("arch,tie", [("llama", True), ("llama", False), ("qwen2", False), ("mistral", True)])
def test_hf_dir_logits_match_transformers(tmp_path, arch, tie):
    directory = write_hf_dir(tmp_path / arch, arch=arch, tie=tie)
    ours = _logits(load_model(directory, torch.float32), IDS)
    ref = _transformers_logits(directory, IDS)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    directory = write_hf_dir(tmp_path / "l31", rope_scaling=scaling)
    ids = list(range(3, 103))  # long enough that the scaled frequencies matter
    torch.testing.assert_close(_logits(load_model(directory, torch.float32), ids),
                               _transformers_logits(directory, ids), rtol=1e-4, atol=1e-4)


def test_gguf_f32_equals_hf_dir(tiny_hf_dir, tiny_gguf):
    from_gguf = load_model(tiny_gguf, torch.float32)
    from_hf = load_model(tiny_hf_dir, torch.float32)
    assert from_gguf.config.num_heads == 4 and from_gguf.config.num_kv_heads == 2
    assert from_gguf.config.tie_word_embeddings
    torch.testing.assert_close(_logits(from_gguf, IDS), _logits(from_hf, IDS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1"])
def test_gguf_quantized_tensors_are_dequantized(tiny_hf_dir, tmp_path, qtype):
    q = gguf.GGMLQuantizationType[qtype]
    path = write_gguf_from_hf_dir(tiny_hf_dir, tmp_path / f"{qtype}.gguf",
                                  quant={"attn_q.weight": q, "ffn_up.weight": q, "token_embd.weight": q})
    ours = _logits(load_model(path, torch.float32), IDS)
    ref = _logits(load_model(tiny_hf_dir, torch.float32), IDS)
    # Quantization moves logits a little, never wholesale; the unquantized file matches exactly.
    rel = (ours - ref).norm() / ref.norm()
    assert rel < {"F16": 1e-3, "BF16": 1e-2, "Q8_0": 2e-2}.get(qtype, 0.15), rel


def test_gguf_tokenizer_and_template_match_hf_dir(tiny_hf_dir, tiny_gguf):
    a = load_model(tiny_gguf, torch.float32).tokenizer
    b = load_model(tiny_hf_dir, torch.float32).tokenizer
    text = "Hello, hello world! 你好 😀 <|im_start|>user 123"
    assert a.encode(text) == b.encode(text)
    assert a.decode(a.encode(text)) == text.replace("<|im_start|>", "")
    msgs = [{"role": "user", "content": "hi 你好"}]
    assert a.apply_chat_template(msgs) == b.apply_chat_template(msgs)


def test_chat_template_matches_transformers(tiny_hf_dir):
    import transformers

    ref = transformers.AutoTokenizer.from_pretrained(tiny_hf_dir)
    ours = load_model(tiny_hf_dir, torch.float32).tokenizer
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 秒推?"},
            {"role": "assistant", "content": "Fast inference."}, {"role": "user", "content": "Thanks 😀"}]
    for add in (True, False):
        assert ours.apply_chat_template(msgs, add_generation_prompt=add) == ref.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=add)
        assert ours.encode_chat(msgs, add) == list(ref.apply_chat_template(
            msgs, tokenize=True, add_generation_prompt=add, return_dict=False))


def test_sharded_safetensors_load(tiny_hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    tensors = load_file(tiny_hf_dir / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, keys in halves.items():
        save_file({k: tensors[k].contiguous() for k in keys}, shard_dir / fname)
        weight_map.update({k: fname for k in keys})
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (shard_dir / f).write_bytes((tiny_hf_dir / f).read_bytes())
    torch.testing.assert_close(_logits(load_model(shard_dir, torch.float32), IDS),
                               _logits(load_model(tiny_hf_dir, torch.float32), IDS))


def test_unsupported_hf_architecture_is_named(tiny_hf_dir, tmp_path):
    bad = tmp_path / "gpt2"
    bad.mkdir()
    cfg = json.loads((tiny_hf_dir / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MiaotuiError, match="GPT2LMHeadModel"):
        load_model(bad, torch.float32)


def test_unsupported_gguf_architecture_is_named(tiny_hf_dir, tmp_path):
    path = write_gguf_from_hf_dir(tiny_hf_dir, tmp_path / "falcon.gguf", arch="falcon")
    with pytest.raises(MiaotuiError, match="falcon"):
        load_model(path, torch.float32)


def test_broken_files_give_clear_errors(tiny_hf_dir, tiny_gguf, tmp_path):
    with pytest.raises(MiaotuiError, match="does not exist|not found"):
        load_model(tmp_path / "missing.gguf", torch.float32)
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(MiaotuiError, match="not a GGUF file"):
        load_model(not_gguf, torch.float32)
    size = tiny_gguf.stat().st_size
    truncated = write_gguf_from_hf_dir(tiny_hf_dir, tmp_path / "cut.gguf", truncate_to=size - 1000)
    with pytest.raises(MiaotuiError, match="truncated"):
        load_model(truncated, torch.float32)
