"""Tokenize prompts and apply the length policy (`generate.max_input_tokens`, `generate.truncation`).

Truncation acts on the whole prompt's token ids, so with `middle` (the default, as LongBench does) both the
instruction at the start and the "Summary:" cue at the end survive; the BOS token is always kept.
  head:   keep the first max tokens          tail:   keep BOS + the last max - 1 tokens
  middle: keep the first max//2 + the last max - max//2 tokens          reject: the row gets an error
"""

from __future__ import annotations

import pyarrow as pa

from kvstream.pipeline.models import load_tokenizer
from kvstream.pipeline.stage import Stage, replace_column

MODES = ("head", "tail", "middle", "reject")


def apply_length_policy(ids: list[int], max_tokens: int, mode: str, bos: int | None) -> tuple[list[int], str | None]:
    """(ids within max_tokens, None) or ([], error) for `reject`. ids: token ids, BOS first when the model uses it."""
    n = len(ids)
    if n <= max_tokens:
        return ids, None
    if mode == "reject":
        return [], (
            f"prompt has {n} tokens > generate.max_input_tokens={max_tokens}; "
            "set generate.truncation=head|tail|middle to truncate instead"
        )
    if mode == "head":
        return ids[:max_tokens], None
    keep_bos = bos is not None and ids[0] == bos
    if mode == "tail":
        return (ids[:1] + ids[n - max_tokens + 1:]) if keep_bos else ids[n - max_tokens:], None
    if mode == "middle":
        half = max_tokens // 2
        return ids[:half] + ids[n - (max_tokens - half):], None
    raise ValueError(f"generate.truncation={mode!r} is not one of {', '.join(MODES)}")


class Tokenize(Stage):
    """`_prompt` (or ready `_prompt_ids`) -> `prompt_token_ids` (list<int32>), `num_input_tokens`, `truncated`;
    drops the text columns."""

    name = "tokenize"
    required = ("_prompt", "error")

    def __init__(self, model: dict, max_input_tokens: int, truncation: str):
        if truncation not in MODES:
            raise ValueError(f"generate.truncation={truncation!r} is not one of {', '.join(MODES)}")
        self.model, self.max_input_tokens, self.truncation = model, max_input_tokens, truncation

    def process(self, table: pa.Table) -> pa.Table:
        tok = load_tokenizer(self.model["path"], self.model.get("tokenizer"))
        bos = getattr(tok, "bos_token_id", None)
        ids_col, lengths, truncated, errors = [], [], [], table["error"].to_pylist()
        ready = table["_prompt_ids"].to_pylist() if "_prompt_ids" in table.column_names else [None] * table.num_rows
        for i, (prompt, given) in enumerate(zip(table["_prompt"].to_pylist(), ready)):
            ids: list[int] = []
            cut = False
            if errors[i] is None:
                ids = list(given) if given is not None else list(tok.encode(prompt))
                n = len(ids)
                ids, errors[i] = apply_length_policy(ids, self.max_input_tokens, self.truncation, bos)
                cut = errors[i] is None and len(ids) < n
                if errors[i] is None and not ids:
                    errors[i] = "prompt is empty after tokenization"
            ids_col.append(ids)
            lengths.append(len(ids))
            truncated.append(cut)
        table = table.drop_columns([c for c in ("_input", "_prompt", "_prompt_ids") if c in table.column_names])
        table = replace_column(table, "error", errors, pa.string())
        table = replace_column(table, "prompt_token_ids", ids_col, pa.list_(pa.int32()))
        table = replace_column(table, "num_input_tokens", lengths, pa.int64())
        return replace_column(table, "truncated", truncated, pa.bool_())
