"""Results written by the Ray Data workers: every id exactly once across a killed actor, a writer killed after its
rename, a lost part, a part held twice and a rerun; the driver sees stats rows only, never the generated text."""

import json
import shutil

import pyarrow as pa
import pytest
import pyarrow.parquet as pq

from kvstream.pipeline import job, load_config, run
from kvstream.pipeline.parts import WriteParts, part_name
from kvstream.pipeline.writer import repeated_ids
from tests.pipeline.helpers import job_overrides, write_jsonl

N = 12


def part_ids(results):
    return {f.name: pq.read_table(str(f))["id"].to_pylist() for f in sorted(results.glob("*.parquet"))}


def test_killed_actor_and_writer_then_rerun_every_id_once(tmp_path, ray_local, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"d{i:02d}", "text": f"Document {i}. " * 6, "ref": f"doc {i}"}
                                              for i in range(N)])
    monkeypatch.setenv("KVSTREAM_INJECT_CRASH_MARKER", str(tmp_path / "actor_crashed"))
    monkeypatch.setenv("KVSTREAM_INJECT_CRASH_AFTER", "1")
    monkeypatch.setenv("KVSTREAM_INJECT_WRITE_CRASH_MARKER", str(tmp_path / "writer_crashed"))
    seen: list[tuple[list[str], int]] = []  # what the driver's job loop counts (the totals re-read results/ after)
    add = job.RunStats.add

    def spy(self, table):
        seen.append((table.column_names, table.num_rows))
        add(self, table)

    monkeypatch.setattr(job.RunStats, "add", spy)
    over = job_overrides(tmp_path, **{"data.path": str(src), "data.id_column": "id", "runtime.batch_size": 2,
                                      "output.rows_per_file": 2, "data.reference_column": "ref"})
    first = run(load_config("summarize", None, over))
    assert (tmp_path / "actor_crashed").exists() and (tmp_path / "writer_crashed").exists()  # both died once
    results = tmp_path / "out" / "results"
    parts = part_ids(results)
    ids = [i for p in parts.values() for i in p]
    assert sorted(ids) == [f"d{i:02d}" for i in range(N)]  # the retried writer replaced its part, no second file
    assert first["rows_ok"] == N and len(first["files_written"]) == len(parts)
    assert first["rouge"]["rouge_rows"] == N  # scored on the workers
    streamed = [(cols, n) for cols, n in seen if "_file" in cols]  # the workers' stats rows, no generated text
    assert sum(n for _, n in streamed) == N and not any("generated_text" in cols for cols, _ in streamed)
    assert all(name == part_name(first["invocation"], p) for name, p in parts.items())

    # a lost part (its rows again) and a part held twice (e.g. a block rebuilt with other rows): the rerun writes
    # the lost rows and the commit step keeps one row per id
    names = sorted(parts)
    (results / names[0]).unlink()
    shutil.copy(results / names[1], results / names[1].replace("part-", "part-0-", 1))  # an older run's copy
    (results / ".tmp-left-by-a-killed-writer").write_bytes(b"PAR1 half")
    assert repeated_ids(str(tmp_path / "out")) == len(parts[names[1]])
    monkeypatch.delenv("KVSTREAM_INJECT_CRASH_MARKER")
    monkeypatch.delenv("KVSTREAM_INJECT_WRITE_CRASH_MARKER")
    again = run(load_config("summarize", None, over))
    assert again["rows"] == len(parts[names[0]]) and again["rows_skipped_resume"] == N - len(parts[names[0]])
    rows = pq.read_table(str(results)).to_pylist()
    assert sorted(r["id"] for r in rows) == [f"d{i:02d}" for i in range(N)]  # every id exactly once
    assert all(r["error"] is None and r["generated_text"] for r in rows)
    assert not list(results.glob(".tmp-*"))
    totals = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert (totals["rows"], totals["rows_ok"], totals["rouge"]["rouge_rows"]) == (N, N, N)


def test_write_parts_is_idempotent_and_splits_at_rows_per_file(tmp_path):
    table = pa.table({"id": [f"r{i}" for i in range(5)], "generated_text": ["a", None, "c", "d", "e"],
                      "error": pa.array([None, "bad", None, None, None], pa.string()), "_actor": ["x"] * 5,
                      "num_generated_tokens": [1] * 5})
    stage = WriteParts(str(tmp_path / "results"), "20260101T000000-000001", rows_per_file=2)
    stats = stage(table)
    again = stage(table)  # a retried task: the same names, replaced
    files = sorted((tmp_path / "results").glob("*.parquet"))
    assert len(files) == 3 and [pq.read_table(str(f)).num_rows for f in files] == sorted([2, 2, 1])
    assert stats.equals(again) and stats.num_rows == 5 and "generated_text" not in stats.column_names
    written = pq.read_table(str(tmp_path / "results"))
    assert sorted(written["id"].to_pylist()) == [f"r{i}" for i in range(5)] and "_actor" not in written.column_names
    assert written.column_names[0] == "id" and written.column_names[-1] == "error"  # the users' column order


def test_small_generation_blocks_are_written_as_parts_of_rows_per_file(tmp_path, ray_local):
    """Twenty 2-row blocks (generation batches) stream into 5 parts of 8 rows, not 20 files of 2: the small-files
    problem of a million-row job on an object store."""
    import ray

    items = [{"id": f"r{i:02d}", "generated_text": f"text {i}", "error": None} for i in range(40)]
    ds = ray.data.from_items(items, override_num_blocks=20)
    stage = WriteParts(str(tmp_path / "results"), "20260101T000000-000002", rows_per_file=8)
    stats = stage.apply(ds).take_all()
    files = sorted((tmp_path / "results").glob("*.parquet"))
    assert [pq.read_table(str(f)).num_rows for f in files] == [8] * 5 and len(stats) == 40
    assert sorted(pq.read_table(str(tmp_path / "results"))["id"].to_pylist()) == [f"r{i:02d}" for i in range(40)]


def test_parts_carry_each_rows_rouge_and_the_totals_read_it_not_the_texts(tmp_path):
    """With a reference column the workers write each row's ROUGE beside it (null for a failed row); the output's
    totals take those numbers (a part's texts changed afterwards change nothing), and score the texts only of a
    part written without them."""
    from kvstream.pipeline.stats import rouge_scores
    from kvstream.pipeline.totals import output_totals

    out = tmp_path / "out"
    table = pa.table({"id": ["a", "b", "c"], "generated_text": ["the cat sat", "a dog ran off", None],
                      "ref": ["the cat sat down", "the dog ran", "anything"],
                      "error": pa.array([None, None, "boom"], pa.string()), "num_generated_tokens": [3, 4, 0],
                      "num_input_tokens": [9, 9, 9], "kv_bytes": [1, 1, 0], "kv_bytes_full": [2, 2, 0]})
    WriteParts(str(out / "results"), "20260101T000000-000003", rows_per_file=10, reference_column="ref")(table)
    (part,) = (out / "results").glob("*.parquet")
    written = pq.read_table(str(part))
    assert written.column_names[-4:] == ["rouge1", "rouge2", "rougeL", "error"]
    for r in written.to_pylist():
        want = rouge_scores(r["generated_text"], r["ref"]) if r["error"] is None else None
        assert (r["rouge1"], r["rouge2"], r["rougeL"]) == ((want["rouge1"], want["rouge2"], want["rougeL"])
                                                         if want else (None, None, None)), r["id"]
    scored = output_totals(str(out), "ref").rouge()
    assert scored["rouge_rows"] == 2
    assert scored["rouge1"] == pytest.approx((written["rouge1"][0].as_py() + written["rouge1"][1].as_py()) / 2)
    # the texts are not read again: replace them, keep the scores
    pq.write_table(written.set_column(written.column_names.index("generated_text"), "generated_text",
                                      pa.array(["zzz", "zzz", None])), str(part))
    assert output_totals(str(out), "ref").rouge() == scored
    # a part without score columns (an older output): its texts are scored
    pq.write_table(written.drop_columns(["rouge1", "rouge2", "rougeL"]), str(part))
    assert output_totals(str(out), "ref").rouge() == pytest.approx(scored)


def test_stats_parquet_keeps_keys_a_later_invocation_adds(tmp_path):
    """stats.parquet gets one row per invocation; a key only a later one has (e.g. the steady-state rates of a run
    after an interrupted first one that produced nothing) is kept, null for the earlier rows."""
    from kvstream.pipeline.totals import append_invocation, read_invocations

    append_invocation(str(tmp_path), {"invocation": "one", "rows": 0, "interrupted": "SIGTERM"})
    append_invocation(str(tmp_path), {"invocation": "two", "rows": 5, "steady_rows_per_s": 2.5, "interrupted": None,
                                      "rouge": {"rouge1": 0.25}})
    rows = read_invocations(str(tmp_path))
    assert [(r["invocation"], r["rows"], r["steady_rows_per_s"], r["rouge1"]) for r in rows] == [
        ("one", 0, None, None), ("two", 5, 2.5, 0.25)]
