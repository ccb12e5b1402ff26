"""Resume continues only the same job: the config fingerprint kept in the output, failed-row retry, stats totals."""

import json

import pyarrow.parquet as pq

from kvstream.pipeline import load_config, main, run
from tests.pipeline.helpers import job_overrides, write_jsonl


def ids_of(out):
    return [r["id"] for r in pq.read_table(str(out / "results")).to_pylist()]


def docs(tmp_path, n=4):
    return write_jsonl(tmp_path / "in" / "docs.jsonl", [{"id": f"d{i}", "text": f"Document {i}. " * 8,
                                                        "summary": f"about {i}"} for i in range(n)])


def saved_stats(out):
    return json.loads((out / "stats.json").read_text()), pq.read_table(str(out / "stats.parquet")).to_pylist()


def test_rerun_with_another_cache_stops_naming_the_keys(tmp_path, ray_local, capsys):
    over = job_overrides(tmp_path, **{"data.path": str(docs(tmp_path)), "data.id_column": "id",
                                      "data.reference_column": "summary"})
    first = run(load_config("summarize", None, over))
    assert first["rows_ok"] == 4 and first["output_rows"] == 4
    out = tmp_path / "out"
    assert json.loads((out / "fingerprint.json").read_text())["keys"]["cache.policy"] == "full"
    config_before = (out / "config.yaml").read_text()

    code = main("summarize", over + ["cache.policy=h2o", "cache.budget=0.5", "generate.max_new_tokens=3"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("kvstream")]  # Ray's worker logs aside
    assert code == 2 and len(err) == 1 and err[0].startswith("kvstream: error:")
    for word in ("cache.policy: 'full' -> 'h2o'", "cache.budget", "generate.max_new_tokens: 4 -> 3",
                 "output.overwrite=true", "output.path"):
        assert word in err[0], word
    assert "runtime" not in err[0] and (out / "config.yaml").read_text() == config_before  # nothing relabelled

    # settings that do not change results may differ: a no-op resume
    again = run(load_config("summarize", None, over + ["runtime.batch_size=2", "runtime.sort_window=7"]))
    assert again["rows"] == 0 and again["rows_skipped_resume"] == 4
    # stats.json: totals over every row of the output, not the last (no-op) invocation; one stats.parquet row each
    totals, runs = saved_stats(out)
    assert totals["rows_ok"] == 4 and totals["output_tokens"] == first["output_tokens"] > 0
    assert totals["rouge"]["rouge_rows"] == 4 and totals["invocations"] == 2
    assert totals["last_invocation"]["rows"] == 0
    assert [r["rows"] for r in runs] == [4, 0] and [r["rows_skipped_resume"] for r in runs] == [0, 4]

    # overwrite=true replaces the rows and the fingerprint
    fresh = run(load_config("summarize", None,
                            over + ["cache.policy=h2o", "cache.budget=0.5", "output.overwrite=true"]))
    assert fresh["rows_ok"] == 4 and sorted(ids_of(out)) == ["d0", "d1", "d2", "d3"]
    assert json.loads((out / "fingerprint.json").read_text())["keys"]["cache.policy"] == "h2o"
    assert {r["policy"] for r in pq.read_table(str(out / "results")).to_pylist()} == {"h2o"}
    totals, runs = saved_stats(out)  # the replaced rows' stats went with them
    assert totals["rows_ok"] == 4 and totals["invocations"] == 1 and len(runs) == 1


def test_retry_failed_replaces_the_failed_rows(tmp_path, ray_local, monkeypatch, capsys):
    rows = [{"id": f"d{i}", "text": f"Document {i}. " * 8} for i in range(4)] + [{"id": "null", "text": None}]
    over = job_overrides(tmp_path, **{"data.path": str(write_jsonl(tmp_path / "in.jsonl", rows)),
                                      "data.id_column": "id", "output.rows_per_file": 2})
    out = tmp_path / "out"
    monkeypatch.setenv("KVSTREAM_INJECT_OOM_ABOVE", "0")  # every generation fails (an OOM even for one row)
    first = run(load_config("summarize", None, over))
    assert first["rows_failed"] == 5 and first["output_rows_failed"] == 5
    monkeypatch.delenv("KVSTREAM_INJECT_OOM_ABOVE")

    plain = run(load_config("summarize", None, over))  # without retry_failed failed rows count as done
    assert plain["rows"] == 0 and plain["output_rows_failed"] == 5

    assert main("summarize", over + ["output.retry_failed=true"]) == 0
    printed = capsys.readouterr().out
    assert "5 of them failed rows retried" in printed and "output holds 5 rows, 1 of them failed" in printed
    got = pq.read_table(str(out / "results")).to_pylist()
    assert sorted(r["id"] for r in got) == ["d0", "d1", "d2", "d3", "null"]  # replaced, never duplicated
    assert all(r["error"] is None for r in got if r["id"] != "null")
    totals, runs = saved_stats(out)
    assert (totals["rows"], totals["rows_failed"], totals["rows_ok"]) == (5, 1, 4)
    assert [r["rows_retried"] for r in runs] == [0, 0, 5]


def test_compact_keeps_the_newest_row_of_each_id(tmp_path):
    import pyarrow as pa

    from kvstream.pipeline.writer import compact, done_ids

    d = tmp_path / "out" / "results"
    d.mkdir(parents=True)
    old = {"id": ["a", "b", "c"], "error": ["boom", None, "boom"]}
    pq.write_table(pa.table(old), str(d / "part-1-00000.parquet"))
    pq.write_table(pa.table({"id": ["a", "c"], "error": [None, "again"]}), str(d / "part-2-00000.parquet"))
    assert sorted(done_ids(str(tmp_path / "out"), failed=True)) == ["c"]  # the newest row of each id decides
    assert compact(str(tmp_path / "out")) == 2  # e.g. a run interrupted between writing retried rows and this
    kept = {r["id"]: r["error"] for r in pq.read_table(str(d)).to_pylist()}
    assert kept == {"a": None, "b": None, "c": "again"}
