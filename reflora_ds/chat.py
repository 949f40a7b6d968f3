"""Chat conversations: OpenAI ``messages`` and ShareGPT ``conversations`` rows, rendered with a chat template.

A conversation is normalised to ``[{"role", "content"}]`` (ShareGPT's
``from``/``value`` and its ``human``/``gpt`` roles mapped to OpenAI's) and
rendered with the tokenizer's own chat template, or the run's
``chat_template``. The loss covers the assistant turns only, every one of
them: what an assistant turn adds to the rendered text (its content and the
template's end-of-turn marker) is found by rendering the conversation up to
that turn with the generation prompt and up to its end, and the tokens whose
characters fall inside are trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .data import IGNORE_INDEX, DataError, add_sample

CONVERSATION_FIELDS = ("messages", "conversations")  # OpenAI, ShareGPT
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "model": "assistant", "bot": "assistant", "tool": "tool", "function": "tool", "observation": "tool"}


def conversation_field(row: Any, field: str | None = None) -> str | None:
    """The key holding a row's conversation (``field``, or one of CONVERSATION_FIELDS), if it has one."""
    if isinstance(row, dict):
        return next((key for key in ((field,) if field else CONVERSATION_FIELDS) if key in row), None)
    return None


def normalise_conversation(turns: Any) -> list[dict[str, str]]:
    """OpenAI or ShareGPT turns as ``[{"role", "content"}]``; ValueError says what is wrong."""
    if not isinstance(turns, list) or not turns:
        raise ValueError("the conversation must be a non-empty list of turns")
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {k} is {type(turn).__name__}, expected an object")
        role, content = (turn.get("role"), turn.get("content")) if "role" in turn else (turn.get("from"),
                                                                                       turn.get("value"))
        if role is None or content is None:
            raise ValueError(f"turn {k} needs role/content (OpenAI) or from/value (ShareGPT)")
        if role not in ROLES:
            raise ValueError(f"turn {k}: unknown role {role!r}; known: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"turn {k}: content is {type(content).__name__}, expected a string")
        messages.append({"role": ROLES[role], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the conversation has no assistant turn to learn from")
    return messages


def resolve_chat_template(value: str | None) -> str | None:
    """A Jinja template given inline or as a file path."""
    if value is None:
        return None
    if "{" in value:  # Jinja: {{ ... }} / {% ... %}
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise DataError(f"chat_template: {value!r} is neither a Jinja template nor a file "
                        "(give the template text, or the path of a .jinja file)")
    return path.read_text(encoding="utf-8")


def use_chat_template(tokenizer, template: str | None) -> None:
    """Make ``template`` (inline or a file) the tokenizer's chat template; None keeps the tokenizer's own."""
    resolved = resolve_chat_template(template)
    if resolved is not None:
        tokenizer.chat_template = resolved


def render(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    """The conversation as text, to be encoded with ``add_special_tokens=True``.

    A template that writes the BOS token itself would get a second one from a
    tokenizer that adds BOS when encoding, so the template's is dropped then.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("chat data, but the tokenizer has no chat template: set chat_template "
                        "(a Jinja string or a .jinja file) in the run configuration")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [
            tokenizer.bos_token_id]:
        text = text[len(bos):]
    return text


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans its assistant turns add."""
    full = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = render(tokenizer, messages[:i + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise DataError("the chat template does not render a conversation's beginning as a prefix of the "
                            "whole (it rewrites earlier turns), so the assistant turns cannot be located; "
                            "set a chat_template that renders turns in order")
        spans.append((len(before), len(through)))
    return full, spans


def tokenize_conversations(conversations: list[list[dict]], tokenizer, *, cutoff_len: int
                           ) -> tuple[dict[str, list], dict[str, int]]:
    """input_ids, labels (IGNORE_INDEX outside assistant turns) and source_row, plus counts (as tokenize_rows)."""
    if not tokenizer.is_fast:
        raise DataError("chat data needs a fast tokenizer (character offsets locate the assistant turns)")
    out: dict[str, list] = {"input_ids": [], "labels": [], "source_row": []}
    stats = {"rows": len(conversations), "truncated": 0, "dropped_no_target": 0}
    for row, messages in enumerate(conversations):
        text, spans = assistant_spans(tokenizer, messages)
        encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        # A token that reaches into an assistant turn is trained on (a merge across the turn's start must not
        # cost the answer its first token).
        labels = [token if end > start and any(start < b and end > a for a, b in spans) else IGNORE_INDEX
                  for token, (start, end) in zip(ids, encoded["offset_mapping"])]
        add_sample(out, stats, row, ids, labels, cutoff_len)
    return out, stats


def evaluation_row(tokenizer, row: dict) -> dict:
    """A chat row as evaluation sees one: the conversation up to its last assistant turn, rendered with the
    generation prompt, is the prompt; that turn is the output; ``answer`` is kept when the row has one."""
    messages = row["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    question = next((m["content"] for m in reversed(messages[:last]) if m["role"] == "user"), "")
    return {"prompt": render(tokenizer, messages[:last], add_generation_prompt=True), "instruction": question,
            "input": "", "output": messages[last]["content"], "answer": row.get("answer", "")}
