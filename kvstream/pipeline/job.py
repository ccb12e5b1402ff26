"""A batch job end to end: config -> Ray Data pipeline -> Parquet results + stats.

read files -> [limit] -> [skip rows already in the output] -> the request (`prompt` / `messages`) -> the processor
(kvstream/pipeline/processor.py: requests + tokenize + length policy -> sort windows by length -> generate, an actor
pool with one Engine per actor) -> write Parquet parts (on the workers, kvstream/pipeline/parts.py) -> small stats
rows to the driver.

Everything up to the driver's loop is lazy; Ray Data streams batches through it. The driver only counts (stats,
progress) and, at the end, dedupes ids held twice (writer.compact) and writes the stats. With
`runtime.files_per_wave` the input files run in waves, one Ray Data execution each (`file_waves`). It starts a local Ray
unless `runtime.address` or RAY_ADDRESS names a cluster (as `ray job submit` does).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import os
import signal
import sys
import time
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kvstream.pipeline.checks import check_input, check_model, check_output, check_scoring
from kvstream.pipeline.config import ConfigError, cache_config, keys_help, load_config, to_yaml
from kvstream.pipeline.demo import DEMO_COLUMNS, materialize
from kvstream.pipeline.fingerprint import check_same_job, fingerprint, write_fingerprint
from kvstream.pipeline.fs import InputError, absolute, full_url, join, list_inputs, s3_options, write_bytes_atomic
from kvstream.pipeline.ids import duplicate_plan
from kvstream.pipeline.interrupt import Interrupted, raising_on_signals
from kvstream.pipeline.logs import configure_driver, python_level, quiet
from kvstream.pipeline.parts import WriteParts, clean_temp, run_parts, settled_parts
from kvstream.pipeline.job_processor import injected_faults, job_processor
from kvstream.pipeline.prompts import RequestColumn
from kvstream.pipeline.reader import read_batch, rel_name
from kvstream.pipeline.stage import SkipDone
from kvstream.pipeline.stats import RunStats, summary
from kvstream.pipeline.totals import write_stats
from kvstream.pipeline.writer import clear_results, compact, done_ids, new_run, repeated_ids, results_dir

log = logging.getLogger("kvstream")
EXIT_CONFIG = 2  # a config or input error: one `kvstream: error:` line
EXIT_ALL_FAILED = 3  # rows were processed and every one of them failed (their errors are in the results)
EXIT_CODES = ("exit codes: 0 done; 2 config or input error (one `kvstream: error:` line); 3 every row this run "
              "processed failed; 130 / 143 interrupted by SIGINT / SIGTERM (rows so far kept: rerun to resume)")


def input_spec(cfg: DictConfig) -> dict[str, Any]:
    d = cfg.data
    col = d.text_column if cfg.task == "summarize" else d.messages_column
    passthrough = [c for c in [d.reference_column, *d.passthrough_columns] if c]
    for c in passthrough:
        if c in ("id", "error", "generated_text", "num_input_tokens", "num_generated_tokens", "prompt", "messages"):
            raise ConfigError(f"data passthrough column {c!r} collides with an output column; rename it in the data")
    return {"task": cfg.task, "input_column": col, "id_column": d.id_column, "format": d.format,
            "passthrough": list(dict.fromkeys(passthrough))}


def init_ray(cfg: DictConfig) -> None:
    import ray

    address = cfg.runtime.address or os.environ.get("RAY_ADDRESS")
    level = cfg.runtime.log_level
    configure_driver(level)
    if not ray.is_initialized():
        ray.init(address=address or None, logging_level=python_level(level))
    import ray.data  # configures its own loggers on import: quiet them after

    quiet(level)
    resources = ray.cluster_resources()
    resolve_actors(cfg, resources)
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes > 1 and not cfg.output.path.startswith(("s3://", "s3a://")):
        log.warning("output.path=%s is a local path and this Ray has %d nodes: the workers write the results on "
                    "their own node, so it must be storage every node shares (a network mount), else use s3://",
                    cfg.output.path, nodes)
    if not address:
        check_fits(cfg, resources)


def resolve_actors(cfg: DictConfig, resources: dict) -> None:
    """runtime.num_actors=auto: one actor per `num_gpus_per_actor` GPUs of the cluster (every GPU of every node
    busy), one actor in CPU mode; a GPU run on a cluster with no GPU is a ConfigError."""
    r = cfg.runtime
    if r.num_actors != "auto":
        return
    if r.num_gpus_per_actor > 0:
        gpus = resources.get("GPU", 0)
        if gpus < r.num_gpus_per_actor:
            raise ConfigError(f"runtime.num_actors=auto with runtime.num_gpus_per_actor={r.num_gpus_per_actor}: "
                              f"this Ray has {gpus:g} GPUs; set runtime.num_gpus_per_actor=0 for a CPU run")
        r.num_actors = int(gpus // r.num_gpus_per_actor)
    else:
        r.num_actors = 1


def check_fits(cfg: DictConfig, resources: dict) -> None:
    """On a fixed (local) cluster: the actor pool must fit, and leave a CPU for the read/tokenize tasks
    (else Ray Data waits forever for a CPU that the actors hold)."""
    r = cfg.runtime
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    if r.num_actors * r.num_gpus_per_actor > gpus:
        raise ConfigError(f"runtime.num_actors={r.num_actors} x runtime.num_gpus_per_actor={r.num_gpus_per_actor} "
                          f"needs more GPUs than this Ray has ({gpus:g}); lower one of them")
    if r.num_actors * r.num_cpus_per_actor > cpus - 1:
        raise ConfigError(f"runtime.num_actors={r.num_actors} x runtime.num_cpus_per_actor={r.num_cpus_per_actor} "
                          f"leaves no CPU of this Ray's {cpus:g} for reading and tokenizing; lower one of them "
                          f"(fractions such as 0.5 are fine)")


def build_dataset(cfg: DictConfig, files: list[str], base: str, spec: dict, done_ref, s3: dict,
                  ids: dict | None = None):
    """The lazy Ray Dataset of result rows (`done_ref`: an ObjectRef of the ids already done, or None; `ids`: the
    repeated-id plan of kvstream/pipeline/ids.py)."""
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = cfg.data.limit is not None  # the same first rows on every run
    items = [{"file": f, "rel": rel_name(f, base)} for f in files]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(read_batch, batch_size=1, batch_format="numpy",
                        fn_kwargs={"spec": spec, "s3": s3, "ids": ids or {}})
    r = cfg.runtime
    window = r.sort_window or 16 * r.batch_size
    ds = ds.repartition(target_num_rows_per_block=window)  # files -> windows: tokenizing runs in parallel
    if cfg.data.limit is not None:
        ds = ds.limit(int(cfg.data.limit))
    if done_ref is not None:
        ds = SkipDone(done_ref).apply(ds)
    ds = job_processor(cfg, window)(RequestColumn(cfg.task, cfg.prompt.template).apply(ds))
    return ds.drop_columns(["prompt" if cfg.task == "summarize" else "messages"])  # the request, not a result


def file_waves(files: list[str], per_wave: int, limit: int | None) -> list[list[str]]:
    """The input files in waves of `per_wave` (runtime.files_per_wave), each run as its own Ray Data execution.

    Ray Data keeps a statistics record of every block each operator has produced until the execution ends
    (ray-project/ray#66016), so one execution's driver memory grows with the rows it streams; between waves it is
    freed, so the driver holds one wave's. Each wave starts its own actor pool (a model load per actor, seconds
    against a wave's hours on a GPU). One wave when `per_wave` is 0 or data.limit is set (the limit counts the
    first rows of the whole input, in one execution)."""
    if not per_wave or limit is not None or len(files) <= per_wave:
        return [files]
    return [files[i:i + per_wave] for i in range(0, len(files), per_wave)]


def resolved_yaml(cfg: DictConfig) -> str:
    safe = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for k in ("key", "secret"):
        if safe.s3[k]:
            safe.s3[k] = "***"
    return to_yaml(safe)


def release_freed_memory() -> None:
    """Between waves: collect the finished wave's Python cycles, then hand the heap's free pages back to the system
    (glibc's `malloc_trim`; nothing where the C library has none). Measured on the 2-core dev box (README, "Waves"):
    200,000 rows in 20 waves grew the driver 28.0 MiB without it, 15.7 MiB with it."""
    gc.collect()
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def driver_rss_mib() -> float | None:
    """This process's resident memory (VmRSS) in MiB; None where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one job; returns this invocation's stats (<output.path>/stats.parquet gets them as a row, stats.json the
    totals over every row of the output; `output_rows` / `output_rows_failed` here)."""
    s3 = s3_options(OmegaConf.to_container(cfg.s3, resolve=True))
    output = cfg.output.path
    keys = fingerprint(cfg)  # before demo data is materialized: data.path as the user gave it
    check_model(cfg)
    check_scoring(cfg)
    check_output(output, s3)
    if cfg.data.path.startswith("demo:"):
        kind = cfg.data.path.split(":", 1)[1]
        path = materialize(kind, output, s3, cfg.data.demo_rows)
        cfg = OmegaConf.merge(cfg, {"data": {"path": path, **DEMO_COLUMNS.get(kind, {})}})
    spec = input_spec(cfg)
    files, base = list_inputs(cfg.data.path, s3, cfg.data.format)
    check_input(cfg.data.path, files, spec, s3)
    ids = duplicate_plan(files, base, spec, s3, cfg.data.on_duplicate_id, cfg.data.limit)
    if cfg.output.overwrite:
        clear_results(output, s3)
    done = done_ids(output, s3)
    if done and not cfg.output.resume:
        raise ConfigError(f"output.path={output} already holds {len(done)} result rows: "
                          "set output.resume=true to continue or output.overwrite=true to replace them")
    check_same_job(output, keys, len(done), s3)
    if len(set(done)) < len(done):  # a retry interrupted between writing new rows and dropping the old ones
        log.warning("output.path=%s: %d older rows of ids written again dropped", output, compact(output, s3))
        done = list(set(done))
    write_fingerprint(output, keys, s3)
    write_bytes_atomic(join(output, "config.yaml"), resolved_yaml(cfg).encode(), s3)
    init_ray(cfg)
    import ray
    stats, run_id = RunStats(cfg.data.reference_column), new_run()
    results = results_dir(absolute(output))  # the workers write here: absolute, as their working directory differs
    clean_temp(results, s3)
    interrupted: Interrupted | None = None
    retry: set[str] = set()
    waves = file_waves(files, cfg.runtime.files_per_wave, cfg.data.limit)
    batches, finished = None, False
    last = time.time()
    try:
        with raising_on_signals():
            retry = set(done_ids(output, s3, failed=True)) if cfg.output.retry_failed else set()
            if retry:
                done = [i for i in done if i not in retry]
            per, batch = cfg.output.rows_per_file, cfg.runtime.batch_size  # parts of whole generation batches
            writer = WriteParts(results, run_id, per, s3, cfg.data.reference_column, injected_faults(),
                                bundle_rows=max(1, per // batch) * batch)
            done_ref = ray.put(done) if done else None  # once for every wave
            for k, group in enumerate(waves):
                if len(waves) > 1:
                    log.info("wave %d of %d: %d input files", k + 1, len(waves), len(group))
                ds = writer.apply(build_dataset(cfg, group, base, spec, done_ref, s3, ids))
                batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
                for table in batches:  # the stats rows of parts the workers have written
                    stats.add(table)
                    if time.time() - last >= cfg.runtime.progress_every_s:
                        last = time.time()
                        print(f"[kvstream] {stats.rows} rows ({stats.failed} failed), {stats.output_tokens} tokens "
                              f"out, {stats.output_tokens / (last - stats.start):.1f} tok/s", flush=True)
                batches = ds = None  # the wave's Ray Data state (its per-block stats) goes with its dataset
                if len(waves) > 1:
                    release_freed_memory()
                    rss = driver_rss_mib()
                    log.info("wave %d of %d done: %d rows so far, driver RSS %s MiB", k + 1, len(waves), stats.rows,
                             "?" if rss is None else f"{rss:.0f}")
            finished = True
    except Interrupted as e:
        interrupted = e
    finally:
        if hasattr(batches, "close"):
            batches.close()  # stops Ray Data's executor (and its actors) now, not at garbage collection
        # from the listing: parts of this run (stopped early: once the cancelled writers' last renames are done)
        written, rows_written = run_parts(results, run_id, s3) if finished else settled_parts(results, run_id, s3)
        # the retried rows' older, failed rows go; and where the parts hold more rows than the stats rows counted (a
        # block written twice, e.g. rebuilt with other rows), any id held twice (the ids are read only then)
        if written and (retry or (rows_written != stats.rows and repeated_ids(output, s3))):
            compact(output, s3)
    stats.skipped = len(set(done))
    stats.retried = len(retry)
    c = cache_config(cfg)
    result = stats.result({
        "task": cfg.task, "model": cfg.model.path, "results": results,
        "files_written": [full_url(f, output) for f in written],
        "cache": f"{c.policy}(budget={c.budget})+{c.quant}" if c.policy != "full" else f"full+{c.quant}",
        "invocation": run_id, "interrupted": interrupted.args[0] if interrupted else None, "waves": len(waves),
    })
    totals = write_stats(output, result, cfg.data.reference_column, s3)
    result.update(output_rows=totals["rows"], output_rows_failed=totals["rows_failed"])
    if interrupted:
        raise Interrupted(interrupted.signum, rows_written, results)
    return result


def main(task: str, argv: list[str] | None = None) -> int:
    """CLI: `python jobs/<task>.py [--config conf/<task>.yaml] [key=value ...]`."""
    parser = argparse.ArgumentParser(prog=f"jobs/{task}.py", description=f"kvstream {task} batch job",
                                     epilog=f"{keys_help(task)}\n\n{EXIT_CODES}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file merged over the defaults")
    parser.add_argument("overrides", nargs="*", help="key=value (omegaconf dotlist), e.g. cache.policy=keyformer")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("kvstream").setLevel(logging.INFO)
    try:
        cfg = load_config(task, args.config, args.overrides)
        stats = run(cfg)
    except (ConfigError, InputError) as e:
        print(f"kvstream: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except Interrupted as e:
        print(e.message(), file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside the results stream (checks, Ray start, writing the stats)
        print("kvstream: interrupted (SIGINT); rows already written are kept; rerun the same command to resume",
              file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    except Exception as e:
        cause = find_input_error(e)
        if cause is None:
            raise
        print(f"kvstream: error: {cause}", file=sys.stderr)
        return EXIT_CONFIG
    print(summary(stats), flush=True)
    if stats["rows"] and not stats["rows_ok"]:
        print(f"kvstream: error: all {stats['rows']} rows of this run failed (errors above and in the rows' error "
              f"column under {stats['results']}); exit {EXIT_ALL_FAILED}", file=sys.stderr)
        return EXIT_ALL_FAILED
    return 0


def find_input_error(e: BaseException) -> str | None:
    """The InputError message inside an exception raised through Ray (task errors wrap the original)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, InputError):
            return str(e).strip().splitlines()[-1]
        if "InputError" in str(e):
            lines = [ln for ln in str(e).splitlines() if "InputError" in ln]
            return lines[-1].split("InputError:", 1)[-1].strip()
        e = e.__cause__ or e.__context__
    return None
