"""S3 in and out through s3fs against moto's S3 server on loopback, credentials from the AWS env variables."""

import io
import json

import fsspec
import pyarrow.parquet as pq

from kvstream.pipeline import load_config, run
from tests.pipeline.helpers import job_overrides


def test_s3_input_and_output(tmp_path, ray_local, s3_server, monkeypatch):
    for k in ("AWS_ENDPOINT_URL", "AWS_REGION"):  # endpoint and region from the environment ...
        monkeypatch.setenv(k, s3_server[k])
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    fs = fsspec.filesystem("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"], key="testing", secret="testing",
                           skip_instance_cache=True)
    fs.mkdir("kvs-bucket")
    docs = [{"doc": f"s3 document {i} " * (i + 2), "ref": f"summary {i}"} for i in range(5)]
    for part in (0, 1):
        rows = docs[part * 3:(part + 1) * 3]
        fs.pipe_file(f"kvs-bucket/in/part{part}.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    over = job_overrides(tmp_path, **{
        "data.path": "s3://kvs-bucket/in/*.jsonl", "data.text_column": "doc", "data.reference_column": "ref",
        "output.path": "s3://kvs-bucket/out/run1", "s3.key": "testing", "s3.secret": "testing",  # ... keys from config
    })
    stats = run(load_config("summarize", None, over))
    assert stats["rows_ok"] == 5
    files = fs.glob("kvs-bucket/out/run1/results/*.parquet")
    assert files
    got = [r for f in files for r in pq.read_table(io.BytesIO(fs.cat_file(f))).to_pylist()]
    assert sorted(r["id"] for r in got) == ["part0.jsonl:0", "part0.jsonl:1", "part0.jsonl:2",
                                            "part1.jsonl:0", "part1.jsonl:1"]
    assert sorted(r["ref"] for r in got) == [f"summary {i}" for i in range(5)]
    saved = json.loads(fs.cat_file("kvs-bucket/out/run1/stats.json"))
    assert saved["rows_ok"] == 5 and saved["rouge"]["rouge_rows"] == 5
    conf = fs.cat_file("kvs-bucket/out/run1/config.yaml").decode()
    assert "s3://kvs-bucket/in/*.jsonl" in conf and "testing" not in conf  # credentials never saved
    # resume against S3: nothing left to do
    again = run(load_config("summarize", None, over))
    assert again["rows"] == 0 and again["rows_skipped_resume"] == 5
