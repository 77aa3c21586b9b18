"""Shared fixtures: tiny checkpoints on disk, and the real default model for end-to-end tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from miaotui.data import WIKITEXT2_TEST
from tests.tiny_models import write_gguf_from_hf_dir, write_hf_dir

torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    return write_hf_dir(tmp_path_factory.mktemp("tiny-llama-hf"))


@pytest.fixture(scope="session")
def tiny_gguf(tiny_hf_dir, tmp_path_factory) -> Path:
    return write_gguf_from_hf_dir(tiny_hf_dir, tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf")


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """family name (tests/tiny_models.py FAMILY_CONFIGS) -> its tiny checkpoint, written once per session."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = write_hf_dir(tmp_path_factory.mktemp(name), arch=name, tie=False, seed=3)
        return made[name]
    return get


@pytest.fixture(scope="session")
def tiny_llm(tiny_hf_dir):
    from miaotui import LLM

    return LLM(str(tiny_hf_dir), dtype="float32")


@pytest.fixture(scope="session")
def real_model_path() -> Path:
    from miaotui.loaders.model_store import pull

    return pull("smollm2-135m", quiet=True)


@pytest.fixture(scope="session")
def real_llm(real_model_path):
    from miaotui import LLM

    return LLM(str(real_model_path), dtype="float32")


@pytest.fixture(scope="session")
def wikitext() -> Path:
    return WIKITEXT2_TEST  # the repository's own copy (test_data.py checks its bytes)


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory, wikitext) -> Path:
    """A 60 kB slice of WikiText-2: enough calibration and training text for tiny-model tests."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(wikitext.read_text(encoding="utf-8")[:60_000])
    return path
