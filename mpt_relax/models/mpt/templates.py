"""Prompt templates of the MPT fine-tunes (see docs/mpt.md).

- ``dolly``: mpt-7b-instruct / mpt-30b-instruct; one instruction per prompt.
- ``chatml``: mpt-7b-chat / mpt-30b-chat; system / user / assistant turns, stops on
  ``<|im_end|>`` or ``<|endoftext|>``.
- ``none``: the text as given (base models, storywriter); turns are concatenated verbatim.

Messages are ``{"role": "system" | "user" | "assistant", "content": str}`` dicts.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence
from mpt_relax.errors import MPTRelaxError

EOS = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
DOLLY = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
# The system prompt of MosaicML's mpt-30b-chat demo and llm-foundry's ChatML format, used
# when a conversation has no system message of its own.
CHATML_SYSTEM = "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest answers."
NAMES = ("dolly", "chatml", "none")

Message = Mapping[str, str]


class TemplateError(MPTRelaxError):
    """A template name or a conversation the template cannot express."""


@dataclasses.dataclass(frozen=True)
class Template:
    """One prompt format: how a conversation becomes the text the model continues."""

    name: str
    stop_tokens: tuple[str, ...]  # special tokens that end the reply

    @property
    def multi_turn(self) -> bool:
        """Whether a conversation may hold more than one user message."""
        return self.name != "dolly"

    def prompt(self, text: str) -> str:
        """A single user message (instruction) rendered for generation."""
        return self.render([{"role": "user", "content": text}])

    def render(self, messages: Sequence[Message]) -> str:
        """The whole conversation, ending where the assistant's next reply begins.

        chatml: an optional leading system message (default :data:`CHATML_SYSTEM`), then
        alternating user / assistant turns ending with a user turn. dolly: exactly one user
        message. none: user / assistant turns ending with a user turn, concatenated.
        """
        turns = _check(messages, allow_system=self.name == "chatml")
        if self.name == "dolly":
            if len(turns) != 1:
                raise TemplateError("the dolly template holds a single instruction; use template='chatml' for a dialogue")
            return DOLLY.format(instruction=turns[0]["content"])
        if self.name == "none":
            return "".join(m["content"] for m in turns)
        system = messages[0]["content"] if messages[0]["role"] == "system" else CHATML_SYSTEM
        text = f"{IM_START}system\n{system}{IM_END}\n"
        text += "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in turns)
        return text + f"{IM_START}assistant\n"

    def next_turn(self, text: str) -> str:
        """What follows an assistant reply (as generated, without its stop token) when the user
        sends ``text``: ``render(history + [reply, user])`` equals ``render(history) + reply +
        next_turn(user)``."""
        if self.name == "dolly":
            raise TemplateError("the dolly template holds a single instruction; use template='chatml' for a dialogue")
        if self.name == "none":
            return text
        return f"{IM_END}\n{IM_START}user\n{text}{IM_END}\n{IM_START}assistant\n"


TEMPLATES = {
    "dolly": Template("dolly", (EOS,)),
    "chatml": Template("chatml", (IM_END, EOS)),
    "none": Template("none", (EOS,)),
}


def get_template(name: str | None) -> Template:
    """The template by name; ``None`` means ``"none"`` (no template)."""
    key = "none" if name is None else name
    if key not in TEMPLATES:
        raise TemplateError(f"unknown template {name!r}; choose one of: {', '.join(NAMES)}")
    return TEMPLATES[key]


def _check(messages: Sequence[Message], *, allow_system: bool) -> list[Message]:
    """The non-system turns, after checking roles, order and contents."""
    if not messages:
        raise TemplateError("the conversation is empty: give at least one user message")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("content"), str) or m.get("role") not in (
            "system", "user", "assistant"
        ):
            raise TemplateError(
                f"message {i} must be {{'role': 'system'|'user'|'assistant', 'content': str}}, got {m!r}"
            )
    turns = list(messages)
    if turns[0]["role"] == "system":
        if not allow_system:
            raise TemplateError("this template has no system message; use template='chatml' for one")
        turns = turns[1:]
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise TemplateError(
                f"turn {i} is {m['role']!r} but should be {expected!r}: a system message may only come first, "
                "then user and assistant alternate, starting and ending with user"
            )
    if not turns or turns[-1]["role"] != "user":
        raise TemplateError("the conversation must end with a user message")
    return turns
