"""The stages on their own: column checks, prompts, tokenization and the length policy, sorting."""

import json

import pyarrow as pa
import pytest

from kvstream.pipeline.models import ByteTokenizer
from kvstream.pipeline.prompts import ChatPrompt, SummarizePrompt
from kvstream.pipeline.stage import SortByLength
from kvstream.pipeline.tokenize import Tokenize, apply_length_policy

DEMO = {"path": "demo:tiny-llama"}


def test_missing_column_raises_naming_it():
    t = pa.table({"id": ["a"], "error": [None]})
    with pytest.raises(ValueError, match="_input"):
        SummarizePrompt("Doc: {text}")(t)
    with pytest.raises(ValueError, match="num_input_tokens"):
        SortByLength(4)(t)


@pytest.mark.parametrize("mode", ["head", "tail", "middle"])
def test_length_policy_keeps_the_right_tokens(mode):
    ids = [256] + list(range(100))  # BOS then 100 tokens
    out, err = apply_length_policy(ids, 11, mode, bos=256)
    assert err is None and len(out) == 11
    if mode == "head":
        assert out == ids[:11]
    elif mode == "tail":
        assert out == [256] + ids[-10:]
    else:
        assert out == ids[:5] + ids[-6:] and out[0] == 256
    assert apply_length_policy(ids, 200, mode, 256) == (ids, None)


def test_reject_gives_an_error_that_says_what_to_change():
    out, err = apply_length_policy(list(range(50)), 10, "reject", None)
    assert out == [] and "50 tokens" in err and "generate.truncation" in err


def test_prompt_then_tokenize_with_truncation():
    t = pa.table({"id": ["a", "b", "c"], "error": [None, None, "field 'text' is null"],
                  "_input": ["short", "x" * 500, None]})
    t = SummarizePrompt("Doc: {text}\nSummary:")(t)
    assert t["_prompt"].to_pylist()[0] == "Doc: short\nSummary:"
    out = Tokenize(DEMO, 64, "middle")(t).to_pylist()
    tok = ByteTokenizer()
    assert out[0]["prompt_token_ids"] == tok.encode("Doc: short\nSummary:")
    assert out[0]["num_input_tokens"] == len(tok.encode("Doc: short\nSummary:")) and not out[0]["truncated"]
    b = out[1]["prompt_token_ids"]
    assert len(b) == 64 and out[1]["truncated"] and b[0] == tok.bos_token_id
    assert tok.decode(b).endswith("\nSummary:")  # middle truncation keeps the cue at the end
    assert out[2]["error"] == "field 'text' is null" and out[2]["prompt_token_ids"] == []
    assert "_prompt" not in out[0] and "_input" not in out[0]
    rej = Tokenize(DEMO, 64, "reject")(SummarizePrompt("{text}")(t)).to_pylist()
    assert rej[0]["error"] is None and "generate.truncation" in rej[1]["error"]


def test_plain_chat_prompt():
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye?"}]
    t = pa.table({"id": ["a"], "error": [None], "_input": [json.dumps(msgs)]})
    out = ChatPrompt(DEMO, "auto", system="Be brief.")(t).to_pylist()[0]
    assert out["_prompt"] == "system: Be brief.\nuser: Hi\nassistant: Hello\nuser: Bye?\nassistant:"
    assert out["_prompt_ids"] is None


def test_tokenizer_chat_template_used_when_present(monkeypatch):
    class Tok(ByteTokenizer):
        chat_template = "x"

        def apply_chat_template(self, messages):
            return [self.bos_token_id, 1] + [ord(c) for m in messages for c in m["content"]] + [2]

    monkeypatch.setattr("kvstream.pipeline.prompts.load_tokenizer", lambda *a: Tok())
    monkeypatch.setattr("kvstream.pipeline.tokenize.load_tokenizer", lambda *a: Tok())
    t = pa.table({"id": ["a"], "error": pa.array([None], pa.string()),
                  "_input": [json.dumps([{"role": "user", "content": "q"}])]})
    out = ChatPrompt(DEMO)(t)
    assert out["_prompt"].to_pylist() == [None] and out["_prompt_ids"].to_pylist() == [[256, 1, ord("q"), 2]]
    tokens = Tokenize(DEMO, 64, "middle")(out).to_pylist()[0]
    assert tokens["prompt_token_ids"] == [256, 1, ord("q"), 2]  # used as given: no second BOS
    plain = ChatPrompt(DEMO, "plain")(t).to_pylist()[0]
    assert plain["_prompt"] == "user: q\nassistant:" and plain["_prompt_ids"] is None


def test_sort_by_length():
    t = pa.table({"id": list("abcd"), "num_input_tokens": [30, 5, 20, 10]})
    assert SortByLength(8)(t)["id"].to_pylist() == ["b", "d", "c", "a"]


def test_request_column_makes_the_processors_request():
    from kvstream.pipeline.prompts import RequestColumn

    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    t = pa.table({"id": ["a", "b"], "error": pa.array([None, "field 'text' is null"], pa.string()),
                  "_input": [json.dumps(msgs), None], "ref": ["r", "s"]})
    conv = RequestColumn("converse", "{text}")(t).to_pylist()
    assert conv[0]["messages"] == msgs and conv[1]["messages"] is None and "_input" not in conv[0]
    assert conv[1]["error"] == "field 'text' is null" and conv[0]["ref"] == "r"
    t = t.set_column(2, "_input", pa.array(["doc", None]))
    summ = RequestColumn("summarize", "Doc: {text}\nSummary:")(t).to_pylist()
    assert [r["prompt"] for r in summ] == ["Doc: doc\nSummary:", None] and "_input" not in summ[0]
    with pytest.raises(ValueError, match="must contain"):
        RequestColumn("summarize", "no placeholder")
