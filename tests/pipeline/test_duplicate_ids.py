"""Repeated ids in the input: `data.on_duplicate_id` error (before Ray starts) | keep_first | suffix."""

import pyarrow.parquet as pq
import pytest

from kvstream.pipeline import job, load_config, main, run
from tests.pipeline.helpers import job_overrides, write_jsonl


@pytest.fixture
def two_files(tmp_path):
    d = tmp_path / "in"
    write_jsonl(d / "a.jsonl", [{"id": "a", "text": "first a"}, {"id": "b", "text": "first b"},
                                {"id": "a", "text": "second a"}])
    write_jsonl(d / "b.jsonl", [{"id": "b", "text": "second b"}, {"id": "c", "text": "only c"},
                                {"id": "a#2", "text": "an id that looks like a suffix"}])
    return d


def rows(out):
    return {r["id"]: r for r in pq.read_table(str(out / "results")).to_pylist()}


def test_repeated_ids_stop_the_job_before_ray(two_files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(job, "init_ray", lambda cfg: pytest.fail("Ray started before the id check"))
    code = main("summarize", job_overrides(tmp_path, **{"data.path": str(two_files), "data.id_column": "id"}))
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("kvstream")]
    assert code == 2 and len(err) == 1
    assert "2 rows repeat" in err[0] and "2 distinct ids: 'a', 'b'" in err[0] and "data.on_duplicate_id" in err[0]
    assert not (tmp_path / "out" / "results").exists()


def test_keep_first_and_suffix(two_files, tmp_path, ray_local):
    over = job_overrides(tmp_path, **{"data.path": str(two_files), "data.id_column": "id",
                                      "data.passthrough_columns": "[text]"})
    run(load_config("summarize", None, over + ["data.on_duplicate_id=keep_first"]))
    kept = rows(tmp_path / "out")
    assert sorted(kept) == ["a", "a#2", "b", "c"]
    assert kept["a"]["text"] == "first a" and kept["b"]["text"] == "first b"

    over_s = over + ["data.on_duplicate_id=suffix", f"output.path={tmp_path / 'suffixed'}"]
    stats = run(load_config("summarize", None, over_s))
    got = rows(tmp_path / "suffixed")
    assert stats["rows"] == 6 and sorted(got) == ["a", "a#2", "a#3", "b", "b#2", "c"]
    assert got["a#3"]["text"] == "second a" and got["b#2"]["text"] == "second b"
    assert got["a#2"]["text"] == "an id that looks like a suffix"
    again = run(load_config("summarize", None, over_s))  # the same names on every run: resume finds them all
    assert again["rows"] == 0 and again["rows_skipped_resume"] == 6
