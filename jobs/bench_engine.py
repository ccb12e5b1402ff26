"""End-to-end generation on the engine against transformers' own caches, in one run on one GPU.

    python jobs/bench_engine.py --batch 16 --prompt 4096 --new 256 --out bench/engine_h100.csv    # (a) batch 16
    python jobs/bench_engine.py --batch max --hf-batch 20 --out bench/engine_a_max.csv             # (a) max batch
    python jobs/bench_engine.py --batch max --hf-batch 8 --new 4096 --out bench/engine_b.csv       # (b)
    python jobs/bench_engine.py --mix ../shared/data/longbench_multi_news/multi_news.jsonl --hf-batch 16  # (c)

A Llama-2-7B-shaped model (or `--shape llama3-8b`: 8 KV heads) with random bf16 weights (speed does not depend on
the values) generates greedily from random prompts, every row to `--new` tokens (no EOS). Rows:
- hf-dynamic: transformers `generate` with its DynamicCache and SDPA;
- hf-static: transformers `generate` with `cache_implementation="static"` (its forward compiled by transformers;
  the first call's extra time is reported apart as compile_s; for kvstream configs compile_s is the warm-up call:
  two of the prompts through a scheduler of the measured call's shapes, which compiles its Triton kernels);
- kvstream configs through `Engine.generate` (the fast decode path: CUDA-graph captured where the cache's step
  is capturable, else eager; the `graph` column says which), with the engine's compact forward; a config +
  `@modules` (e.g. `full@modules`) runs the same engine through the transformers modules (before / after in one run).
`--batch max`: each kvstream config decodes as many sequences as its slot pool fits in 90% of the GPU memory beside
the weights (kvstream.kvcache.capacity: a smaller cache is a bigger batch); the baselines run at `--hf-batch`.
kvstream's prefill and decode times are GPU time from CUDA events around each scheduler phase of the measured call;
the baselines' prefill is a max_new_tokens=1 call. `--mix FILE.jsonl` (workload c): `--mix-docs` documents whose
prompt lengths follow the file's longest text field (~4 characters a token, clipped to [--mix-min, --prompt]) and
output lengths drawn in [--mix-new], through kvstream's continuous batching, against transformers' static cache in
length-sorted batches of --hf-batch (each batch runs to its longest output; one compiled decode shape).
For each: tokens/s end to end, prefill seconds, decode ms/step, the step's roofline
((weight bytes + the cache bytes a step reads) / copy bandwidth measured in this run) and the ratio, host CPU ms
per step, peak GiB above the weights, KV bytes held / full. Writes a CSV (GPU, versions, date in a `#` first
line) and a Markdown table beside it, and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from unittest import mock

import torch

from kvstream import CacheConfig, Engine
from kvstream.bench_tables import write_tables
from kvstream.kernels.bandwidth import copy_bandwidth
from kvstream.kvcache.models import REFERENCE_SHAPES

CONFIGS = {
    "hf-dynamic": None,
    "hf-static": None,
    "full": dict(policy="full"),
    "full+fp8": dict(policy="full", quant="fp8"),
    "full+kivi2": dict(policy="full", quant="kivi2"),
    "h2o0.5": dict(policy="h2o", budget=0.5),
    "keyformer0.5": dict(policy="keyformer", budget=0.5),
    "keyformer0.5+kivi2": dict(policy="keyformer", budget=0.5, quant="kivi2"),
    "keyformer0.5+fp8": dict(policy="keyformer", budget=0.5, quant="fp8"),
}


def build_model(shape: str, layers: int | None, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(REFERENCE_SHAPES[shape], max_position_embeddings=32768, attn_implementation="sdpa", bos_token_id=1,
              eos_token_id=2, pad_token_id=0)
    if layers:
        kw["num_hidden_layers"] = layers
    with torch.device(device):
        return LlamaForCausalLM(LlamaConfig(**kw)).to(torch.bfloat16).eval()


def hf_generate(model, name: str, ids, new: int):
    model.config._attn_implementation = "sdpa"
    extra = dict(cache_implementation="static") if name == "hf-static" else {}
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0, eos_token_id=None, **extra)
    return None


VARIANT = "@modules"  # a kvstream config + "@modules": the engine drives the transformers modules instead of
# its compact forward (kvstream.kvcache.forward), for the before / after in one run


def forward_of(name: str):
    """KVSTREAM_FORWARD for the config `name` while it runs (a context manager; the environment restored after)."""
    return mock.patch.dict(os.environ, {"KVSTREAM_FORWARD": "modules" if name.endswith(VARIANT) else "compact"})


PREFILL_TOKENS: list[int | None] = [None]  # --prefill-tokens: chunked admissions (None: each prompt whole)


def kv_engine(model, name: str) -> Engine:
    eng = Engine(model, cache=CacheConfig(**CONFIGS[name], engine="fast"))
    eng.eos_token_ids = []  # every row runs to its max_new_tokens, as min_new_tokens does for the baselines
    eng.record_timing = True
    eng.prefill_tokens = PREFILL_TOKENS[0]
    return eng


def kv_generate(model, name: str, prompts: list[list[int]], new: int):
    eng = kv_engine(model, name)
    rows = eng.generate(prompts, max_new_tokens=new)
    return rows, eng


def warm_up(model, name: str, prompts: list[list[int]], new: int) -> None:
    """Every kernel of the measured call compiled (Triton specializes on sizes and strides) before it is timed: a
    scheduler of the call's own shapes (its slot count, longest prompt and max_new_tokens: `Engine.scheduler`)
    through two of its prompts for a few steps (eager steps, the capture, replays)."""
    from kvstream.kvcache.scheduler import Request

    eng = kv_engine(model, name)
    sched = eng.scheduler(len(prompts), max(len(p) for p in prompts), new)
    for i, p in enumerate(prompts[:2]):
        sched.add(Request(str(i), p, max_new_tokens=min(new, 8)))
    with torch.inference_mode():
        while sched.has_work():
            sched.step()
    del sched
    torch.cuda.empty_cache()


def max_batch(model, name: str, prompt: int, new: int) -> int:
    """The sequences a kvstream config's slot pool holds beside the weights (what Engine.generate would use)."""
    from kvstream.kvcache.capacity import slots_that_fit

    torch.cuda.empty_cache()
    cfg = CacheConfig(**CONFIGS[name], max_new_tokens=new)
    return slots_that_fit(cfg, model, prompt, new, torch.bfloat16, torch.device("cuda"), 0.9)


def timed(fn):
    torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t, time.process_time() - c


def bench_one(model, name, ids, prompts, new, w_bytes, bw, layers, kv_heads, head_dim) -> dict:
    B, T = ids.shape
    if CONFIGS[name] is None:
        gen = lambda n, i=ids: hf_generate(model, name, i, n)  # noqa: E731
        _, warm_s, _ = timed(lambda: gen(new))  # transformers' static-cache compile, primes
        _, prefill_s, _ = timed(lambda: gen(1))
        torch.cuda.reset_peak_memory_stats()
        _, total_s, cpu_s = timed(lambda: gen(new))
        rows, eng, steps = None, None, new - 1
        step_ms = 1e3 * (total_s - prefill_s) / steps
        median_ms = max_ms = float("nan")  # one generate call: no per-step times
    else:
        warm_s = timed(lambda: warm_up(model, name, prompts, new))[1]  # Triton compiles at the call's shapes
        torch.cuda.reset_peak_memory_stats()
        (rows, eng), total_s, cpu_s = timed(lambda: kv_generate(model, name, prompts, new))
        t = eng.last_timing
        prefill_s, steps = t["prefill_s"], t["decode_steps"]
        step_ms = 1e3 * t["decode_s"] / steps
        median_ms, max_ms = t["decode_ms_median"], t["decode_ms_max"]  # the typical step; the slowest (the capture)
    peak = torch.cuda.max_memory_allocated() - w_bytes
    full_bytes = 2 * layers * kv_heads * head_dim * 2 * B * (T + new - 1)
    kv = full_bytes if rows is None else sum(r["kv_bytes"] for r in rows)
    kv_full = full_bytes if rows is None else sum(r["kv_bytes_full"] for r in rows)
    roof_ms = 1e3 * (w_bytes + kv) / bw
    return dict(config=name, batch=B, concurrent=B if eng is None else eng.last_num_slots, prompt=T, new=new,
                tokens_per_s=B * new / total_s, docs_per_s=B / total_s, total_s=total_s, prefill_s=prefill_s,
                decode_step_ms=step_ms, roofline_step_ms=roof_ms, step_vs_roofline=step_ms / roof_ms,
                step_ms_median=median_ms, step_ms_max=max_ms,
                cpu_ms_per_step=1e3 * cpu_s / steps, gpu_ms_per_step=step_ms,
                graph="-" if eng is None else "yes" if eng.last_graph else "no",
                compile_s=max(0.0, warm_s - total_s) if eng is None else warm_s, kv_bytes_ratio=kv / kv_full,
                peak_gib_above_weights=peak / 2**30)


def mix_lengths(path: str, docs: int, lo: int, hi: int, new_range: tuple[int, int], seed: int = 0):
    """Workload (c): prompt lengths from a real dataset's documents (~4 characters a token), clipped to [lo, hi],
    `docs` of them drawn with replacement, and output lengths uniform in new_range."""
    import json
    import random

    texts = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            texts.append(max((v for v in row.values() if isinstance(v, str)), key=len))
    rnd = random.Random(seed)
    lens = [min(hi, max(lo, len(rnd.choice(texts)) // 4)) for _ in range(docs)]
    news = [rnd.randint(*new_range) for _ in range(docs)]
    return lens, news


def bench_mix(model, name, lens, news, hf_batch, vocab, w_bytes) -> dict:
    """Workload (c) for one config: every document through kvstream's Scheduler (num_slots auto), or through
    transformers' static cache in length-sorted batches of hf_batch. Tokens counted: each document's own."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]
    dev = torch.device("cuda")
    if CONFIGS[name] is not None:
        from kvstream.kvcache.scheduler import Request, Scheduler

        eng = kv_engine(model, name)
        compile_s = timed(lambda: warm_up(model, name, prompts, max(news)))[1]  # Triton compiles at the run's shapes

        def run():
            sched = Scheduler(eng, "auto", max(lens), max(news), timing=True, prefill_tokens=eng.prefill_tokens)
            for i, (p, m) in enumerate(zip(prompts, news)):
                sched.add(Request(str(i), p, max_new_tokens=m))
            done = 0
            while sched.has_work():
                done += len(sched.step())
            assert done == len(prompts)
            return sched

        torch.cuda.reset_peak_memory_stats()
        sched, total_s, cpu_s = timed(run)
        t = sched.timing()
        conc, prefill_s, steps, decode_s = sched.num_slots, t["prefill_s"], t["decode_steps"], t["decode_s"]
    else:
        from transformers import StaticCache

        order = sorted(range(len(lens)), key=lambda i: lens[i])
        batches = [order[i:i + hf_batch] for i in range(0, len(order), hf_batch)]
        cache_len = max(lens) + max(news)

        def one(batch, width=None, new=None):
            rows = [prompts[i] for i in batch] + [prompts[batch[0]]] * (hf_batch - len(batch))  # fixed batch
            width = width or max(len(r) for r in rows)
            ids = torch.zeros((hf_batch, width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, r in enumerate(rows):
                r = r[-width:]
                ids[j, width - len(r):], mask[j, width - len(r):] = torch.tensor(r), 1
            new = new or max(news[i] for i in batch)
            cache = StaticCache(config=model.config, max_cache_len=cache_len)
            with torch.inference_mode():
                model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), past_key_values=cache,
                               max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                               eos_token_id=None)

        _, compile_s, _ = timed(lambda: one(batches[0], width=64, new=8))  # the decode step's compile
        torch.cuda.reset_peak_memory_stats()
        _, total_s, cpu_s = timed(lambda: [one(b) for b in batches])
        conc, prefill_s, steps, decode_s = hf_batch, float("nan"), sum(max(news[i] for i in b) for b in batches), 0.0
    gen_tokens = sum(news)
    return dict(config=name, workload="mix", docs=len(lens), concurrent=conc, tokens_per_s=gen_tokens / total_s,
                docs_per_s=len(lens) / total_s, total_s=total_s, prefill_s=prefill_s,
                decode_step_ms=1e3 * decode_s / steps if decode_s else float("nan"),
                cpu_ms_per_step=1e3 * cpu_s / steps, compile_s=compile_s,
                peak_gib_above_weights=(torch.cuda.max_memory_allocated() - w_bytes) / 2**30)


def profile_step(model, name: str, prompts: list[list[int]], path: str, new: int, steps: int = 3) -> str:
    """GPU kernel time of `steps` eager decode steps of a kvstream config (torch.profiler), by kernel, to `path`.

    Eager and graph-replayed steps run the same kernels; the sum here against the graph step's measured time
    says whether the step is bound by kernel time or by the gaps between kernels."""
    from torch.profiler import ProfilerActivity, profile

    from kvstream.kvcache.scheduler import Request, Scheduler

    eng = kv_engine(model, name)
    width = max(new, 5 * steps + 16)  # the pool of the measured runs (its slot capacities follow max_new_tokens)
    sched = Scheduler(eng, len(prompts), len(prompts[0]), width)
    runner = sched.runner
    graph_ok = runner.use_graph
    for i, p in enumerate(prompts):
        sched.add(Request(str(i), p, max_new_tokens=width))
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    loop_note = ""
    with torch.inference_mode():
        sched.step()  # admissions (prefills) and a first step
        if graph_ok:
            # first the scheduler's own loop (snapshot, lagged flags, collection) around the replay, as
            # Engine.generate runs it: GPU time between events around its steps, the host's CPU time per step.
            # Before any direct runner.step below: the scheduler follows every row's tokens from its snapshots
            for _ in range(3):  # the eager warm-up steps and the capture
                sched.step()
            torch.cuda.synchronize()
            cpu0 = time.process_time()
            ev[0].record()
            for _ in range(steps):
                sched.step()
            ev[1].record()
            torch.cuda.synchronize()
            loop_ms, loop_cpu = ev[0].elapsed_time(ev[1]) / steps, 1e3 * (time.process_time() - cpu0) / steps
            loop_note = f"; a scheduler step around the replay {loop_ms:.2f} ms, host CPU {loop_cpu:.2f} ms"
        runner.use_graph = False  # eager steps: the same kernels a replay runs, each seen by the profiler
        runner.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                runner.step()
            torch.cuda.synchronize()
        rows, total, launches = _by_kernel(prof, steps)
        graph_note = ""
        if graph_ok:  # the same step replayed from its CUDA graph: its time against the eager kernels' sum
            runner.use_graph = True
            runner.step()  # captured above: a replay
            torch.cuda.synchronize()
            ev[0].record()
            for _ in range(steps):
                runner.step()
            ev[1].record()
            torch.cuda.synchronize()
            replay_ms = ev[0].elapsed_time(ev[1]) / steps
            with profile(activities=[ProfilerActivity.CUDA]) as gprof:
                for _ in range(steps):
                    runner.step()
                torch.cuda.synchronize()
            _, gtotal, glaunch = _by_kernel(gprof, steps)
            graph_note = (f"; graph replay {replay_ms:.2f} ms / step (kernels seen in the replay: {gtotal:.2f} ms, "
                          f"{glaunch} launches){loop_note}")
    return _append_table(path, f"## {name} at batch {len(prompts)}: GPU kernel time per eager decode step "
                               f"{total:.2f} ms, {launches} launches{graph_note}",
                         "| kernel | ms / step | launches / step |", rows[:25])


def _by_kernel(prof, per: int = 1):
    """(kernel, ms, launches) per `per` runs from a torch.profiler run, most time first; total ms; launches."""
    rows = [(e.key, e.device_time_total / per / 1e3, e.count // per) for e in prof.key_averages()
            if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    return rows, sum(r[1] for r in rows), sum(r[2] for r in rows)


def _append_table(path: str, title: str, header: str, rows) -> str:
    lines = [title, header, "| --- | --- | --- |"] + [f"| {k[:90]} | {ms:.3f} | {n} |" for k, ms, n in rows]
    text = "\n".join(lines) + "\n"
    with open(path, "a") as f:
        f.write(text + "\n")
    return text


def profile_prefill(model, name: str, prompt: int, path: str, reps: int = 3) -> str:
    """One sequence's prefill of `prompt` tokens: wall time per prefill against the model's own forward (SDPA, no
    cache) in the same run, and GPU time by kernel (torch.profiler), appended to `path`."""
    from torch.profiler import ProfilerActivity, profile

    from kvstream.kvcache.cache import CompressedCache

    dev = next(model.parameters()).device
    ids = torch.randint(3, model.config.vocab_size, (1, prompt), device=dev)
    mask = torch.ones_like(ids)

    eng = kv_engine(model, name)  # built once: an Engine's construction is not part of a prefill

    def kv():
        cache = CompressedCache(CacheConfig(**CONFIGS[name], max_new_tokens=256), model.config, seeds=[1])
        return eng.prefill(cache, ids)  # unpadded, as the scheduler admits a prompt

    def plain():
        return model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1).logits

    with torch.inference_mode():
        walls = {}
        for label, fn in (("model forward", plain), (name, kv)):
            fn()
            _, walls[label], _ = timed(lambda f=fn: [f() for _ in range(reps)])
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            kv()
            torch.cuda.synchronize()
    rows, total, _ = _by_kernel(prof)
    return _append_table(path, f"## prefill of {prompt} tokens, {name}: {1e3 * walls[name] / reps:.1f} ms wall (model "
                               f"forward alone {1e3 * walls['model forward'] / reps:.1f} ms); GPU kernel time "
                               f"{total:.1f} ms", "| kernel | ms | launches |", rows[:20])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(REFERENCE_SHAPES), default="llama2-7b")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick check")
    ap.add_argument("--batch", default="16", help="rows, or 'max': as many as each kvstream cache fits")
    ap.add_argument("--hf-batch", type=int, default=None, help="the baselines' batch with --batch max / --mix")
    ap.add_argument("--prefill-tokens", type=int, default=None,
                    help="kvstream: chunked prefill, prompt tokens admitted per step (default: each prompt whole)")
    ap.add_argument("--batch-cap", type=int, default=512, help="at most this many rows with --batch max")
    ap.add_argument("--mix", default="", help="workload (c): a .jsonl dataset whose text lengths the prompts follow")
    ap.add_argument("--mix-docs", type=int, default=512)
    ap.add_argument("--mix-min", type=int, default=256)
    ap.add_argument("--mix-new", default="64,512")
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", default="bench/engine.csv")
    ap.add_argument("--profile", default="", help="kvstream configs whose eager decode step to profile, by kernel")
    ap.add_argument("--profile-prefill", default="", help="kvstream configs whose one-sequence prefill to profile")
    a = ap.parse_args(argv)
    if a.prefill_tokens is not None and a.prefill_tokens < 1:
        ap.error(f"--prefill-tokens {a.prefill_tokens}: must be >= 1")
    PREFILL_TOKENS[0] = a.prefill_tokens
    configs = [c for c in a.configs.split(",") if c]
    profiled = [p for p in (a.profile + "," + a.profile_prefill).split(",") if p]
    for c in configs + profiled:  # the @modules variants of kvstream configs
        base = c[:-len(VARIANT)] if c.endswith(VARIANT) else None
        if base and CONFIGS.get(base) is not None:
            CONFIGS[c] = CONFIGS[base]
    bad = [c for c in configs + profiled if c not in CONFIGS]
    if bad:
        ap.error(f"unknown --configs {bad}; valid: {', '.join(CONFIGS)}")
    if not torch.cuda.is_available():
        print("bench_engine needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    model = build_model(a.shape, a.layers, dev)
    mc = model.config
    w_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    if a.batch != "max" and not a.batch.isdigit():
        ap.error(f"--batch {a.batch!r}: a number or 'max'")
    if (a.batch == "max" or a.mix) and a.hf_batch is None:
        ap.error("--batch max and --mix need --hf-batch (the baselines' batch)")
    if a.mix:
        lo, hi = (int(x) for x in a.mix_new.split(","))
        lens, news = mix_lengths(a.mix, a.mix_docs, a.mix_min, a.prompt, (lo, hi))
    g = torch.Generator(device="cpu").manual_seed(0)
    for name in configs:
        try:
            with forward_of(name):
                if a.mix:
                    rows.append(bench_mix(model, name, lens, news, a.hf_batch, mc.vocab_size, w_bytes))
                else:
                    B = int(a.batch) if a.batch != "max" else a.hf_batch if CONFIGS[name] is None else (
                        min(a.batch_cap, max_batch(model, name, a.prompt, a.new)))
                    ids = torch.randint(3, mc.vocab_size, (B, a.prompt), generator=g)
                    rows.append(bench_one(model, name, ids.to(dev), ids.tolist(), a.new, w_bytes, bw,
                                          mc.num_hidden_layers, mc.num_key_value_heads,
                                          mc.hidden_size // mc.num_attention_heads))
                print(rows[-1], flush=True)
                tables(rows, a, bw, mc, w_bytes)  # after every config: a run cut short keeps what it measured
        except torch.cuda.OutOfMemoryError as e:
            print(f"{name}: out of memory ({str(e).splitlines()[0]})", flush=True)
        torch.cuda.empty_cache()
    for name in [p for p in a.profile.split(",") if p]:
        if CONFIGS[name] is None:
            ap.error(f"--profile {name}: only kvstream configs are profiled")
        prompts = torch.randint(3, mc.vocab_size, (int(a.batch) if a.batch.isdigit() else 16, a.prompt),
                                generator=g).tolist()
        with forward_of(name):
            print(profile_step(model, name, prompts, os.path.splitext(a.out)[0] + "_profile.md", a.new), flush=True)
        torch.cuda.empty_cache()
    for name in [p for p in a.profile_prefill.split(",") if p]:
        if CONFIGS[name] is None:
            ap.error(f"--profile-prefill {name}: only kvstream configs are profiled")
        with forward_of(name):
            print(profile_prefill(model, name, a.prompt, os.path.splitext(a.out)[0] + "_profile.md"), flush=True)
        torch.cuda.empty_cache()
    if not rows:
        print("bench_engine: no config ran (each ran out of memory at this shape); lower --batch / --hf-batch",
              file=sys.stderr)
        return 1
    print(tables(rows, a, bw, mc, w_bytes))
    return 0


def tables(rows: list[dict], a, bw: float, mc, w_bytes: int) -> str:
    """The CSV (`--out`) and Markdown tables of the configs measured so far, with the ratios to the baselines
    measured in this run; returns the Markdown."""
    import pandas as pd

    df = pd.DataFrame(rows)
    for col in ("tokens_per_s", "docs_per_s") if a.mix else ("tokens_per_s",):
        base = df.set_index("config")[col]
        for ref in ("hf-static", "hf-dynamic"):
            if ref in base:
                df[f"x_{ref}" + ("_docs" if col == "docs_per_s" else "")] = df[col] / base[ref]
    head = (f"# gpu={torch.cuda.get_device_name()}; torch={torch.__version__}; copy_bw_TBps={bw / 1e12:.3f}; "
            f"shape={a.shape}; layers={mc.num_hidden_layers}; weights_GB={w_bytes / 1e9:.2f}; "
            f"workload={'mix:' + os.path.basename(a.mix) if a.mix else f'{a.prompt}+{a.new}@{a.batch}'}; "
            f"prefill_tokens={a.prefill_tokens}; "
            f"date={datetime.datetime.now(datetime.timezone.utc).isoformat()}")
    return write_tables(a.out, head, df.to_dict("records"))


if __name__ == "__main__":
    raise SystemExit(main())
