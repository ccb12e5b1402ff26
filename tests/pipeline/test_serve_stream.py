"""Streamed text (kvstream.pipeline.serve_stream.TextStream): deltas from growing token lists join to exactly the
final text, never hold half a character or any part of a stop string, with the byte tokenizer and a real
sentencepiece-style one (stories260K's llama2.c tokenizer: byte fallback, leading-space rules)."""

from __future__ import annotations

import random

from kvstream.kvcache.models import decode_continuation
from kvstream.pipeline.models import ByteTokenizer
from kvstream.pipeline.serve_stream import TextStream

EOS = ByteTokenizer.eos_token_id


def stream(tok, prompt, tokens, stops=(), eos=(EOS,)):
    ts = TextStream(tok, prompt, list(stops), list(eos))
    return ts, [ts.update(tokens[:k]) for k in range(1, len(tokens) + 1)]


def test_multibyte_characters_wait_for_their_last_byte():
    tok = ByteTokenizer()
    text = "héllo, wörld € 你好"
    ts, deltas = stream(tok, [256], list(text.encode()) + [EOS])
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
    assert deltas[text.encode().index("€".encode()) + 2] == "€"  # emitted at its third byte, whole
    assert ts.finish(text) == "" and ts.update(list(text.encode())) == ""  # nothing twice


def test_no_text_at_or_past_a_stop_string_is_sent():
    tok = ByteTokenizer()
    ts, deltas = stream(tok, [256], list(b"one STOP two"), stops=["STOP", "xyz"])
    sent = "".join(deltas)
    assert sent == "one " and "S" not in sent
    assert ts.finish("one ") == ""
    ts, deltas = stream(tok, [256], list(b"ab ST"), stops=["STOP"])
    assert "".join(deltas) == "ab " and ts.finish("ab ST") == "ST"  # a prefix that never became the stop


def test_random_ids_of_a_sentencepiece_tokenizer_join_to_the_final_text(stories260k):
    from kvstream.pipeline.models import load_tokenizer

    tok = load_tokenizer(str(stories260k["model"]), str(stories260k["tokenizer"]))
    rng = random.Random(0)
    prompt = tok.encode("Once upon a time")
    for trial in range(20):
        gen = [rng.randrange(3, 512) for _ in range(rng.randrange(1, 40))]
        final = decode_continuation(tok, prompt, gen)
        ts, deltas = stream(tok, prompt, gen, eos=[tok.eos_token_id])
        assert "".join(deltas) + ts.finish(final) == final, trial
        assert all(d.count("\ufffd") <= final.count("\ufffd") for d in deltas)
