"""The driver's memory as rows grow: `python jobs/bench_driver_memory.py [--rows 10000 100000] [--out DIR]`.

Runs the summarize job (kvstream.pipeline.job.run, in this process: this process is the driver) over N small
generated documents with the demo model and one new token per row, on a local CPU Ray, for each N in --rows, and
samples the driver's resident memory (VmRSS, every 0.1 s) before, during and after each run. The workers write the
result Parquet parts (kvstream/pipeline/parts.py); the driver only counts their stats rows, so its memory should
not grow with N. Writes `<out>/driver_memory.csv` and `.md` and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import threading
import time
from pathlib import Path


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


class Sampler(threading.Thread):
    """The peak VmRSS of this process while it runs, and every sample (to read it at a fraction of the run)."""

    def __init__(self, every_s: float = 0.1):
        super().__init__(daemon=True)
        self.every_s, self.peak, self.done = every_s, rss_mib(), threading.Event()
        self.samples: list[float] = []

    def run(self) -> None:
        while not self.done.wait(self.every_s):
            self.samples.append(rss_mib())
            self.peak = max(self.peak, self.samples[-1])

    def at(self, fraction: float) -> float:
        return self.samples[min(len(self.samples) - 1, int(fraction * len(self.samples)))] if self.samples else 0.0


def write_docs(path: Path, n: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"doc-{i:07d}", "text": f"Short document number {i}."}) + "\n")
    return path


def one_run(n: int, work: Path, batch_size: int, id_column: bool = True) -> dict:
    from kvstream.pipeline import load_config, run

    src = write_docs(work / f"in_{n}" / "docs.jsonl", n)
    over = [f"data.path={src}", "model.path=demo:tiny-llama", "generate.max_new_tokens=1",
            "prompt.template='{text}'", f"runtime.batch_size={batch_size}", f"runtime.sort_window={batch_size}",
            "runtime.num_actors=1", "runtime.progress_every_s=1000000", f"output.path={work / f'out_{n}'}",
            "output.overwrite=true"] + (["data.id_column=id"] if id_column else [])
    before = rss_mib()
    sampler = Sampler()
    sampler.start()
    start = time.time()
    stats = run(load_config("summarize", None, over))
    wall = time.time() - start
    sampler.done.set()
    sampler.join()
    return {"rows": n, "id_column": "id" if id_column else "(none)", "rows_ok": stats["rows_ok"], "files": len(stats["files_written"]), "wall_s": round(wall, 1),
            "rss_before_mib": round(before, 1), "rss_half_mib": round(sampler.at(0.5), 1),
            "rss_peak_mib": round(sampler.peak, 1),
            "rss_after_mib": round(rss_mib(), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--warmup-rows", type=int, default=1000)
    ap.add_argument("--work", default="outputs/driver_memory")
    ap.add_argument("--out", default="bench/driver_memory_cpu")
    ap.add_argument("--no-id-column", action="store_true",
                    help="ids <file>:<row> (no data.id_column): the driver reads no input ids before the run")
    a = ap.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    work, out = Path(a.work).resolve(), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ids = not a.no_id_column
    rows = [one_run(a.warmup_rows, work, a.batch_size, ids) | {"note": "warm-up (imports, model build)"}]
    for n in a.rows:
        rows.append(one_run(n, work, a.batch_size, ids) | {"note": ""})
        print(rows[-1], flush=True)
    keys = list(rows[0])
    with open(out / "driver_memory.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    table = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    table += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    header = (f"Driver VmRSS, summarize job on a local CPU Ray (2 CPUs, one CPU actor), demo:tiny-llama, 1 new token "
              f"per row, batch {a.batch_size}; {time.strftime('%Y-%m-%d')}\n\n")
    (out / "driver_memory.md").write_text(header + "\n".join(table) + "\n")
    print(header + "\n".join(table))


if __name__ == "__main__":
    main()
