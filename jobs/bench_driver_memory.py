"""The driver's memory as rows grow: `python jobs/bench_driver_memory.py [--rows 10000 100000] [--out DIR]`.

Runs the summarize job (kvstream.pipeline.job.run, in this process: this process is the driver) over N small
generated documents with the demo model and one new token per row, on a local CPU Ray, for each N in --rows, and
samples the driver's resident memory (VmRSS, every 0.1 s) before, during and after each run. The workers write the
result Parquet parts (kvstream/pipeline/parts.py); the driver only counts their stats rows, so its memory should
not grow with N. Writes `<out>/driver_memory.csv` and `.md` and prints the table.

`--files F --files-per-wave 0 K`: the input as F files, and each N run once as one Ray Data execution and once in
waves of K files (runtime.files_per_wave), each (N, waves) in a fresh driver process after its own warm-up run, so
that no run inherits another's freed memory; the table gives each run's growth (after - before). `--rows-per-file R`
instead of --files: files of R rows, so waves of K files are the same size for every N. Writes
`<out>/driver_memory_waves.csv` and `.md`.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from kvstream.pipeline.job import driver_rss_mib


def rss_mib() -> float:
    rss = driver_rss_mib()  # what the job logs after each wave
    if rss is None:
        raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")
    return rss


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


def write_docs(path: Path, n: int, files: int = 1) -> Path:
    """n documents in `files` files under the directory `path` (a single file: `path` itself)."""
    names = [path] if files == 1 else [path / f"docs-{k:04d}.jsonl" for k in range(files)]
    names[0].parent.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        with open(name, "w") as f:
            for i in range(k * n // files, (k + 1) * n // files):
                f.write(json.dumps({"id": f"doc-{i:07d}", "text": f"Short document number {i}."}) + "\n")
    return path


def one_run(n: int, work: Path, batch_size: int, id_column: bool = True, files: int = 1,
            files_per_wave: int = 0) -> dict:
    from kvstream.pipeline import load_config, run

    tag = f"{n}_{files}_{files_per_wave}"
    src = write_docs(work / f"in_{tag}" / ("docs.jsonl" if files == 1 else ""), n, files)
    over = [f"data.path={src}", f"runtime.files_per_wave={files_per_wave}", "model.path=demo:tiny-llama",
            "generate.max_new_tokens=1",
            "prompt.template='{text}'", f"runtime.batch_size={batch_size}", f"runtime.sort_window={batch_size}",
            "runtime.num_actors=1", "runtime.progress_every_s=1000000", f"output.path={work / f'out_{tag}'}",
            "output.overwrite=true"] + (["data.id_column=id"] if id_column else [])
    before = rss_mib()
    sampler = Sampler()
    sampler.start()
    start = time.time()
    stats = run(load_config("summarize", None, over))
    wall = time.time() - start
    sampler.done.set()
    sampler.join()
    after = rss_mib()
    return {"rows": n, "id_column": "id" if id_column else "(none)", "input_files": files,
            "waves": stats["waves"], "rows_ok": stats["rows_ok"], "files": len(stats["files_written"]),
            "wall_s": round(wall, 1), "rss_before_mib": round(before, 1), "rss_half_mib": round(sampler.at(0.5), 1),
            "rss_peak_mib": round(sampler.peak, 1), "rss_after_mib": round(after, 1),
            "growth_mib": round(after - before, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--warmup-rows", type=int, default=1000)
    ap.add_argument("--work", default="outputs/driver_memory")
    ap.add_argument("--out", default="bench/driver_memory_cpu")
    ap.add_argument("--no-id-column", action="store_true",
                    help="ids <file>:<row> (no data.id_column): the driver reads no input ids before the run")
    ap.add_argument("--files", type=int, default=1, help="input files per run (the rows split evenly)")
    ap.add_argument("--rows-per-file", type=int, default=None,
                    help="instead of --files: each run's input in files of this many rows (waves of equal size)")
    ap.add_argument("--files-per-wave", type=int, nargs="+", default=None,
                    help="runtime.files_per_wave values; given: each (rows, value) in a fresh driver process")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # "rows,files_per_wave": one measured run, JSON out
    a = ap.parse_args()
    import ray

    work, out = Path(a.work).resolve(), Path(a.out)
    ids = not a.no_id_column
    if a.child:
        n, per = (int(x) for x in a.child.split(","))
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
        one_run(a.warmup_rows, work, a.batch_size, ids, min(a.files, 2), min(per, 1))  # warm-up, waves if used
        print("RESULT " + json.dumps(one_run(n, work, a.batch_size, ids, a.files, per) | {"note": ""}), flush=True)
        return
    out.mkdir(parents=True, exist_ok=True)
    if a.files_per_wave is not None:
        rows = []
        for n in a.rows:
            files = -(-n // a.rows_per_file) if a.rows_per_file else a.files
            for per in a.files_per_wave:
                cmd = [sys.executable, __file__, "--child", f"{n},{per}", "--files", str(files), "--batch-size",
                       str(a.batch_size), "--warmup-rows", str(a.warmup_rows), "--work", str(work)]
                done = subprocess.run(cmd + (["--no-id-column"] if a.no_id_column else []), check=True,
                                      capture_output=True, text=True)
                rows.append(json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0]))
                print(rows[-1], flush=True)
        name = "driver_memory_waves"
    else:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
        rows = [one_run(a.warmup_rows, work, a.batch_size, ids) | {"note": "warm-up (imports, model build)"}]
        for n in a.rows:
            rows.append(one_run(n, work, a.batch_size, ids) | {"note": ""})
            print(rows[-1], flush=True)
        name = "driver_memory"
    keys = list(rows[0])
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    table = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    table += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    header = (f"Driver VmRSS, summarize job on a local CPU Ray (2 CPUs, one CPU actor), demo:tiny-llama, 1 new token "
              f"per row, batch {a.batch_size}; {time.strftime('%Y-%m-%d')}\n\n")
    if a.files_per_wave is not None:
        header += "Each row: a fresh driver process, after a warm-up run of its own. Command: " + \
            " ".join(["python", "jobs/bench_driver_memory.py", *sys.argv[1:]]) + "\n\n"
    (out / f"{name}.md").write_text(header + "\n".join(table) + "\n")
    print(header + "\n".join(table))


if __name__ == "__main__":
    main()
