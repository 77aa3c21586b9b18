"""The bundled WikiText-2 text: the exact published bytes, found by name or by default, and clear
errors for files that are not there."""

import hashlib

import pytest

from miaotui.data import EVALUATED_TOKENS, WIKITEXT2_TEST, default_skip, text_path
from miaotui.errors import MiaotuiError


def test_bundled_wikitext_is_the_published_test_split_byte_for_byte():
    data = WIKITEXT2_TEST.read_bytes()
    assert len(data) == 1_290_547
    assert hashlib.sha256(data).hexdigest() == "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"


def test_text_path_defaults_to_the_bundled_text_and_checks_files(tmp_path):
    assert text_path(None) == text_path("wikitext-2") == WIKITEXT2_TEST
    mine = tmp_path / "mine.txt"
    mine.write_text("hello")
    assert text_path(str(mine)) == mine
    with pytest.raises(MiaotuiError, match="calibration file '.*nope.txt' does not exist"):
        text_path(str(tmp_path / "nope.txt"), "calibration file")


def test_tuning_on_the_bundled_text_skips_the_evaluated_tokens(tmp_path):
    assert default_skip(WIKITEXT2_TEST, None) == EVALUATED_TOKENS == 40 * 512
    assert default_skip(WIKITEXT2_TEST, 0) == 0
    assert default_skip(tmp_path / "other.txt", None) == 0
