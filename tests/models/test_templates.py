"""Prompt templates render the documented formats byte for byte (docs/mpt.md)."""

from __future__ import annotations

import pytest

from mpt_relax.models.mpt.templates import CHATML_SYSTEM, TemplateError, get_template

DOLLY_HEAD = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.\n\n### Instruction:\n")


def test_dolly_is_the_mpt_instruct_format():
    assert get_template("dolly").prompt("Name a color.") == DOLLY_HEAD + "Name a color.\n\n### Response:\n"


def test_chatml_single_turn_with_system():
    text = get_template("chatml").render([{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_chatml_default_system_and_multi_turn():
    text = get_template("chatml").render([
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "日本?"},
    ])
    assert text == (
        f"<|im_start|>system\n{CHATML_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n日本?<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("name", ["chatml", "none"])
def test_next_turn_continues_the_render(name):
    t = get_template(name)
    history = [{"role": "user", "content": "one"}]
    after = history + [{"role": "assistant", "content": "reply"}, {"role": "user", "content": "two"}]
    assert t.render(after) == t.render(history) + "reply" + t.next_turn("two")


def test_stop_tokens_and_defaults():
    assert get_template("chatml").stop_tokens == ("<|im_end|>", "<|endoftext|>")
    assert get_template("dolly").stop_tokens == ("<|endoftext|>",)
    assert get_template(None).name == "none" and get_template("none").prompt("raw text") == "raw text"
    assert not get_template("dolly").multi_turn and get_template("chatml").multi_turn


@pytest.mark.parametrize("name, messages, match", [
    ("dolly", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
               {"role": "user", "content": "c"}], "single instruction"),
    ("dolly", [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}], "no system message"),
    ("chatml", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "end with a user"),
    ("chatml", [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "may only come first"),
    ("chatml", [], "empty"),
    ("chatml", [{"role": "bot", "content": "a"}], "message 0 must be"),
])
def test_bad_conversations_fail_clearly(name, messages, match):
    with pytest.raises(TemplateError, match=match):
        get_template(name).render(messages)


def test_unknown_template_and_dolly_turns():
    with pytest.raises(TemplateError, match="choose one of: dolly, chatml, none"):
        get_template("alpaca")
    with pytest.raises(TemplateError, match="single instruction"):
        get_template("dolly").next_turn("more")
