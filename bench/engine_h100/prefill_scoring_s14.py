"""Keyformer's prefill scoring on the GPU: the kernel's time per layer at one prompt (Llama-2-7B shape: 32 heads,
head_dim 128, bf16), against an earlier version of the kernel loaded from a directory (argv[1], optional: a copy
of the earlier kvstream/kernels/prefill_scores.py as prefill_scores_old.py beside its gumbel_old.py), in the same
run; a tile sweep; then one prompt's prefill through the engine (built once) per cache config, by kernel, into
PROFILE_MD ("-": the kernel timings only).
Usage: python bench/engine_h100/prefill_scoring_s14.py [OLD_DIR|-] [T] [PROFILE_MD]"""
import importlib
import sys

import torch
import triton

sys.path.insert(0, "jobs")
from kvstream.kernels.prefill_scores import prefill_scores  # noqa: E402

old_dir = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "-" else None
T = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
dev = torch.device("cuda")
gen = torch.Generator(device=dev).manual_seed(0)
B, Hq, H, D = 1, 32, 32, 128
q = torch.randn(B, Hq, T, D, device=dev, generator=gen, dtype=torch.bfloat16)
k = torch.randn(B, H, T, D, device=dev, generator=gen, dtype=torch.bfloat16)
valid = torch.ones(B, T, dtype=torch.bool, device=dev)
seed = torch.tensor([12345], device=dev)
lse = torch.logsumexp((q.float() @ k.float().transpose(-1, -2)) * D ** -0.5
                      + torch.full((T, T), float("-inf"), device=dev).triu(1), -1)
impls = {"new": prefill_scores}
if old_dir:
    sys.path.insert(0, old_dir)
    impls["old"] = importlib.import_module("prefill_scores_old").prefill_scores
print(f"device={torch.cuda.get_device_name()} T={T} Hq={Hq} D={D} bf16; ms per layer (do_bench median)")
outs = {}
for name, fn in impls.items():
    runs = {"keyformer tau 1": lambda: fn(q, k, valid, D ** -0.5, 1.0, True, seed, layer=3),
            "keyformer tau 1.5": lambda: fn(q, k, valid, D ** -0.5, 1.5, True, seed, layer=3),
            "h2o (two passes)": lambda: fn(q, k, valid, D ** -0.5, 1.0, False, seed, layer=3),
            "h2o (attention lse)": lambda: fn(q, k, valid, D ** -0.5, row_lse=lse)}
    for label, run in runs.items():
        outs[(name, label)] = run()
        ms = triton.testing.do_bench(run, warmup=50, rep=300)
        print(f"  {name:4s} {label:20s} {ms:7.3f} ms   x32 layers {32 * ms:6.1f} ms", flush=True)
import kvstream.kernels.prefill_scores as pmod  # noqa: E402

base = dict(pmod.NOISE_CONFIG)
profile_md = sys.argv[3] if len(sys.argv) > 3 else "prefill_profile_s14.md"
tiles = ((64, 32, 4), (64, 64, 4), (128, 32, 8), (128, 64, 8), (64, 128, 4)) if profile_md != "-" else ()
for bm, bn, w in tiles:
    pmod.NOISE_CONFIG.update(block_m=bm, block_n=bn, num_warps=w)
    for label, kw in (("keyformer tau 1", {}), ("keyformer tau 1 + lse", {"row_lse": lse})):
        ms = triton.testing.do_bench(lambda: prefill_scores(q, k, valid, D ** -0.5, 1.0, True, seed, layer=3, **kw),
                                     warmup=50, rep=300)
        print(f"  tiles {bm}x{bn} warps {w}: {label:22s} {ms:7.3f} ms", flush=True)
pmod.NOISE_CONFIG.update(base)
print(f"  new keyformer tau 1 + lse (pass 1 stabilized by the attention's lse): "
      f"{triton.testing.do_bench(lambda: prefill_scores(q, k, valid, D ** -0.5, 1.0, True, seed, layer=3, row_lse=lse), warmup=50, rep=300):.3f} ms")
if old_dir:
    for label in ("keyformer tau 1", "keyformer tau 1.5", "h2o (two passes)"):
        a, b = outs[("new", label)], outs[("old", label)]
        rel = ((a - b).abs() / b.abs().clamp_min(1e-3)).max().item()
        # the noise stream changed in the new version (its uniform): keyformer scores differ as another draw
        print(f"  new vs old {label}: max rel diff {rel:.3g}; column sums {a.sum().item():.1f} vs {b.sum().item():.1f}")

import bench_engine as be  # noqa: E402

# one prompt's prefill per config, the engine built once, with its GPU time by kernel (bench_engine's profile);
# PROFILE_MD "-": the kernel timings alone (no tile sweep, no prefill)
if profile_md != "-":
    model = be.build_model("llama2-7b", 32, dev)
    for name in ("full", "full+kivi2", "keyformer0.5+kivi2"):
        print(be.profile_prefill(model, name, 4096, profile_md).splitlines()[0], flush=True)
        torch.cuda.empty_cache()
