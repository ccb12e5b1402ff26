"""End-to-end generation throughput: transformers' own dynamic cache vs kvstream caches, in one run.

    python jobs/bench_generate.py --batch 16 --prompt 2048 --new 128 --out bench/generate_h200.csv

A Llama-2-7B-shaped model with random bf16 weights (speed does not depend on the values) generates greedily
through `model.generate`, once with transformers' DynamicCache + SDPA (the baseline) and once per kvstream cache
config. For each: end-to-end tokens/s, prefill time (a max_new_tokens=1 run), mean decode step, the step's
roofline ((weight bytes + bytes the step's attention reads) / copy bandwidth measured in the same run), and
the peak memory above the weights. Writes a CSV (GPU, versions, date in its first line) and prints Markdown.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

from kvstream.kernels.bandwidth import copy_bandwidth
from kvstream.kvcache import CacheConfig, CompressedCache
from kvstream.kvcache.models import REFERENCE_SHAPES

CONFIGS = {
    "hf-dynamic": None,
    "full": dict(policy="full"),
    "keyformer0.5": dict(policy="keyformer", budget=0.5),
    "h2o0.5": dict(policy="h2o", budget=0.5),
    "full+kivi2": dict(policy="full", quant="kivi2"),
    "keyformer0.5+kivi2": dict(policy="keyformer", budget=0.5, quant="kivi2"),
}


def build_model(layers: int, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**dict(REFERENCE_SHAPES["llama2-7b"], num_hidden_layers=layers),
                      max_position_embeddings=32768, attn_implementation="sdpa")
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    return model


def run(model, name, ids, mask, new, seed=0):
    extra = {}
    cache = None
    if CONFIGS[name] is not None:
        cache = CompressedCache(CacheConfig(**CONFIGS[name], max_new_tokens=new, seed=seed), model.config)
        extra["past_key_values"] = cache
    else:
        model.config._attn_implementation = "sdpa"
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, pad_token_id=0, **extra)
    return out, cache


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", default="bench/generate.csv")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_generate needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    model = build_model(a.layers, dev)
    w_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(3, 32000, (a.batch, a.prompt), generator=g).to(dev)
    mask = torch.ones_like(ids)
    rows = []
    for name in a.configs.split(","):
        run(model, name, ids[:, :64], mask[:, :64], 4)  # warm-up: kernels compiled, allocator primed
        torch.cuda.synchronize()
        t = time.perf_counter()
        run(model, name, ids, mask, 1)
        torch.cuda.synchronize()
        prefill_s = time.perf_counter() - t
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        _, cache = run(model, name, ids, mask, a.new)
        torch.cuda.synchronize()
        total_s = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated() - w_bytes
        step_ms = 1e3 * (total_s - prefill_s) / (a.new - 1)
        if cache is not None:
            st = cache.stats()
            kv, kv_full = st["kv_bytes"], st["kv_bytes_full"]
        else:
            kv = kv_full = 2 * a.layers * 4096 * 2 * a.batch * (a.prompt + a.new - 1)
        roof_ms = 1e3 * (w_bytes + kv) / bw
        rows.append(dict(config=name, batch=a.batch, prompt=a.prompt, new=a.new, tokens_per_s=a.batch * a.new / total_s,
                         total_s=total_s, prefill_s=prefill_s, decode_step_ms=step_ms, roofline_step_ms=roof_ms,
                         step_vs_roofline=step_ms / roof_ms, kv_bytes_ratio=kv / kv_full,
                         peak_gib_above_weights=peak / 2**30))
        print(rows[-1], flush=True)
        del cache
        torch.cuda.empty_cache()
    import pandas as pd

    df = pd.DataFrame(rows)
    head = (f"# gpu={torch.cuda.get_device_name()}; torch={torch.__version__}; copy_bw_TBps={bw / 1e12:.3f}; "
            f"weights_GB={w_bytes / 1e9:.2f}; date={datetime.datetime.now(datetime.timezone.utc).isoformat()}")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        f.write(head + "\n")
        df.to_csv(f, index=False)
    print(head)
    print(df.to_markdown(index=False, floatfmt=".3g") if _has_tabulate() else df.to_string(index=False))
    return 0


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
