"""Reading files into rows: formats, ids, and bad rows that become per-row errors (never a failed file)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kvstream.pipeline.fs import InputError, list_inputs
from kvstream.pipeline.reader import rows_of_file

SPEC = {"task": "summarize", "input_column": "text", "id_column": None, "passthrough": ["ref"], "format": None}


def rows(path, spec=SPEC):
    return [r for t in rows_of_file(str(path), path.name, spec) for r in t.to_pylist()]


def test_jsonl_bad_rows_each_get_an_error(tmp_path):
    p = tmp_path / "in.jsonl"
    lines = [
        json.dumps({"text": "fine document", "ref": "r"}).encode(),
        json.dumps({"text": None}).encode(),
        json.dumps({"text": "   \n"}).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"other": "x"}).encode(),
        b'{"text": "bad \xff\xfe bytes"}',
        b"{not json",
        b"[1, 2]",
    ]
    p.write_bytes(b"\n".join(lines) + b"\n")
    out = rows(p)
    assert [r["id"] for r in out] == [f"in.jsonl:{i}" for i in range(8)]
    assert out[0]["error"] is None and out[0]["_input"] == "fine document" and out[0]["ref"] == "r"
    expect = ["null", "empty", "int, not text", "missing field 'text'", "not valid UTF-8", "not valid JSON", "list"]
    for r, word in zip(out[1:], expect):
        assert r["error"] is not None and word in r["error"], (r, word)
        assert r["_input"] is None


def test_csv_and_json_array_and_parquet(tmp_path):
    c = tmp_path / "a.csv"
    c.write_bytes(b'text,ref\n"multi\nline doc",x\n,y\nbad \xff,z\n')
    out = rows(c)
    assert out[0]["_input"] == "multi\nline doc" and out[0]["error"] is None
    assert "empty" in out[1]["error"] and "UTF-8" in out[2]["error"]
    j = tmp_path / "b.json"
    j.write_text(json.dumps([{"text": "one"}, {"text": "two", "ref": ["a", "b"]}]))
    out = rows(j)
    assert [r["_input"] for r in out] == ["one", "two"] and json.loads(out[1]["ref"]) == ["a", "b"]
    q = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": pa.array([b"ok", b"\xff\xfe", None], pa.binary()), "k": [1, 2, 3]}), q)
    out = rows(q, dict(SPEC, id_column="k"))
    assert [r["id"] for r in out] == ["1", "2", "3"]
    assert out[0]["_input"] == "ok" and "UTF-8" in out[1]["error"] and "null" in out[2]["error"]


def test_messages_forms(tmp_path):
    p = tmp_path / "m.jsonl"
    recs = [{"m": [{"role": "user", "content": "hi"}]}, {"m": ["q", "a", "q2"]}, {"m": "just text"},
            {"m": []}, {"m": [{"role": "user"}]}]
    p.write_text("\n".join(json.dumps(r) for r in recs))
    spec = dict(SPEC, task="converse", input_column="m", passthrough=[])
    out = rows(p, spec)
    assert json.loads(out[0]["_input"]) == [{"role": "user", "content": "hi"}]
    assert [m["role"] for m in json.loads(out[1]["_input"])] == ["user", "assistant", "user"]
    assert json.loads(out[2]["_input"])[0]["content"] == "just text"
    assert "non-empty list" in out[3]["error"] and "content" in out[4]["error"]


def test_unreadable_file_and_listing_errors_name_the_path(tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"this is not parquet")
    with pytest.raises(InputError, match="broken.parquet"):
        rows(bad)
    with pytest.raises(InputError, match="missing_dir"):
        list_inputs(str(tmp_path / "missing_dir"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.jsonl").write_text("{}\n")
    (tmp_path / "d" / "y.csv").write_text("text\n")
    (tmp_path / "d" / "notes.txt").write_text("skip me")
    files, _ = list_inputs(str(tmp_path / "d"))
    assert [f.rsplit("/", 1)[1] for f in files] == ["x.jsonl", "y.csv"]
    files, _ = list_inputs(str(tmp_path / "d" / "*.jsonl"))
    assert len(files) == 1
    files, _ = list_inputs(str(tmp_path / "d" / "notes.txt"), fmt="jsonl")  # data.format overrides the extension
    assert len(files) == 1
