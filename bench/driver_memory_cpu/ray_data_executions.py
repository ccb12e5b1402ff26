"""Where the per-wave remainder of the jobs' driver growth lives, without kvstream's pipeline: plain Ray core tasks
against plain Ray Data executions, each repeated 30 times in one driver after 3 warm-ups, with the jobs' own release
between waves after each (`release_freed_memory`: gc + glibc's `malloc_trim`). Prints and writes the RSS growth.

    python bench/driver_memory_cpu/ray_data_executions.py [OUT_MD]
"""
import sys
import time

import ray
import ray.data

from kvstream.pipeline.job import driver_rss_mib as rss_mib
from kvstream.pipeline.job import release_freed_memory as release  # the jobs' own, between waves


@ray.remote
def small(i):
    return b"x" * 1000


def core_wave():  # 1,000 tasks, their results fetched
    ray.get([small.remote(i) for i in range(1000)])


def data_wave(blocks: int):  # one Ray Data execution: range -> map_batches, streamed to the driver
    def run():
        ds = ray.data.range(20000, override_num_blocks=blocks).map_batches(lambda b: b, batch_size=None)
        for _ in ds.iter_batches(batch_size=None):
            pass
    return run


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "bench/driver_memory_cpu/ray_data_executions.md"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    for name, wave in (("Ray core: 1,000 tasks", core_wave), ("Ray Data: one execution of 10 blocks", data_wave(10)),
                       ("Ray Data: one execution of 100 blocks", data_wave(100))):
        for _ in range(3):
            wave()
        release()
        base, growth = rss_mib(), []
        for _ in range(30):
            wave()
            release()
            growth.append(rss_mib() - base)
        per = (sum(growth[-10:]) - sum(growth[:10])) / 10 / 20  # mean of the last ten minus the first ten, per wave
        rows.append(f"| {name} | {growth[9]:.1f} | {growth[19]:.1f} | {growth[29]:.1f} | {per:.2f} |")
        print(rows[-1], flush=True)
    text = (f"Driver RSS growth (MiB) after 10 / 20 / 30 repetitions, gc + malloc_trim after each; Ray "
            f"{ray.__version__}, local Ray with 2 CPUs, {time.strftime('%Y-%m-%d')}. Command: python "
            f"bench/driver_memory_cpu/ray_data_executions.py\n\n| repeated | after 10 | after 20 | after 30 | MiB per "
            f"repetition (waves 1-10 to 21-30) |\n| --- | --- | --- | --- | --- |\n" + "\n".join(rows) + "\n")
    with open(out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
