"""SIGTERM / SIGINT mid-run: one line, the rows so far kept, partial stats, exit 143 / 130; a rerun resumes."""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from kvstream.pipeline import job, load_config, main, run
from tests.pipeline.helpers import ROOT, job_overrides, write_jsonl


def docs(tmp_path, n):
    return write_jsonl(tmp_path / "in.jsonl", [{"id": f"d{i:02d}", "text": f"Document {i}. " * 6, "summary": "about"}
                                               for i in range(n)])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_keeps_rows_writes_stats_and_a_rerun_resumes(sig, tmp_path, ray_local, monkeypatch, capsys):
    over = job_overrides(tmp_path, **{"data.path": str(docs(tmp_path, 12)), "data.id_column": "id",
                                      "runtime.batch_size": 2, "output.rows_per_file": 2})
    add, sent = job.RunStats.add, []

    def add_then_signal(self, table):  # a real signal to this process after the first result batch
        add(self, table)
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(job.RunStats, "add", add_then_signal)
    code = main("summarize", over)
    monkeypatch.setattr(job.RunStats, "add", add)
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("kvstream")]
    out = tmp_path / "out"
    saved = pq.read_table(str(out / "results")).num_rows
    assert code == 128 + sig and 0 < saved < 12
    assert lines == [f"kvstream: interrupted ({sig.name}): {saved} rows saved to {out / 'results'} by this run; "
                     "rerun the same command to resume"]
    assert "rows (" not in captured.out  # no "finished" summary
    assert pq.read_table(str(out / "stats.parquet")).to_pylist()[0]["interrupted"] == sig.name

    again = run(load_config("summarize", None, over))
    assert again["rows_skipped_resume"] == saved and again["rows"] == 12 - saved
    rows = pq.read_table(str(out / "results")).to_pylist()
    assert sorted(r["id"] for r in rows) == [f"d{i:02d}" for i in range(12)]  # every id exactly once
    totals = json.loads((out / "stats.json").read_text())  # as one uninterrupted run's
    assert (totals["rows"], totals["rows_ok"], totals["invocations"]) == (12, 12, 2)
    assert totals["output_tokens"] == sum(r["num_generated_tokens"] for r in rows)


def test_ctrl_c_on_the_job_command(tmp_path):
    """A terminal's Ctrl-C: SIGINT to the job's whole process group (its own local Ray included); the rerun
    after an interruption is the in-process test's."""
    over = job_overrides(tmp_path, **{"data.path": str(docs(tmp_path, 40)), "data.id_column": "id",
                                      "runtime.batch_size": 2, "output.rows_per_file": 2,
                                      "generate.max_new_tokens": 16, "data.reference_column": "summary"})
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs/summarize.py"), *over], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    results = tmp_path / "out" / "results"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(results.glob("*.parquet")):
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.startswith("kvstream")]
    saved = pq.read_table(str(results)).num_rows
    assert proc.returncode == 130, (out, err)
    assert lines == [f"kvstream: interrupted (SIGINT): {saved} rows saved to {results} by this run; "
                     "rerun the same command to resume"], err
    assert "Traceback" not in err and "rows (" not in out  # no "finished" summary
    for noise in ("Token authentication", "Running Dataset", "Using default tokenizer", "Started a local Ray",
                  "Truncating long operator name"):  # quiet at the default runtime.log_level (ROUGE ran for the stats)
        assert noise not in err, (noise, err)
    assert 0 < saved < 40 and pq.read_table(str(tmp_path / "out" / "stats.parquet")).num_rows == 1  # partial stats
