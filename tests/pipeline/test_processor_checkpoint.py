"""The processor under Ray Data's own checkpointing (`DataContext.checkpoint_config = CheckpointConfig(id_column=...)`):
read -> processor -> write_parquet; a worker killed mid-run, then a rerun over a grown input: only the new ids are
generated and every id is written exactly once.

Its own Ray in a subprocess with 4 logical CPUs: Ray's checkpoint filter is an actor pool of its own, and beside the
generation actor it leaves no CPU for the read tasks on the folder's shared 2-CPU Ray (the run waits forever).
"""

import json
import subprocess
import sys

from tests.pipeline.helpers import ROOT

SCRIPT = r"""
import json, os, sys
import pyarrow.parquet as pq
import ray, ray.data
from ray.data.checkpoint import CheckpointConfig
from kvstream.pipeline import KVStreamProcessorConfig, build_processor

tmp = sys.argv[1]
ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
ctx = ray.data.DataContext.get_current()
ctx.enable_progress_bars = False
ctx.checkpoint_config = CheckpointConfig(id_column="id", checkpoint_path=f"{tmp}/ckpt",
                                         delete_checkpoint_on_success=False)
marker = f"{tmp}/killed"

def pre(row):
    if row["id"] == "d1" and not os.path.exists(marker):  # the worker dies mid-run, once
        open(marker, "w").close()
        os._exit(1)
    return dict(prompt="Summarize: " + row["text"], sampling_params=dict(max_tokens=2))

processor = build_processor(KVStreamProcessorConfig(model_source="demo:tiny-llama", num_cpus=0.5, batch_size=2),
                            preprocess=pre, postprocess=lambda r: dict(id=r["id"], summary=r["generated_text"]))
runs = []
for n in (4, 6):
    with open(f"{tmp}/in/docs.jsonl", "w") as f:
        f.writelines(json.dumps({"id": f"d{i}", "text": f"document {i}"}) + "\n" for i in range(n))
    before = set(os.listdir(f"{tmp}/out")) if os.path.exists(f"{tmp}/out") else set()
    processor(ray.data.read_json(f"{tmp}/in")).write_parquet(f"{tmp}/out")
    new = sorted(set(os.listdir(f"{tmp}/out")) - before)
    runs.append({"new_ids": sorted(i for f in new for i in pq.read_table(f"{tmp}/out/{f}")["id"].to_pylist())})
rows = pq.read_table(f"{tmp}/out").to_pylist()
print("RESULT " + json.dumps({"runs": runs, "ids": [r["id"] for r in rows], "killed": os.path.exists(marker),
                              "empty": [r["id"] for r in rows if not r["summary"] or r["error"]]}))
"""


def test_ray_checkpoint_config_resumes_the_processor(tmp_path):
    (tmp_path / "in").mkdir()
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=400)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT "):])
    assert got["killed"]  # a worker did die (and its task was retried)
    assert got["runs"][0]["new_ids"] == ["d0", "d1", "d2", "d3"]
    assert got["runs"][1]["new_ids"] == ["d4", "d5"]  # the rerun generated only the rows not checkpointed
    assert sorted(got["ids"]) == [f"d{i}" for i in range(6)] and got["empty"] == []  # each id exactly once
