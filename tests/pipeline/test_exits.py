"""What the user sees when a job cannot do its work: one `kvstream: error:` line and a documented exit code."""

import os

import pytest

from kvstream.pipeline import job, main
from tests.pipeline.helpers import job_overrides, write_jsonl


def errors(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("kvstream")]  # Ray's worker logs aside


@pytest.fixture
def no_ray(monkeypatch):
    monkeypatch.setattr(job, "init_ray", lambda cfg: pytest.fail("Ray started although the job cannot run"))


def test_output_path_errors(tmp_path, capsys, no_ray):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "a document"}])
    a_file = tmp_path / "taken"
    a_file.write_text("not a directory")
    cases = {str(a_file): "is a file", str(a_file / "sub"): "cannot be created"}
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases[str(locked)] = "is not writable"
    for path, words in cases.items():
        code = main("summarize", job_overrides(tmp_path, **{"data.path": str(src), "output.path": path}))
        err = errors(capsys)
        assert code == 2 and len(err) == 1 and f"kvstream: error: output.path={path} {words}" in err[0], err


def test_empty_input_exits_2_naming_the_file(tmp_path, capsys, no_ray):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n")
    header = tmp_path / "header.csv"
    header.write_text("id,text\n")
    for f in (empty, header):
        code = main("summarize", job_overrides(tmp_path, **{"data.path": str(f)}))
        err = errors(capsys)
        assert code == 2 and len(err) == 1 and str(f) in err[0] and "no input rows" in err[0], err
    assert not (tmp_path / "out" / "results").exists()


def test_every_row_failed_exits_3(tmp_path, capsys, ray_local):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": None}, {"text": ""}, {"body": "no text field"}])
    code = main("summarize", job_overrides(tmp_path, **{"data.path": str(src)}))
    out, err = capsys.readouterr()
    assert code == job.EXIT_ALL_FAILED == 3
    assert "3 failed" in out and "kvstream: error: all 3 rows of this run failed" in err


def test_model_and_cache_mismatch_stops_before_ray(tmp_path, capsys, no_ray, stories260k):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "Once upon a time"}])
    model = {"model.path": stories260k["model"], "model.tokenizer": stories260k["tokenizer"], "data.path": src}
    code = main("summarize", job_overrides(tmp_path, **model, **{"cache.quant": "kivi2"}))  # head_dim 8, group 32
    err = errors(capsys)
    assert code == 2 and len(err) == 1, err
    assert "quant=kivi2, group_size=32" in err[0] and "head_dim 8" in err[0] and "stories260K.bin" in err[0]
    code = main("summarize", job_overrides(tmp_path, **model, **{"generate.max_new_tokens": 600}))  # 512 context
    err = errors(capsys)
    assert code == 2 and len(err) == 1 and "generate.max_new_tokens=600" in err[0] and "512-token" in err[0], err
    assert not (tmp_path / "out").exists()


def test_relative_output_path_in_a_submitted_job(tmp_path, capsys, no_ray, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "a document"}])
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray's job supervisor sets for the entrypoint
    monkeypatch.chdir(tmp_path)
    code = main("summarize", job_overrides(tmp_path, **{"data.path": str(src), "output.path": "outputs/run1"}))
    err = errors(capsys)
    assert code == 2 and len(err) == 1 and "output.path=outputs/run1 is relative" in err[0]
    assert "absolute path" in err[0] and "s3://" in err[0] and not (tmp_path / "outputs").exists()
