"""Benchmark the Triton kernels on a GPU (issue 3): fused decode attention over bf16 / fp8 / kivi4 / kivi2 storage,
with and without eviction scores, against torch SDPA over a full bf16 cache, the unfused torch reference path
(dequantize + matmul + softmax + P.V: `decode_attention_ref`) and the roofline (bytes the kernel must read /
the device-to-device copy bandwidth measured in the same run); and the prefill score kernel against SDPA
prefill attention. One layer, bf16, head_dim 128, 32 query heads.

    python jobs/bench_kernels.py --out bench/kernels_h200_kv32.csv --kv-heads 32
        [--batches 1,16,32,64] [--contexts 4096,8192,32768]

Writes a CSV (a `#` header with GPU, versions, date) and prints a Markdown table. Timing: decode cells (SDPA and
fused) as GPU time under CUDA-graph replay with L2 flushed before each call (`graph_ms`: the host's launch time
left out, as in a graph-captured decode step), the fastest of ROUNDS interleaved rounds; the torch reference
and the prefill cells with CUDA events around calls (`triton.testing.do_bench`, median, L2 flushed between
calls); shapes that OOM are skipped.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os

import torch
import triton
from triton.testing import do_bench

from kvstream.kernels import prefill_scores as prefill_mod
from kvstream.kernels.bandwidth import copy_bandwidth
from kvstream.kernels.decode_attention import decode_attention, decode_workspace
from kvstream.kernels.decode_attention_ref import decode_attention_ref
from kvstream.kernels.prefill_scores import prefill_scores
from kvstream.kernels.slots import KVSlots
from kvstream.kvcache.cache import attention_with_lse

D, HQ, R, G = 128, 32, 128, 32  # head_dim, query heads, full-precision residual (ring), KIVI group size
DT = torch.bfloat16


def make_slots(B, H, ctx, storage, K, V) -> KVSlots:
    """One layer's slots at full fill: S = ctx - R slots (bf16 views of K/V, or random KIVI codes), ring = R."""
    cs = ctx - R
    dev = "cuda"
    s = KVSlots(quant="none", bits=0, group_size=G,
                s_len=torch.full((B,), cs, dtype=torch.int32, device=dev),
                sv_len=torch.full((B,), cs, dtype=torch.int32, device=dev),
                win_k=K[:, :, cs:], win_v=V[:, :, cs:],
                win_pos=(cs + torch.arange(R, device=dev, dtype=torch.int32)).repeat(B, 1).contiguous(),
                win_lo=torch.full((B,), cs, dtype=torch.int32, device=dev))
    if storage == "bf16":
        s.s_k, s.s_v = K[:, :, :cs], V[:, :, :cs]
        return s
    if storage == "fp8":  # random finite e4m3 codes (0x7F / 0xFF, NaN, skipped), one key / value scale per (b, h)
        def codes():
            r = torch.randint(0, 254, (B, H, cs, D), dtype=torch.uint8, device=dev)
            return r + (r >= 0x7F).to(torch.uint8)

        s.quant, s.bits = "fp8", 8
        s.s_k, s.s_v = codes(), codes()
        s.s_ks, s.s_vs = (torch.full((B, H, 1), 0.01, device=dev) for _ in range(2))
        return s
    bits = 4 if storage == "kivi4" else 2
    P = 32 // bits
    s.quant, s.bits = "channel", bits
    rint = lambda *shape: torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32, device=dev)  # noqa: E731
    small = lambda *shape: (torch.rand(*shape, device=dev) * 0.1).to(DT)  # noqa: E731
    s.s_kc, s.s_ks, s.s_km = rint(B, H, cs // P, D), small(B, H, cs // G, D), small(B, H, cs // G, D)
    s.s_vc, s.s_vs, s.s_vm = rint(B, H, cs, D // P), small(B, H, cs, D // G), small(B, H, cs, D // G)
    return s


def slot_bytes(s: KVSlots) -> int:
    names = ("win_k", "win_v", "s_k", "s_v", "s_kc", "s_ks", "s_km", "s_vc", "s_vs", "s_vm")  # fp8: codes + scales
    return sum(getattr(s, n).numel() * getattr(s, n).element_size() for n in names if getattr(s, n) is not None)


def time_ms(fn, heavy=False) -> float:
    return do_bench(fn, warmup=5 if heavy else 25, rep=30 if heavy else 100, return_mode="median")


_FLUSH: list = []  # the L2-flushing buffer of `graph_ms`


def graph_ms(fn, target_ms=25.0, replays=5) -> float:
    """GPU time of one fn() in ms, without the host's launch time: fn is captured N times into a CUDA graph, each
    call after a write of a 256 MiB buffer (L2 flushed, as do_bench does), and the graph of the N writes alone is
    subtracted; the median of `replays` replays of each. A decode step at small shapes takes less GPU time than
    its Python launches (several Triton launches, ~0.1-0.2 ms on the GPU box's host), so event timing of
    back-to-back calls (do_bench) measures the host there, not the kernels."""
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 << 20, dtype=torch.int8, device="cuda"))
    flush = _FLUSH[0]
    n = max(2, min(200, int(target_ms / max(time_ms(fn, heavy=True), 1e-3))))

    def capture(with_fn):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(n):
                flush.zero_()
                if with_fn:
                    fn()
        return g

    graphs = (capture(True), capture(False))
    times: tuple[list, list] = ([], [])
    for _ in range(replays):
        for g, t in zip(graphs, times):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            torch.cuda.synchronize()
            t.append(a.elapsed_time(b))
    med = [sorted(t)[len(t) // 2] for t in times]
    del graphs
    return max(med[0] - med[1], 0.0) / n


TUNED: dict = {}  # (storage, kv_heads) -> decode_workspace kwargs, chosen by `tune_decode` in this run


def tune_decode(H, storage, B=32, ctx=4096):
    """Pick stage-1 (block_n, num_warps, num_stages, split factor) for a storage at one shape; returns a log line."""
    q = torch.randn(B, HQ, D, device="cuda", dtype=DT)
    K = torch.randn(B, H, ctx, D, device="cuda", dtype=DT)
    V = torch.randn(B, H, ctx, D, device="cuda", dtype=DT)
    s = make_slots(B, H, ctx, storage, K, V)
    if storage in ("bf16", "fp8"):
        configs = [dict(block_n=bn, num_warps=nw, num_stages=ns, use_dot=ud)
                   for ud in (False, True) for bn, nw, ns in ((64, 4, 1), (128, 4, 1), (64, 2, 3))]
    else:
        # the generic stage 1 (kivi_tc=False: its previous best) and kernels/decode_kivi.py variants
        configs = [dict(kivi_tc=False, kivi_cc=False, block_n=32, num_warps=2, num_stages=4 if H != HQ else 2,
                        use_dot=H != HQ)]
        configs += [dict(kivi_cc=False, ngt=ngt, num_warps=4, num_stages=ns, val_cc=vc)
                    for ngt in (1, 2, 4) for ns in (1, 3) for vc in ((True, False) if H == HQ else (False,))]
        # CUDA cores: kernels/decode_kivi_cc.py (one query head per KV head), kernels/decode_kivi_gqa.py (several)
        # with fp16x2 sums (h2, the default for bf16) and without; L2 prefetch (on by default) off once
        configs += [dict(kivi_cc=True, num_warps=nw, num_stages=1, h2=h2) for nw in ((2, 4, 8) if H == HQ else (2, 4))
                    for h2 in (True, False)]
        configs += [dict(kivi_cc=True, num_warps=2, num_stages=1, h2=True, prefetch=0)]
    best, log = None, []
    for cfg in configs:
        name = "/".join(f"{k}={v}" for k, v in cfg.items())
        try:
            ws = decode_workspace(q, s, 0, **cfg)
            ms = graph_ms(lambda: decode_attention(q, s, D ** -0.5, workspace=ws))
        except Exception as e:  # a config that does not compile (shared memory) is skipped
            log.append(f"{name}: {type(e).__name__}")
            continue
        log.append(f"{name}: {ms:.4f}")
        if best is None or ms < best[0]:
            best = (ms, cfg)
    base_splits = decode_workspace(q, s, 0).num_splits
    cfg = dict(best[1])
    for f in (2, 4):
        ws = decode_workspace(q, s, 0, num_splits=base_splits * f, **cfg)
        ms = graph_ms(lambda: decode_attention(q, s, D ** -0.5, workspace=ws))
        log.append(f"splits x{f}: {ms:.4f}")
        if ms < best[0]:
            best = (ms, {**cfg, "split_factor": f})
    TUNED[(storage, H)] = best[1]
    del q, K, V, s
    torch.cuda.empty_cache()
    return f"# tune {storage} H={H}: best {best[1]} {best[0]:.4f} ms | " + ", ".join(log)


def workspace(q, s, mode, storage, H):
    cfg = dict(TUNED.get((storage, H), {}))
    f = cfg.pop("split_factor", 1)
    if f > 1:
        cfg["num_splits"] = decode_workspace(q, s, mode).num_splits * f
    return decode_workspace(q, s, mode, **cfg)


ROUNDS = 2  # interleaved timing rounds per decode shape; each cell keeps its fastest round
STORAGES = ("bf16", "fp8", "kivi4", "kivi2")


def bench_decode(B, ctx, H, bw, rows):
    """One table row: SDPA and the fused kernels timed in ROUNDS interleaved rounds (a slow spell, e.g. clocks
    after the heavy torch reference, hits one round of a cell rather than deciding it), then the torch reference."""
    grp = HQ // H
    q = torch.randn(B, HQ, D, device="cuda", dtype=DT)
    K = torch.randn(B, H, ctx, D, device="cuda", dtype=DT)
    V = torch.randn(B, H, ctx, D, device="cuda", dtype=DT)
    scale = D ** -0.5
    q4 = q.view(B, HQ, 1, D)
    full_bytes = 2 * K.numel() * 2
    base = dict(batch=B, context=ctx, q_heads=HQ, kv_heads=H)
    seed = torch.arange(B, device="cuda", dtype=torch.int64)
    storages = STORAGES
    slots = {st: make_slots(B, H, ctx, st, K, V) for st in storages}
    accs = {st: torch.zeros(B, H, s.cs + s.cw, device="cuda") for st, s in slots.items()}
    cells = {("sdpa", 0): lambda: torch.nn.functional.scaled_dot_product_attention(q4, K, V, scale=scale,
                                                                                    enable_gqa=grp > 1)}
    for st, s in slots.items():
        for mode in (0, 1, 2):
            ws = workspace(q, s, mode, st, H)
            cells[(st, mode)] = (lambda s=s, mode=mode, ws=ws, acc=accs[st]:
                                 decode_attention(q, s, scale, mode, acc, seed, 0, 5, 1.5, workspace=ws))
    best = {}
    for _ in range(ROUNDS):
        for key, fn in cells.items():
            best[key] = min(best.get(key, float("inf")), graph_ms(fn))
    sdpa = best[("sdpa", 0)]
    rows.append({**base, "impl": "sdpa", "storage": "bf16", "scores": 0, "ms": sdpa, "bytes": full_bytes,
                 "roofline_ms": full_bytes / bw * 1e3, "vs_sdpa": 1.0})
    nbytes = {st: slot_bytes(s) + 2 * q.numel() * 2 for st, s in slots.items()}
    for st in storages:
        for mode in (0, 1, 2):
            ms = best[(st, mode)]
            rows.append({**base, "impl": "fused", "storage": st, "scores": mode, "ms": ms, "bytes": nbytes[st],
                         "roofline_ms": nbytes[st] / bw * 1e3, "vs_sdpa": sdpa / ms})
    for st, s in slots.items():
        try:
            ms = time_ms(lambda: decode_attention_ref(q, s, scale, 2, accs[st], seed, 0, 5, 1.5), heavy=True)
        except torch.cuda.OutOfMemoryError:
            ms = float("nan")
        rows.append({**base, "impl": "torch_ref", "storage": st, "scores": 2, "ms": ms, "bytes": nbytes[st],
                     "roofline_ms": nbytes[st] / bw * 1e3, "vs_sdpa": sdpa / ms})
        torch.cuda.empty_cache()
    del slots, accs, cells
    torch.cuda.empty_cache()


def profile_stages(storage):
    """20 decode steps at B=32, ctx=4096, 32 KV heads per score mode (0 none, 1 H2O, 2 Keyformer), under
    torch.profiler: prints each kernel's time per step (and runs what `ncu` can be pointed at)."""
    q = torch.randn(32, HQ, D, device="cuda", dtype=DT)
    K, V = (torch.randn(32, 32, 4096, D, device="cuda", dtype=DT) for _ in range(2))
    s = make_slots(32, 32, 4096, storage, K, V)
    acc = torch.zeros(32, 32, s.cs + s.cw, device="cuda")
    seed = torch.arange(32, device="cuda")
    for mode in (0, 1, 2):
        ws = decode_workspace(q, s, mode)
        for _ in range(3):  # compile and warm up
            decode_attention(q, s, D ** -0.5, mode, acc, seed, 0, 5, 1.5, workspace=ws)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                decode_attention(q, s, D ** -0.5, mode, acc, seed, 0, 5, 1.5, workspace=ws)
            torch.cuda.synchronize()
        per = {e.key: e.device_time_total / 20 for e in prof.key_averages() if e.device_time_total > 0}
        print(f"# profile {storage} score_mode {mode} (us per step): "
              + ", ".join(f"{k} {v:.1f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1])), flush=True)


def check_graph_capture():
    """A decode step with a workspace and device step/tau captures in a CUDA graph and replays correctly."""
    B, H, ctx = 4, 8, 1024
    K = torch.randn(B, H, ctx, D, device="cuda", dtype=DT)
    V = torch.randn(B, H, ctx, D, device="cuda", dtype=DT)
    s = make_slots(B, H, ctx, "kivi2", K, V)
    q = torch.randn(B, HQ, D, device="cuda", dtype=DT)
    seed = torch.arange(B, device="cuda")
    step = torch.tensor([3], device="cuda", dtype=torch.int32)
    tau = torch.tensor([1.5], device="cuda")
    acc = torch.zeros(B, H, s.cs + s.cw, device="cuda")
    ws = decode_workspace(q, s, 2)
    for _ in range(2):
        decode_attention(q, s, D ** -0.5, 2, acc, seed, 0, step, tau, workspace=ws)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = decode_attention(q, s, D ** -0.5, 2, acc, seed, 0, step, tau, workspace=ws)
    acc.zero_()
    step.fill_(9)
    g.replay()
    torch.cuda.synchronize()
    ref_acc = torch.zeros_like(acc)
    ref = decode_attention_ref(q, s, D ** -0.5, 2, ref_acc, seed, 0, 9, 1.5)
    e_out = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    e_acc = ((acc - ref_acc).norm() / ref_acc.norm()).item()
    return e_out, e_acc


PREFILL_TILES = ((64, 64, 4), (128, 64, 8), (128, 64, 4), (64, 128, 4), (128, 32, 4), (64, 32, 4), (128, 128, 8))


def bench_prefill(T, H, rows):
    """The scoring kernels against SDPA's causal prefill. Every path is timed with each tile configuration of
    PREFILL_TILES; the table rows use the kernel's defaults (`kernels.prefill_scores.CONFIG`, `NOISE_CONFIG` for
    Keyformer: what the cache runs; the better of two timings), the log also names the fastest tile of each
    path."""
    q = torch.randn(1, HQ, T, D, device="cuda", dtype=DT)
    k = torch.randn(1, H, T, D, device="cuda", dtype=DT)
    v = torch.randn(1, H, T, D, device="cuda", dtype=DT)
    valid = torch.ones(1, T, dtype=torch.bool, device="cuda")
    seed = torch.zeros(1, dtype=torch.int64, device="cuda")
    attn = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H < HQ))
    base = dict(batch=1, context=T, q_heads=HQ, kv_heads=H, bytes=0, roofline_ms=float("nan"))
    rows.append({**base, "impl": "sdpa_prefill", "storage": "bf16", "scores": 0, "ms": attn, "vs_sdpa": 1.0})
    # H2O / Keyformer on an unpadded batch in the cache: the attention asked for its LSE (its cost beyond SDPA's) +
    # one pass (H2O) or two with the LSE as the first pass's stabilizer (Keyformer at tau 1)
    lse_extra = time_ms(lambda: attention_with_lse(q, k, v, D ** -0.5)) - attn
    _, lse = attention_with_lse(q, k, v, D ** -0.5)
    paths = {"h2o": lambda: prefill_scores(q, k, valid, D ** -0.5, 1.0, False, seed),
             "keyformer": lambda: prefill_scores(q, k, valid, D ** -0.5, 1.0, True, seed),
             "h2o_lse": lambda: prefill_scores(q, k, valid, D ** -0.5, row_lse=lse),
             "keyformer_lse": lambda: prefill_scores(q, k, valid, D ** -0.5, 1.0, True, seed, row_lse=lse)}
    defaults = {"h2o": dict(prefill_mod.CONFIG), "keyformer": dict(prefill_mod.NOISE_CONFIG)}
    defaults["h2o_lse"], defaults["keyformer_lse"] = defaults["h2o"], defaults["keyformer"]
    times = {}
    for bm, bn, nw in PREFILL_TILES:
        for cfg in (prefill_mod.CONFIG, prefill_mod.NOISE_CONFIG):
            cfg.update(block_m=bm, block_n=bn, num_warps=nw)
        for name, fn in paths.items():
            try:
                times[name, (bm, bn, nw)] = time_ms(fn)
            except Exception as e:  # a tile this GPU cannot fit
                print(f"# prefill tile {(bm, bn, nw)} {name}: {type(e).__name__}", flush=True)
    prefill_mod.CONFIG.update(defaults["h2o"])
    prefill_mod.NOISE_CONFIG.update(defaults["keyformer"])
    tile = {n: (c["block_m"], c["block_n"], c["num_warps"]) for n, c in defaults.items()}
    for name, fn in paths.items():  # the default tiles once more (the first timings of a run vary most)
        times[name, tile[name]] = min(times[name, tile[name]], time_ms(fn))
    for name in paths:
        best = min((ms, t) for (n, t), ms in times.items() if n == name)
        print(f"# prefill T={T} H={H} {name}: default tile {tile[name]} {times[name, tile[name]]:.3f} ms, fastest "
              f"{best[1]} {best[0]:.3f} ms", flush=True)
    for name, mode, impl, extra in (("h2o", 1, "prefill_scores", 0.0), ("keyformer", 2, "prefill_scores", 0.0),
                                    ("h2o_lse", 1, "prefill_scores_lse", lse_extra),
                                    ("keyformer_lse", 2, "prefill_scores_lse", lse_extra)):
        ms = times[name, tile[name]] + extra
        rows.append({**base, "impl": impl, "storage": "bf16", "scores": mode, "ms": ms, "vs_sdpa": attn / ms})


def write_csv(path, rows, gpu, bw):
    for r in rows:
        r["frac_roofline"] = r["roofline_ms"] / r["ms"] if r["ms"] == r["ms"] else float("nan")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    cols = ["impl", "storage", "scores", "batch", "context", "q_heads", "kv_heads", "ms", "bytes", "roofline_ms",
            "frac_roofline", "vs_sdpa"]
    with open(path, "w", newline="") as f:
        f.write(f"# gpu={gpu}; torch={torch.__version__}; triton={triton.__version__}; copy_bw_TBps={bw / 1e12:.3f}; "
                f"date={datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; "
                "decode_timing=cuda_graph_gpu_time\n")
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def markdown(rows) -> str:
    """Compact table: one line per decode shape (ms; % of roofline; x vs SDPA), then the prefill lines."""
    def get(r0, impl, storage, scores):
        for r in rows:
            if (r["impl"], r["storage"], r["scores"], r["batch"], r["context"], r["kv_heads"]) == \
                    (impl, storage, scores, r0["batch"], r0["context"], r0["kv_heads"]):
                return r
        return None

    out = ["| KV heads | B | ctx | SDPA bf16 ms | fused bf16 ms | fused fp8 ms (% roofline) | fused kivi4 ms "
           "| fused kivi2 ms (% roofline, x SDPA) | kivi2 + H2O scores | kivi2 + Keyformer scores "
           "| torch ref kivi2 ms |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    fmt = lambda r: "n/a" if r is None or r["ms"] != r["ms"] else f"{r['ms']:.3f}"  # noqa: E731
    for r0 in rows:
        if r0["impl"] != "sdpa":
            continue
        k2 = get(r0, "fused", "kivi2", 0)
        k2s = f"{fmt(k2)} ({100 * k2['frac_roofline']:.0f}%, {k2['vs_sdpa']:.2f}x)" if k2 else "n/a"
        f8 = get(r0, "fused", "fp8", 0)
        f8s = f"{fmt(f8)} ({100 * f8['frac_roofline']:.0f}%)" if f8 else "n/a"
        out.append(f"| {r0['kv_heads']} | {r0['batch']} | {r0['context']} | {fmt(r0)} "
                   f"| {fmt(get(r0, 'fused', 'bf16', 0))} | {f8s} "
                   f"| {fmt(get(r0, 'fused', 'kivi4', 0))} | {k2s} | {fmt(get(r0, 'fused', 'kivi2', 1))} "
                   f"| {fmt(get(r0, 'fused', 'kivi2', 2))} | {fmt(get(r0, 'torch_ref', 'kivi2', 2))} |")
    out += ["", "| KV heads | prompt | SDPA causal prefill ms | H2O scores ms (fraction) "
                 "| H2O with the attention's LSE: extra ms (fraction) | Keyformer scores ms (fraction) |",
            "| --- | --- | --- | --- | --- | --- |"]
    for r0 in rows:
        if r0["impl"] == "sdpa_prefill":
            h2o, kf = get(r0, "prefill_scores", "bf16", 1), get(r0, "prefill_scores", "bf16", 2)
            lse = get(r0, "prefill_scores_lse", "bf16", 1)
            lse_s = f"{lse['ms']:.3f} ({lse['ms'] / r0['ms']:.2f})" if lse else "n/a"
            out.append(f"| {r0['kv_heads']} | {r0['context']} | {r0['ms']:.3f} "
                       f"| {h2o['ms']:.3f} ({h2o['ms'] / r0['ms']:.2f}) | {lse_s} "
                       f"| {kf['ms']:.3f} ({kf['ms'] / r0['ms']:.2f}) |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/kernels.csv")
    ap.add_argument("--batches", default="1,16,32,64")
    ap.add_argument("--contexts", default="4096,8192,32768")
    ap.add_argument("--kv-heads", default="32,8")
    ap.add_argument("--tune-only", action="store_true", help="only pick and print the launch configurations")
    ap.add_argument("--profile", default="", help="storage: per-kernel times of 20 decode steps per score mode at "
                    "B=32, ctx=4096, MHA (torch.profiler; also what to point ncu at)")
    ap.add_argument("--prefill-only", action="store_true", help="only the prefill score lines")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels: needs a CUDA GPU (the kernels are timed on the device)")
    torch.manual_seed(0)
    if args.profile:
        profile_stages(args.profile)
        return
    gpu = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    print(f"# {gpu}, torch {torch.__version__}, triton {triton.__version__}, copy bandwidth {bw / 1e12:.2f} TB/s",
          flush=True)
    if not args.prefill_only:
        e_out, e_acc = check_graph_capture()
        print(f"# CUDA graph replay vs reference (kivi2, Keyformer scores): out rel err {e_out:.2e}, "
              f"scores {e_acc:.2e}", flush=True)
    rows: list[dict] = []
    for H in [int(x) for x in args.kv_heads.split(",")]:
        for storage in STORAGES if not args.prefill_only else ():
            print(tune_decode(H, storage), flush=True)
        if args.tune_only:
            continue
        if not args.prefill_only:  # warm-up: the first timed shape of a run was the noisiest (up to 15%)
            bench_decode(16, 4096, H, bw, [])
        for ctx in [int(x) for x in args.contexts.split(",")] if not args.prefill_only else ():
            for B in [int(x) for x in args.batches.split(",")]:
                try:
                    bench_decode(B, ctx, H, bw, rows)
                except torch.cuda.OutOfMemoryError:
                    print(f"# skipped B={B} ctx={ctx} H={H}: out of memory", flush=True)
                torch.cuda.empty_cache()
                write_csv(args.out, rows, gpu, bw)  # progressively: a cut-off run keeps what it measured
                print(f"# done B={B} ctx={ctx} kv_heads={H}", flush=True)
        for T in (4096, 8192):
            bench_prefill(T, H, rows)
    write_csv(args.out, rows, gpu, bw)
    print(markdown(rows))
    print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()
