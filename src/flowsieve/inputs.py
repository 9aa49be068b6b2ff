"""Prompts: a context (the part a sieve may compress) and a question (never compressed), in tokens.

With ``chat=True`` both go into one user turn of the model's chat template, separated by a blank
line and followed by an instruction; the context's and question's token spans are located in the
rendered prompt through character offsets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from flowsieve.errors import FlowsieveError
from flowsieve.models import context_length
from flowsieve.sentences import sentence_index

MODES = ("query_aware", "query_agnostic")

DEFAULT_INSTRUCTION = "Answer briefly."


@dataclass(frozen=True)
class Prompt:
    """Token ids of a prompt and where its parts are.

    Attributes:
        ids: the whole prompt, (T,).
        context: token span [start, end) of the context.
        question: token span [start, end) of the question (and what follows it), or None.
        split: index where a query-agnostic run splits the prompt: ``ids[:split]`` is compressed
            before the question is known, ``ids[split:]`` is appended afterwards.
        sentences: per token, the index of the sentence it starts in (the sentences of
            :func:`flowsieve.sentences.sentence_spans`); empty when unknown.
            Sieves with ``units="sentence"`` keep or drop whole sentences.
    """

    ids: tuple[int, ...]
    context: tuple[int, int]
    question: tuple[int, int] | None
    split: int
    sentences: tuple[int, ...] = ()

    def sentence_units(self) -> torch.Tensor:
        """(T,) long: :attr:`sentences` as a tensor; raises when the prompt was built without text."""
        if len(self.sentences) != len(self.ids):
            raise FlowsieveError(
                "this prompt has no sentence map (build it with flowsieve.inputs.build_prompt)"
            )
        return torch.tensor(self.sentences, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.ids)


def build_prompt(
    tokenizer: Any,
    context: str,
    question: str | None = None,
    *,
    chat: bool = True,
    instruction: str | None = DEFAULT_INSTRUCTION,
) -> Prompt:
    """Render context + question (chat template or plain text) and locate the parts in tokens."""
    if context is None or not context.strip():
        raise FlowsieveError("the context is empty")
    if question is not None and not question.strip():
        raise FlowsieveError("the question is empty")
    ctx = context.strip()
    tail = ""
    if question:
        tail = "\n\n" + question.strip()
        if instruction:
            tail += "\n" + instruction
    user = ctx + tail
    if chat:
        if getattr(tokenizer, "chat_template", None) is None:
            raise FlowsieveError("this tokenizer has no chat template; use chat=False (--no-chat)")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        c0 = text.find(user)
        if c0 < 0:
            raise FlowsieveError("the chat template altered the message; cannot locate the context")
    else:
        text, c0 = user, 0
    c1 = c0 + len(ctx)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=not chat)
    ids = list(enc["input_ids"])
    offs = enc["offset_mapping"]
    starts = [a for a, _ in offs]
    ends = [b for _, b in offs]
    # context tokens: those that end inside the context; the token crossing its end goes after it
    t0 = next((i for i, e in enumerate(ends) if e > c0), len(ids))
    t1 = next((i for i, e in enumerate(ends) if e > c1), len(ids))
    qspan = None
    if question:
        q0 = c1 + 2  # after the blank line
        qs = next((i for i, s in enumerate(starts) if s >= q0), len(ids))
        qspan = (min(qs, len(ids)), len(ids))
    return Prompt(
        ids=tuple(ids), context=(t0, t1), question=qspan, split=t1, sentences=sentence_index(text, starts)
    )


def checked_prompt(
    model: Any,
    tokenizer: Any,
    context: str,
    question: str | None,
    chat: bool,
    instruction: str | None,
    mode: str,
    max_new_tokens: int,
) -> Prompt:
    """The prompt of a generation, after checking its settings and that it fits the model's context."""
    if max_new_tokens < 1:
        raise FlowsieveError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if mode not in MODES:
        raise FlowsieveError(f"mode must be 'query_aware' or 'query_agnostic', got '{mode}'")
    prompt = build_prompt(tokenizer, context, question, chat=chat, instruction=instruction)
    limit = context_length(model)
    if limit is not None and len(prompt) + max_new_tokens > limit:
        raise FlowsieveError(
            f"the prompt is {len(prompt)} tokens (+{max_new_tokens} new), longer than the model's context of {limit}"
        )
    return prompt


def encode_plain(tokenizer: Any, text: str) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def turn_end(tokenizer: Any) -> list[int]:
    """Token ids a chat template puts between a user message and the assistant's reply."""
    mark = "\u2063flowsieve-mark\u2063"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": mark}], tokenize=False, add_generation_prompt=True
    )
    return encode_plain(tokenizer, text[text.index(mark) + len(mark) :])
