"""Prompt stages: a document into a summarization prompt, a conversation into a chat prompt.

Both emit `_prompt` (the prompt text, tokenized later with BOS) and `_prompt_ids` (token ids, set instead of the
text when a tokenizer's chat template renders the prompt: those ids already hold the special tokens). Rows with
an `error` pass through with neither.
"""

from __future__ import annotations

import json

import pyarrow as pa

from kvstream.pipeline.models import load_tokenizer
from kvstream.pipeline.stage import Stage, replace_column


class SummarizePrompt(Stage):
    """`prompt.template` with `{text}` replaced by the row's document."""

    name = "summarize_prompt"
    required = ("_input", "error")

    def __init__(self, template: str):
        if "{text}" not in template:
            raise ValueError(f"prompt.template={template!r} must contain {{text}}")
        self.template = template

    def process(self, table: pa.Table) -> pa.Table:
        prompts = [
            None if err is not None else self.template.replace("{text}", doc)
            for doc, err in zip(table["_input"].to_pylist(), table["error"].to_pylist())
        ]
        return replace_column(table, "_prompt", prompts, pa.string())


class ChatPrompt(Stage):
    """A conversation (`_input`: JSON [{role, content}, ...]) as the prompt for the next assistant turn.

    mode "auto": the tokenizer's chat template where it has one, else the plain template; "plain": always
    `system` + `turn_template` per message + `generation_prefix`.
    """

    name = "chat_prompt"
    required = ("_input", "error")

    def __init__(self, model: dict, mode: str = "auto", system: str | None = None,
                 turn_template: str = "{role}: {content}\n", generation_prefix: str = "assistant:"):
        self.model, self.mode, self.system = model, mode, system
        self.turn_template, self.generation_prefix = turn_template, generation_prefix

    def render_plain(self, messages: list[dict]) -> str:
        if self.system:
            messages = [{"role": "system", "content": self.system}] + messages
        body = "".join(self.turn_template.format(role=m["role"], content=m["content"]) for m in messages)
        return body + self.generation_prefix

    def render(self, messages: list[dict], tok) -> tuple[str | None, list[int] | None]:
        """(prompt text, None) from the plain template, or (None, token ids) from the tokenizer's template."""
        if self.mode == "auto" and getattr(tok, "chat_template", None):
            if self.system:
                messages = [{"role": "system", "content": self.system}] + messages
            return None, [int(i) for i in tok.apply_chat_template(messages)]
        return self.render_plain(messages), None

    def process(self, table: pa.Table) -> pa.Table:
        tok = load_tokenizer(self.model["path"], self.model.get("tokenizer"))
        prompts, ids, errors = [], [], table["error"].to_pylist()
        for i, (raw, err) in enumerate(zip(table["_input"].to_pylist(), errors)):
            text, toks = None, None
            if err is None:
                try:
                    text, toks = self.render(json.loads(raw), tok)
                except Exception as e:  # a template that rejects this conversation (e.g. roles out of order)
                    errors[i] = f"chat template failed: {type(e).__name__}: {e}"
            prompts.append(text)
            ids.append(toks)
        table = replace_column(table, "_prompt", prompts, pa.string())
        table = replace_column(table, "error", errors, pa.string())
        return replace_column(table, "_prompt_ids", ids, pa.list_(pa.int32()))


MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


class RequestColumn(Stage):
    """The jobs' rows as processor requests: `_input` -> `prompt` (summarize: `prompt.template` filled) or
    `messages` (converse: the conversation's [{role, content}, ...]); rows with an `error` get null."""

    name = "request_column"
    required = ("_input", "error")

    def __init__(self, task: str, template: str):
        self.task = task
        self.summarize = SummarizePrompt(template) if task == "summarize" else None  # checks {text}

    def process(self, table: pa.Table) -> pa.Table:
        errors = table["error"].to_pylist()
        if self.summarize is not None:
            t = self.summarize.process(table).drop_columns(["_input"])
            return t.rename_columns(["prompt" if c == "_prompt" else c for c in t.column_names])
        messages = [None if e is not None else json.loads(raw) for raw, e in zip(table["_input"].to_pylist(), errors)]
        return replace_column(table.drop_columns(["_input"]), "messages", messages, MESSAGES)
