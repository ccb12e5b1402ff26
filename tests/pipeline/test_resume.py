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
    fresh = run(load_config("summarize", None, over + ["cache.policy=h2o", "cache.budget=0.5", "output.overwrite=true"]))
    assert fresh["rows_ok"] == 4 and sorted(ids_of(out)) == ["d0", "d1", "d2", "d3"]
    assert json.loads((out / "fingerprint.json").read_text())["keys"]["cache.policy"] == "h2o"
    assert {r["policy"] for r in pq.read_table(str(out / "results")).to_pylist()} == {"h2o"}
    totals, runs = saved_stats(out)  # the replaced rows' stats went with them
    assert totals["rows_ok"] == 4 and totals["invocations"] == 1 and len(runs) == 1
