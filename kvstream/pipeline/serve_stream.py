"""Streaming pieces of the Serve deployment: incremental text from growing token lists, and OpenAI bodies.

`TextStream` turns a sequence's tokens so far (Scheduler.progress) into text deltas: each update decodes every
token so far (as the final row's text is decoded, after the prompt's tail) and emits what was not sent yet, holding
back a trailing U+FFFD (the bytes of a character not complete yet) and any tail that may be the start of a stop
string (so no text past a stop is ever sent). `finish(final_text)` emits the rest of the row's final text, so the
deltas always concatenate to exactly the non-streamed response's text.

`completion_body` / `chat_body` build the non-streamed responses, `chunk` one server-sent event of a stream
(`text_completion` or `chat.completion.chunk`), `DONE` the terminating event.
"""

from __future__ import annotations

import json
import logging
import time

from kvstream.kvcache.models import decode_continuation

log = logging.getLogger(__name__)
DONE = "data: [DONE]\n\n"


class TextStream:
    """Text deltas of one sequence: prompt ids (list[int]), stop strings, the tokenizer, its EOS ids."""

    def __init__(self, tokenizer, prompt_ids: list[int], stops: list[str], eos_ids: list[int]):
        self.tok, self.prompt, self.stops, self.eos = tokenizer, list(prompt_ids), list(stops), set(eos_ids)
        self.sent, self.seen = "", 0

    def update(self, tokens: list[int]) -> str:
        """The new text that `tokens` (every generated token so far, list[int]) adds; "" if nothing is safe yet."""
        if len(tokens) <= self.seen:
            return ""
        self.seen = len(tokens)
        body = tokens[:-1] if tokens and tokens[-1] in self.eos else tokens
        text = decode_continuation(self.tok, self.prompt, body).rstrip("\ufffd")
        hits = [text.find(s) for s in self.stops if s in text]
        if hits:
            text = text[:min(hits)]
        else:
            text = text[:len(text) - _stop_prefix_len(text, self.stops)]
        return self._emit(text)

    def finish(self, final_text: str) -> str:
        """The rest of the row's final text (str): what completes the deltas to exactly final_text."""
        if not final_text.startswith(self.sent):  # decoding a prefix changed earlier text: cannot unsend it
            log.warning("stream text diverged from the final text after %d characters", len(self.sent))
            return ""
        return self._emit(final_text)

    def _emit(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of text that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def usage(row: dict) -> dict:
    n_in, n_out = row["num_input_tokens"], row["num_generated_tokens"]
    return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}


def _kv(row: dict) -> dict:
    return {"kv_bytes": row["kv_bytes"], "kv_bytes_full": row["kv_bytes_full"]}


def completion_body(rid: str, model: str, row: dict) -> dict:
    """A non-streamed /v1/completions response for a finished row (Scheduler.step's dict)."""
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": row["generated_text"], "finish_reason": row["finish_reason"],
                         "logprobs": None}],
            "usage": usage(row), **_kv(row)}


def chat_body(rid: str, model: str, row: dict) -> dict:
    """A non-streamed /v1/chat/completions response for a finished row."""
    message = {"role": "assistant", "content": row["generated_text"]}
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": row["finish_reason"], "logprobs": None}],
            "usage": usage(row), **_kv(row)}


def chunk(rid: str, model: str, chat: bool, text: str | None = None, finish: str | None = None,
          row: dict | None = None, role: bool = False, with_usage: bool = False) -> str:
    """One server-sent event of a stream. text: a delta; finish + row: the last content event (finish_reason,
    kv_bytes, and usage where asked); role: a chat stream's first event (the assistant role, empty content)."""
    if chat:
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
    body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}
    if row is not None:
        body.update(_kv(row))
        if with_usage:
            body["usage"] = usage(row)
    return f"data: {json.dumps(body)}\n\n"


def error_event(message: str, kind: str) -> str:
    """An error inside an open stream (the status line is already sent): OpenAI's error body as an event."""
    return f"data: {json.dumps({'error': {'message': message, 'type': kind, 'param': None, 'code': None}})}\n\n"
