"""Caption rules (pure)."""

from __future__ import annotations

import pytest

from trainer_core.data.captions import apply_trigger, contains_word, dropout_caption, normalize_caption


def test_normalize_collapses_whitespace():
    assert normalize_caption("  a red\n\tsquare   moving\r\nright \n") == "a red square moving right"
    assert normalize_caption("\n \n") == ""


def test_trigger_placeholder_replaced_everywhere():
    assert apply_trigger("[trigger] waves, [trigger] smiles", "sks", False) == "sks waves, sks smiles"


def test_prepend_only_when_missing_as_whole_word():
    assert apply_trigger("a dog running", "sks", True) == "sks, a dog running"
    assert apply_trigger("a sks dog running", "sks", True) == "a sks dog running"
    assert apply_trigger("a sksdog running", "sks", True) == "sks, a sksdog running"  # not a whole word
    assert apply_trigger("", "sks", True) == "sks"
    assert apply_trigger("[trigger] jumps", "sks", True) == "sks jumps"


def test_prepend_with_ai_toolkits_space():
    # ai-toolkit, toolkit/prompt_utils.py inject_trigger_into_prompt: output_prompt = replace_with + " " + output_prompt
    assert apply_trigger("a dog running", "sks", True, " ") == "sks a dog running"
    assert apply_trigger("a sks dog", "sks", True, " ") == "a sks dog"
    assert apply_trigger("", "sks", True, " ") == "sks"


def test_no_prepend_when_off():
    assert apply_trigger("a dog", "sks", False) == "a dog"


def test_trigger_needed_but_missing():
    with pytest.raises(ValueError, match=r"\[trigger\]"):
        apply_trigger("[trigger] walks", None, False)
    with pytest.raises(ValueError, match="prepend_trigger"):
        apply_trigger("walks", None, True)
    assert apply_trigger("walks", None, False) == "walks"


def test_contains_word_handles_regex_characters():
    assert contains_word("style of a.b+ here", "a.b+")
    assert not contains_word("style of axb+ here", "a.b")


def test_dropout_threshold():
    assert dropout_caption("x", 0.3, 0.29) == ""
    assert dropout_caption("x", 0.3, 0.3) == "x"
    assert dropout_caption("x", 0.0, 0.0) == "x"
    assert dropout_caption("x", 1.0, 0.999) == ""
