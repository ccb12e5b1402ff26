"""The processor's row requests: the user's preprocess, then `prompt` / `messages` + `sampling_params` + `kv_cache`
into prompt token ids under the length policy (kvstream/pipeline/processor.py composes it).

A row's request (ray.data.llm's contract, with our cache budget):
  prompt: str, tokenized with BOS as is | messages: [{role, content}, ...], rendered by the tokenizer's chat
    template (apply_chat_template=True and the tokenizer has one; else the plain `role: content` turns of the
    converse job) -- exactly one of the two per row;
  sampling_params: {max_tokens, temperature, top_p, stop, seed}, over the config's defaults key by key (a key whose
    value is null is unset: Arrow struct columns fill keys other rows have with nulls);
  kv_cache: this row's cache budget, a float in (0, 1] (a fraction of its prompt) or an int token count.
A bad request (unknown key, bad value, no prompt, a prompt over the limit with truncation=reject, an exception in
the preprocess) is that row's `error`; the other rows go on.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

import pyarrow as pa

from kvstream.pipeline.models import load_tokenizer
from kvstream.pipeline.prompts import ChatPrompt
from kvstream.pipeline.stage import Stage, replace_column
from kvstream.pipeline.tokenize import apply_length_policy

SAMPLING_DEFAULTS = {"max_tokens": 128, "temperature": 0.0, "top_p": 1.0, "stop": [], "seed": 0}
REQUEST_COLUMNS = ("sampling_params", "kv_cache")  # consumed; prompt / messages pass through
OUTPUT_COLUMNS = ("generated_text", "num_input_tokens", "num_generated_tokens", "time_taken_llm", "kv_bytes",
                  "kv_bytes_full", "truncated", "error")
IDS, PARAMS = "_prompt_token_ids", "_params"  # internal columns between prepare and generate


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def sampling_params(given: Any, defaults: dict, where: str = "sampling_params") -> dict:
    """`defaults` overlaid with the set keys of `given` (a dict or None); ValueError naming the key otherwise."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise ValueError(f"{where} must be a dict of {', '.join(SAMPLING_DEFAULTS)}, not {type(given).__name__}")
    unknown = sorted(k for k, v in given.items() if k not in SAMPLING_DEFAULTS and v is not None)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"valid: {', '.join(SAMPLING_DEFAULTS)}")
    p = {**defaults, **{k: v for k, v in given.items() if k in SAMPLING_DEFAULTS and v is not None}}
    if isinstance(p["stop"], str):
        p["stop"] = [p["stop"]]
    checks = {
        "max_tokens": (_is_int(p["max_tokens"]) and p["max_tokens"] >= 1, "must be an int >= 1"),
        "temperature": (_is_num(p["temperature"]) and p["temperature"] >= 0, "must be a number >= 0 (0 = greedy)"),
        "top_p": (_is_num(p["top_p"]) and 0 < p["top_p"] <= 1, "must be a number in (0, 1]"),
        "stop": (isinstance(p["stop"], (list, tuple)) and all(isinstance(s, str) and s for s in p["stop"]),
                 "must be a string or a list of non-empty strings"),
        "seed": (_is_int(p["seed"]), "must be an int"),
    }
    for key, (ok, msg) in checks.items():
        if not ok:
            raise ValueError(f"{where}.{key}={p[key]!r}: {msg}")
    p["stop"] = list(p["stop"])
    p["temperature"], p["top_p"] = float(p["temperature"]), float(p["top_p"])
    return p


def kv_cache_budget(value: Any, policy: str) -> float | int | None:
    """A row's cache budget (None: the config's); ValueError when it is not a fraction in (0, 1] or an int >= 1,
    or when the cache policy keeps every token (full) so that a budget would be ignored."""
    if value is None:
        return None
    if policy == "full":
        raise ValueError(f"kv_cache={value!r}: cache policy 'full' keeps every token, a budget needs an evicting "
                         f"policy (cache={{'policy': 'keyformer', ...}})")
    if _is_num(value) and isinstance(value, float) and value.is_integer() and value > 1:
        value = int(value)  # an int column that Arrow widened to float
    if _is_int(value) and value >= 1:
        return int(value)
    if _is_num(value) and 0 < value <= 1:
        return float(value)
    raise ValueError(f"kv_cache={value!r}: a row's cache budget is a float in (0, 1] (a fraction of its prompt) or "
                     f"an int token count >= 1")


def _check_messages(messages: Any) -> list[dict]:
    ok = isinstance(messages, (list, tuple)) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)
    if not ok:
        raise ValueError("messages must be a non-empty list of {role: str, content: str}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


class PrepareRequests(Stage):
    """User rows -> the same rows (less `sampling_params`, `kv_cache` and stale output columns) + `error`,
    `truncated`, `num_input_tokens` and the internal `_prompt_token_ids`, `_params` (JSON: sampling + kv_cache)."""

    name = "prepare_requests"

    def __init__(self, model: dict, sampling_defaults: dict, policy: str, apply_chat_template: bool,
                 max_input_tokens: int | None, context: int, truncation: str,
                 preprocess: Callable[[dict], dict] | None = None, continue_on_error: bool = True,
                 chat: ChatPrompt | None = None, keep_errors: bool = False, keys: dict | None = None):
        """The jobs' extras: `chat`, their conversation template (system, turns); `keep_errors`, an incoming
        `error` column is kept (rows that already failed, e.g. in the jobs' reader, are not requests);
        `keys`, how errors name the length settings (e.g. truncation -> generate.truncation)."""
        self.model, self.defaults, self.policy = model, dict(sampling_defaults), policy
        self.chat = chat or ChatPrompt(model, mode="auto" if apply_chat_template else "plain")
        self.max_input_tokens, self.context, self.truncation = max_input_tokens, context, truncation
        self.preprocess, self.continue_on_error = preprocess, continue_on_error
        self.keep_errors = keep_errors
        self.keys = {k: k for k in ("truncation", "max_input_tokens", "sampling_params.max_tokens")} | (keys or {})

    def _preprocessed(self, table: pa.Table) -> tuple[list[dict], list[str | None]]:
        rows = table.to_pylist()
        errors: list[str | None] = [None] * len(rows)
        if self.keep_errors and "error" in table.column_names:
            errors = table["error"].to_pylist()
        if self.preprocess is None:
            return rows, errors
        for i, row in enumerate(rows):
            if errors[i] is not None:
                continue
            try:
                out = self.preprocess(dict(row))
                if not isinstance(out, dict):
                    raise TypeError(f"preprocess must return a dict of columns, not {type(out).__name__}")
                rows[i] = {**row, **out}
            except Exception as e:
                if not self.continue_on_error:
                    raise
                errors[i] = f"preprocess failed: {type(e).__name__}: {e}"
        return rows, errors

    def _ids(self, row: dict, params: dict, tok) -> tuple[list[int], bool]:
        """(prompt ids under the length policy, truncated); ValueError for a request that cannot run."""
        prompt, messages = row.get("prompt"), row.get("messages")
        if (prompt is None) == (messages is None):
            raise ValueError("the row has both prompt and messages: give one" if prompt is not None else
                             "the row's prompt and messages are both null: give one")
        if messages is not None:
            messages = _check_messages(messages)
            try:
                text, ids = self.chat.render(messages, tok)
            except Exception as e:  # a template that rejects this conversation (e.g. roles out of order)
                raise ValueError(f"chat template failed: {type(e).__name__}: {e}") from None
        else:
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"prompt must be a non-empty string, not {prompt!r:.40}")
            text, ids = prompt, None
        ids = list(ids) if ids is not None else list(tok.encode(text))
        room = self.context - params["max_tokens"]
        if room < 1:
            raise ValueError(f"{self.keys['sampling_params.max_tokens']}={params['max_tokens']} leaves no room in "
                             f"the model's {self.context}-token context")
        limit = min(room, self.max_input_tokens or room)
        n = len(ids)
        ids, err = apply_length_policy(ids, limit, self.truncation, getattr(tok, "bos_token_id", None))
        if err is not None:
            why = (f"{self.keys['max_input_tokens']}={limit}" if limit < room else
                   f"the model's {self.context}-token context - max_tokens {params['max_tokens']}")
            raise ValueError(f"prompt has {n} tokens > {limit} ({why}); set {self.keys['truncation']}=head|tail|middle "
                             f"to truncate instead")
        return ids, len(ids) < n

    def process(self, table: pa.Table) -> pa.Table:
        rows, errors = self._preprocessed(table)
        given = [r for r, e in zip(rows, errors) if e is None]
        if given and not any("prompt" in r or "messages" in r for r in given):
            raise ValueError(f"kvstream processor: required column 'prompt' (str) or 'messages' (list of {{role, "
                             f"content}}) missing from its input (the rows have: {', '.join(given[0])}); map one in "
                             f"with build_processor(config, preprocess=...)")
        tok = load_tokenizer(self.model["path"], self.model.get("tokenizer"))
        ids_col, params_col, truncated = [], [], []
        for i, row in enumerate(rows):
            ids, cut, params = [], False, None
            if errors[i] is None:
                try:
                    p = sampling_params(row.get("sampling_params"), self.defaults)
                    p["kv_cache"] = kv_cache_budget(row.get("kv_cache"), self.policy)
                    ids, cut = self._ids(row, p, tok)
                    params = json.dumps(p, sort_keys=True)
                except ValueError as e:
                    if not self.continue_on_error:
                        raise
                    errors[i] = str(e)
            ids_col.append(ids)
            params_col.append(params)
            truncated.append(cut)
        drop = (*REQUEST_COLUMNS, *OUTPUT_COLUMNS, IDS, PARAMS)
        if self.preprocess is None:
            out = table.drop_columns([c for c in table.column_names if c in drop])
        else:
            names = list(dict.fromkeys(k for r in rows for k in r if k not in drop))
            out = pa.table({c: [r.get(c) for r in rows] for c in names}) if names else pa.table({})
            if not names:  # a table with no columns has no rows: carry the count in a placeholder
                out = pa.table({"_row": pa.nulls(len(rows))})
        out = replace_column(out, "error", errors, pa.string())
        out = replace_column(out, "truncated", truncated, pa.bool_())
        n_in = [len(x) if e is None else None for x, e in zip(ids_col, errors)]
        out = replace_column(out, "num_input_tokens", n_in, pa.int64())
        out = replace_column(out, IDS, ids_col, pa.list_(pa.int32()))
        out = replace_column(out, PARAMS, params_col, pa.string())
        return out.drop_columns([c for c in ("_row",) if c in out.column_names])
