"""The generation actor's logic in-process: OOM splits the batch, failures stay on their own row."""

import pyarrow as pa
import pytest

from kvstream.pipeline.generate import GenerateUDF
from kvstream.pipeline.models import ByteTokenizer

GEN = {"max_new_tokens": 3, "temperature": 0.0, "top_p": 1.0, "stop": [], "seed": 0}


def batch(texts, errors=None):
    tok = ByteTokenizer()
    ids = [tok.encode(t) for t in texts]
    return pa.table({
        "id": [f"r{i}" for i in range(len(texts))], "error": pa.array(errors or [None] * len(texts), pa.string()),
        "prompt_token_ids": pa.array(ids, pa.list_(pa.int32())), "num_input_tokens": [len(i) for i in ids],
    })


@pytest.fixture(scope="module")
def udf():
    return GenerateUDF({"path": "demo:tiny-llama"}, {"policy": "full", "quant": "none"}, GEN, 0, 1)


def counting(udf, monkeypatch):
    sizes = []
    real = udf._engine_generate

    def spy(ids):
        sizes.append(len(ids))
        return real(ids)

    monkeypatch.setattr(udf, "_engine_generate", spy)
    return sizes


def test_rows_in_rows_out(udf):
    out = udf(batch(["alpha", "beta gamma", "x"], [None, "field 'text' is null", None])).to_pylist()
    assert [r["id"] for r in out] == ["r0", "r1", "r2"]
    assert out[1]["error"] == "field 'text' is null" and out[1]["generated_text"] is None
    for r in (out[0], out[2]):
        assert r["error"] is None and r["num_generated_tokens"] >= 1 and r["kv_bytes_full"] > 0
        assert r["policy"] == "full" and isinstance(r["generated_text"], str)


def test_oom_splits_and_retries(udf, monkeypatch):
    texts = [f"document number {i} " * (i + 1) for i in range(6)]
    clean = udf(batch(texts)).to_pylist()
    udf.inject = {"oom_above": 2}
    sizes = counting(udf, monkeypatch)
    try:
        out = udf(batch(texts)).to_pylist()
    finally:
        udf.inject = {}
    assert all(r["error"] is None for r in out)
    assert sizes[0] == 6 and max(sizes[1:]) <= 6 // 2 and sum(s for s in sizes if s <= 2) == 6
    assert [r["num_input_tokens"] for r in out] == [r["num_input_tokens"] for r in clean]


def test_oom_on_a_single_row_is_that_rows_error(udf):
    udf.inject = {"oom_above": 0}
    try:
        out = udf(batch(["a", "b"])).to_pylist()
    finally:
        udf.inject = {}
    assert all("out of memory" in r["error"] for r in out)


def test_other_failure_stays_on_its_row(udf, monkeypatch):
    real = udf._engine_generate
    poison = ByteTokenizer().encode("poison")

    def flaky(ids):
        if poison in [list(i) for i in ids]:
            raise RuntimeError("kaboom")
        return real(ids)

    monkeypatch.setattr(udf, "_engine_generate", flaky)
    out = udf(batch(["ok one", "poison", "ok two"])).to_pylist()
    assert out[0]["error"] is None and out[2]["error"] is None
    assert "kaboom" in out[1]["error"] and "RuntimeError" in out[1]["error"]
