"""How many sequences the scheduler's slot pool holds at once, per cache config: a planning table (no GPU needed).

    python jobs/plan_capacity.py --gpu-gib 80 --out bench/capacity_80gib.csv

For the Llama-2-7B and Llama-3-8B shapes in bf16, the memory left on a GPU of `--gpu-gib` at
`--utilization` after the weights, and contexts of 4096 + 256 and 4096 + 4096 tokens: the slots that fit
(`kvstream.kvcache.capacity.max_slots`: a slot's bytes read off the buffers a pool allocates, on the meta device;
the reserve estimated from the shape). Planned from the allocator's own sizes, not measured on a GPU.
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import LlamaConfig

from kvstream import CacheConfig
from kvstream.kvcache.capacity import max_slots, slot_bytes
from kvstream.kvcache.models import REFERENCE_SHAPES

CONFIGS = {
    "full": dict(policy="full"),
    "full+kivi2": dict(policy="full", quant="kivi2"),
    "full+kivi4": dict(policy="full", quant="kivi4"),
    "h2o0.5": dict(policy="h2o", budget=0.5),
    "keyformer0.5": dict(policy="keyformer", budget=0.5),
    "keyformer0.5+kivi2": dict(policy="keyformer", budget=0.5, quant="kivi2"),
}
CONTEXTS = [(4096, 256), (4096, 4096)]


def weight_bytes(mc: LlamaConfig) -> int:
    h, i, v, L = mc.hidden_size, mc.intermediate_size, mc.vocab_size, mc.num_hidden_layers
    kv = mc.num_key_value_heads * (h // mc.num_attention_heads)
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * i + 2 * h
    return 2 * (L * per_layer + 2 * v * h + h)  # bf16, untied embeddings and head


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-gib", type=float, default=80.0)
    ap.add_argument("--utilization", type=float, default=0.9)
    ap.add_argument("--out", default="bench/capacity.csv")
    a = ap.parse_args(argv)
    rows = []
    for shape, kw in REFERENCE_SHAPES.items():
        mc = LlamaConfig(**kw, max_position_embeddings=32768)
        free = int(a.gpu_gib * 2**30 * a.utilization) - weight_bytes(mc)
        for prompt, new in CONTEXTS:
            base = None
            for name, c in CONFIGS.items():
                cfg = CacheConfig(**c)
                per = slot_bytes(cfg, mc, prompt, new, torch.bfloat16)
                n = max_slots(cfg, mc, prompt, new, torch.bfloat16, free)
                base = n if name == "full" else base
                rows.append(dict(shape=shape, prompt=prompt, new=new, config=name, slot_gib=per / 2**30,
                                 sequences=n, x_full=n / base))
    import pandas as pd

    df = pd.DataFrame(rows)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    head = f"# planned: GPU {a.gpu_gib:g} GiB x {a.utilization:g} utilization, bf16 weights, kvstream.kvcache.capacity"
    with open(a.out, "w") as f:
        f.write(head + "\n")
        df.to_csv(f, index=False)
    lines = [head, "", "| shape | context | config | GiB per slot | sequences | x full |", "|" + " --- |" * 6]
    lines += [f"| {r.shape} | {r.prompt} + {r.new} | {r.config} | {r.slot_gib:.3f} | {r.sequences} | {r.x_full:.2f} |"
              for r in df.itertuples()]
    text = "\n".join(lines) + "\n"
    with open(os.path.splitext(a.out)[0] + ".md", "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
