"""Real weights: stories260K (llama2.c) through the whole pipeline gives exactly what the Engine gives alone."""

import pyarrow.parquet as pq

from kvstream.kvcache import Engine
from kvstream.pipeline import load_config, run
from tests.pipeline.helpers import job_overrides, write_jsonl

PROMPTS = ["Once upon a time", "One day, a boy named Tom went to the park", "The cat was very hungry"]


def test_stories260k_pipeline_matches_engine(tmp_path, ray_local, stories260k):
    src = write_jsonl(tmp_path / "stories.jsonl", [{"k": f"s{i}", "text": t} for i, t in enumerate(PROMPTS)])
    over = job_overrides(tmp_path, **{
        "model.path": stories260k["model"], "model.tokenizer": stories260k["tokenizer"], "data.path": src,
        "data.id_column": "k", "prompt.template": "'{text}'", "generate.max_new_tokens": 24, "runtime.batch_size": 1,
    })
    stats = run(load_config("summarize", None, over))
    rows = {r["id"]: r for r in pq.read_table(str(tmp_path / "out" / "results")).to_pylist()}
    eng = Engine.from_pretrained(str(stories260k["model"]), tokenizer=str(stories260k["tokenizer"]), device="cpu")
    for i, text in enumerate(PROMPTS):
        want = eng.generate([text], max_new_tokens=24)[0]
        got = rows[f"s{i}"]
        assert got["error"] is None
        assert got["generated_text"] == want["generated_text"]
        assert got["num_input_tokens"] == want["num_input_tokens"] == len(eng.tokenizer.encode(text))
    assert "Lily" in rows["s0"]["generated_text"]  # the model's well-known continuation
    assert stats["rows_ok"] == 3
