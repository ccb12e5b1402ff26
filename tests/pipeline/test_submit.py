"""The README's `ray job submit` block, run as written: `ray start --head`, `RAY_AUTH_MODE=token ray job submit ...`.

What differs, only for isolation: `ray start` gets free ports and its own temp dir (appended flags) and `--block`,
the submit address names that dashboard port instead of 8265, and the cluster is stopped by terminating its
`--block` process instead of `ray stop` (which would stop every Ray on the machine, this test session's included).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pyarrow.parquet as pq

from tests.pipeline.helpers import ROOT, free_port

CODE_DIRS = ("kvstream", "jobs", "conf")
HEADING = "### `ray job submit` on one machine"


def readme_commands() -> list[str]:
    """The shell commands of the README's first code block under HEADING (continuation lines joined)."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index(HEADING):].split("```bash\n", 1)[1].split("```", 1)[0]
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def wait_http(url: str, timeout: float, proc: subprocess.Popen) -> bool:
    """Whether `url` answers within `timeout` s while `proc` (the server's process) is alive."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(url, timeout=2)
            return True
        except urllib.error.HTTPError:  # e.g. 401 with Ray's token authentication: the server is up
            return True
        except Exception:
            time.sleep(0.5)
    return False


def start_head(start: str, env: dict, tries: int = 3) -> tuple[subprocess.Popen, str, str]:
    """The README's `ray start --head` with `--block`, free ports and its own temp dir -> (its process, the dashboard
    URL, the temp dir) once the dashboard answers. A head that exits or whose dashboard stays silent for 90 s (a
    port taken between picking it and Ray binding it, a slow start on a loaded 2-core machine) is stopped and
    started again on other ports; after `tries` the error shows each try's last output."""
    failures = []
    for _ in range(tries):
        temp_dir = tempfile.mkdtemp(prefix="/tmp/kvs")  # short: Ray's unix socket paths live below it
        ports = {k: free_port() for k in ("port", "dashboard-port", "ray-client-server-port", "node-manager-port",
                                          "object-manager-port", "dashboard-agent-listen-port", "metrics-export-port",
                                          "dashboard-agent-grpc-port", "runtime-env-agent-port")}
        lo = free_port() % 20000 + 30000
        while any(lo <= p <= lo + 200 for p in ports.values()):  # ray start refuses a port inside the worker range
            lo = (lo - 30000 + 201) % 20000 + 30000
        cmd = start.split() + [
            "--block", "--include-dashboard=true", "--disable-usage-stats", "--dashboard-host=127.0.0.1",
            "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", f"--min-worker-port={lo}",
            f"--max-worker-port={lo + 200}"] + [f"--{k}={v}" for k, v in ports.items()]
        log_path = os.path.join(temp_dir, "head.log")  # a file, not a pipe nobody reads while the test runs
        with open(log_path, "wb") as log:
            head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
        if wait_http(dashboard + "/api/version", 90, head):
            return head, dashboard, temp_dir
        stop_head(head)
        with open(log_path, errors="replace") as f:
            failures.append(f"exit code {head.returncode}: {f.read()[-1500:]}")
        shutil.rmtree(temp_dir, ignore_errors=True)
    raise TimeoutError(f"ray start --head: no dashboard after {tries} tries:\n" + "\n---\n".join(failures))


def stop_head(head: subprocess.Popen) -> None:
    """Terminate the `--block` head's process group (not `ray stop`, which would stop every Ray on the machine)."""
    try:
        os.killpg(head.pid, signal.SIGTERM)  # Ray drains for up to 30 s on SIGTERM: give it a few, then kill
    except ProcessLookupError:  # already gone
        return
    try:
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait(timeout=30)


def test_readme_ray_job_submit_sequence(tmp_path):
    start, submit, stop = readme_commands()
    assert start == "ray start --head --num-cpus=2" and stop == "ray stop"
    assert submit.startswith("RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 ")
    work = tmp_path / "repo"
    for d in CODE_DIRS:
        shutil.copytree(ROOT / d, work / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    head, dashboard, temp_dir = start_head(start, env)
    out = work / "outputs" / "submitted"
    try:
        submitted = subprocess.run(submit.replace("http://127.0.0.1:8265", dashboard), shell=True, cwd=work, env=env,
                                   capture_output=True, text=True, timeout=300)
        log = submitted.stdout + submitted.stderr
        assert submitted.returncode == 0, log[-4000:]
        assert "succeeded" in log and "kvstream summarize: 12 rows (12 ok" in log
        assert f"results: {out / 'results'}" in log  # the absolute location
        rows = pq.read_table(str(out / "results")).to_pylist()
        assert sorted(r["id"] for r in rows) == [f"demo-{i:04d}" for i in range(12)]
        assert json.loads((out / "stats.json").read_text())["rows_ok"] == 12
    finally:
        stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
