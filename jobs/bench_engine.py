"""End-to-end generation on the engine against transformers' own caches, in one run on one GPU.

    python jobs/bench_engine.py --batch 16 --prompt 4096 --new 256 --out bench/engine_h100.csv

A Llama-2-7B-shaped model (or `--shape llama3-8b`: 8 KV heads) with random bf16 weights (speed does not depend on
the values) generates greedily from random prompts, every row to `--new` tokens (no EOS). Rows:
- hf-dynamic: transformers `generate` with its DynamicCache and SDPA;
- hf-static: transformers `generate` with `cache_implementation="static"` (its forward compiled by transformers;
  the first call's extra time is reported apart as compile_s);
- kvstream configs through `Engine.generate` (the fast decode path: CUDA-graph captured where the cache's step
  is capturable, else eager; the `graph` column says which).
For each: tokens/s end to end, prefill seconds (a max_new_tokens=1 call), decode ms/step, the step's roofline
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

import torch

from kvstream import CacheConfig, Engine
from kvstream.kernels.bandwidth import copy_bandwidth
from kvstream.kvcache.models import REFERENCE_SHAPES

CONFIGS = {
    "hf-dynamic": None,
    "hf-static": None,
    "full": dict(policy="full"),
    "full+kivi2": dict(policy="full", quant="kivi2"),
    "h2o0.5": dict(policy="h2o", budget=0.5),
    "keyformer0.5": dict(policy="keyformer", budget=0.5),
    "keyformer0.5+kivi2": dict(policy="keyformer", budget=0.5, quant="kivi2"),
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


def kv_generate(model, name: str, prompts: list[list[int]], new: int):
    eng = Engine(model, cache=CacheConfig(**CONFIGS[name], engine="fast"))
    eng.eos_token_ids = []  # every row runs to `new` tokens, as min_new_tokens does for the baselines
    rows = eng.generate(prompts, max_new_tokens=new)
    return rows, eng.last_graph


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
    else:
        gen = lambda n, p=prompts: kv_generate(model, name, p, n)  # noqa: E731
    _, warm_s, _ = timed(lambda: gen(new))  # compiles (Triton, transformers' static-cache compile), primes
    _, prefill_s, _ = timed(lambda: gen(1))
    torch.cuda.reset_peak_memory_stats()
    out, total_s, cpu_s = timed(lambda: gen(new))
    rows, graph = out if out is not None else (None, None)
    peak = torch.cuda.max_memory_allocated() - w_bytes
    full_bytes = 2 * layers * kv_heads * head_dim * 2 * B * (T + new - 1)
    kv = full_bytes if rows is None else sum(r["kv_bytes"] for r in rows)
    kv_full = full_bytes if rows is None else sum(r["kv_bytes_full"] for r in rows)
    step_ms = 1e3 * (total_s - prefill_s) / (new - 1)
    roof_ms = 1e3 * (w_bytes + kv) / bw
    return dict(config=name, batch=B, prompt=T, new=new, tokens_per_s=B * new / total_s, total_s=total_s,
                prefill_s=prefill_s, decode_step_ms=step_ms, roofline_step_ms=roof_ms,
                step_vs_roofline=step_ms / roof_ms, cpu_ms_per_step=1e3 * cpu_s / new,
                graph="-" if graph is None else "yes" if graph else "no",
                compile_s=max(0.0, warm_s - total_s), kv_bytes_ratio=kv / kv_full,
                peak_gib_above_weights=peak / 2**30)


def profile_step(model, name: str, prompts: list[list[int]], path: str, steps: int = 3) -> str:
    """GPU kernel time of `steps` eager decode steps of a kvstream config (torch.profiler), by kernel, to `path`.

    Eager and graph-replayed steps run the same kernels; the sum here against the graph step's measured time
    says whether the step is bound by kernel time or by the gaps between kernels."""
    from torch.profiler import ProfilerActivity, profile

    from kvstream.kvcache.cache import CompressedCache
    from kvstream.kvcache.fast_decode import DecodeRunner

    dev = next(model.parameters()).device
    cfg = CacheConfig(**CONFIGS[name], max_new_tokens=steps + 4)
    ids = torch.tensor(prompts, device=dev)
    B = ids.shape[0]
    cache = CompressedCache(cfg, model.config)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        z = torch.zeros(B, device=dev)
        runner = DecodeRunner(model, cache, steps + 4, z, z + 1, cache.plan.seeds, [], 0, graph=False)
        runner.first(out.logits[:, -1])
        for _ in range(2):
            runner.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                runner.step()
            torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / steps / 1e3, e.count // steps) for e in prof.key_averages()
            if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    lines = [f"## {name}: GPU kernel time per eager decode step {total:.2f} ms, {sum(r[2] for r in rows)} launches",
             "| kernel | ms / step | launches / step |", "| --- | --- | --- |"]
    lines += [f"| {k[:90]} | {ms:.3f} | {n} |" for k, ms, n in rows[:25]]
    text = "\n".join(lines) + "\n"
    with open(path, "a") as f:
        f.write(text + "\n")
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(REFERENCE_SHAPES), default="llama2-7b")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick check")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", default="bench/engine.csv")
    ap.add_argument("--profile", default="", help="kvstream configs whose eager decode step to profile, by kernel")
    a = ap.parse_args(argv)
    bad = [c for c in a.configs.split(",") + [p for p in a.profile.split(",") if p] if c not in CONFIGS]
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
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(3, mc.vocab_size, (a.batch, a.prompt), generator=g)
    prompts = ids.tolist()
    rows = []
    for name in a.configs.split(","):
        try:
            rows.append(bench_one(model, name, ids.to(dev), prompts, a.new, w_bytes, bw, mc.num_hidden_layers,
                                  mc.num_key_value_heads, mc.hidden_size // mc.num_attention_heads))
            print(rows[-1], flush=True)
        except torch.cuda.OutOfMemoryError as e:
            print(f"{name}: out of memory at batch {a.batch} ({str(e).splitlines()[0]})", flush=True)
        torch.cuda.empty_cache()
    for name in [p for p in a.profile.split(",") if p]:
        if CONFIGS[name] is None:
            ap.error(f"--profile {name}: only kvstream configs are profiled")
        print(profile_step(model, name, prompts, os.path.splitext(a.out)[0] + "_profile.md"), flush=True)
        torch.cuda.empty_cache()
    if not rows:
        print("bench_engine: no config ran (each ran out of memory at this shape); lower --batch", file=sys.stderr)
        return 1
    import pandas as pd

    df = pd.DataFrame(rows)
    base = df.set_index("config").tokens_per_s
    for ref in ("hf-static", "hf-dynamic"):
        if ref in base:
            df[f"x_{ref}"] = df.tokens_per_s / base[ref]
    head = (f"# gpu={torch.cuda.get_device_name()}; torch={torch.__version__}; copy_bw_TBps={bw / 1e12:.3f}; "
            f"shape={a.shape}; layers={mc.num_hidden_layers}; weights_GB={w_bytes / 1e9:.2f}; "
            f"date={datetime.datetime.now(datetime.timezone.utc).isoformat()}")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        f.write(head + "\n")
        df.to_csv(f, index=False)
    table = head + "\n\n" + _markdown(df)
    with open(os.path.splitext(a.out)[0] + ".md", "w") as f:
        f.write(table + "\n")
    print(table)
    return 0


def _markdown(df) -> str:
    cols = list(df.columns)
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
