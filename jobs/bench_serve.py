"""Load generator for the Serve deployment: throughput and latency at given concurrency levels per cache config.

    python jobs/bench_serve.py --model demo:llama2-7b --num-gpus 1 --num-slots auto --prompt 3800 --new 256 \
        --concurrency 1,8,32,64 --caches full,keyformer0.5+kivi2 --requests 256 --max-seconds 300 \
        --out bench/serve_h100.csv
    python jobs/bench_serve.py --concurrency 1,4 --requests 8 --prompt 32 --new 8   # CPU smoke run, demo model

For each cache config the app (kvstream.pipeline.serve) is deployed on a local Serve bound to 127.0.0.1 only
(--port; an already running Serve is reused, and the app is deleted afterwards); then, for each concurrency level
c, c client threads send greedy /v1/completions requests (streamed with --stream) back to back until --requests
have been sent or --max-seconds have passed (the level's bounds; each request also has --timeout). Prompts are
distinct texts of --prompt tokens (the model's tokenizer). Per level: requests ok / failed, req/s, generated
tokens/s (and its ratio to `full` at the same level), p50 / p99 end-to-end latency, p50 time to first token
(--stream only), the mean kv_bytes / kv_bytes_full the server reports. Writes a CSV (device, versions and date in
its first line) and a Markdown table beside it (.md), and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import statistics
import sys
import threading
import time

CACHES = {
    "full": {"policy": "full"},
    "full+kivi2": {"policy": "full", "quant": "kivi2"},
    "keyformer0.5": {"policy": "keyformer", "budget": 0.5},
    "keyformer0.5+kivi2": {"policy": "keyformer", "budget": 0.5, "quant": "kivi2"},
}
HOST = "127.0.0.1"  # loopback only


def make_prompts(model: dict, n: int, tokens: int) -> list[str]:
    """n distinct prompt texts of `tokens` tokens each (BOS included) under the model's tokenizer."""
    from kvstream.pipeline.models import load_tokenizer

    tok = load_tokenizer(model["path"], model.get("tokenizer"))
    words = "the river town held its fair on a quiet morning while results of the match came in".split()
    out = []
    for i in range(n):
        text = f"Request {i}: " + " ".join(words[(i + j) % len(words)] for j in range(2 * tokens))
        ids = list(tok.encode(text))[1:tokens]  # drop BOS: the server adds it back
        out.append(tok.decode(ids))
    return out


def one_request(port: int, prefix: str, prompt: str, new: int, timeout: float, stream: bool) -> dict:
    """One greedy completion over loopback: status, latency, time to first token (streamed only), usage, kv
    bytes."""
    body = {"prompt": prompt, "max_tokens": new, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    out = {"status": 0, "latency_s": None, "ttft_s": None, "completion_tokens": 0, "kv_bytes": None}
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("POST", f"{prefix}/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        out["status"] = r.status
        if r.status != 200 or not stream:
            reply = json.loads(r.read()) if r.status == 200 else None
            if reply is not None:
                out.update(latency_s=time.perf_counter() - t0, completion_tokens=reply["usage"]["completion_tokens"],
                           kv_bytes=reply["kv_bytes"], kv_bytes_full=reply["kv_bytes_full"])
            return out
        for line in r:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                out["status"] = 500
                return out
            if out["ttft_s"] is None and event["choices"] and event["choices"][0]["text"]:
                out["ttft_s"] = time.perf_counter() - t0
            if "usage" in event:
                out.update(completion_tokens=event["usage"]["completion_tokens"], kv_bytes=event["kv_bytes"],
                           kv_bytes_full=event["kv_bytes_full"])
        out["latency_s"] = time.perf_counter() - t0
    except (OSError, http.client.HTTPException, ValueError):
        out["status"] = -1  # a timeout or a dropped connection
    finally:
        conn.close()
    return out


def load(port: int, prefix: str, prompts: list[str], concurrency: int, new: int, max_requests: int,
         max_seconds: float, timeout: float, stream: bool) -> tuple[list[dict], float]:
    """c threads send requests back to back until max_requests are sent or max_seconds pass: (results, wall s)."""
    results, lock, sent = [], threading.Lock(), [0]
    deadline = time.perf_counter() + max_seconds

    def client():
        while True:
            with lock:
                if sent[0] >= max_requests or time.perf_counter() > deadline:
                    return
                i, sent[0] = sent[0], sent[0] + 1
            res = one_request(port, prefix, prompts[i % len(prompts)], new, timeout, stream)
            with lock:
                results.append(res)

    t = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results, time.perf_counter() - t


def summarize(cache: str, c: int, results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["status"] == 200 and r["latency_s"] is not None]
    lat = sorted(r["latency_s"] for r in ok)
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    ratio = [r["kv_bytes"] / r["kv_bytes_full"] for r in ok if r.get("kv_bytes_full")]
    pick = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]) if lat else (lambda q: float("nan"))
    return {"cache": cache, "clients": c, "requests_ok": len(ok), "requests_failed": len(results) - len(ok),
            "req_per_s": len(ok) / wall, "gen_tok_per_s": sum(r["completion_tokens"] for r in ok) / wall,
            "p50_s": pick(0.5), "p99_s": pick(0.99),
            "p50_ttft_s": statistics.median(ttft) if ttft else float("nan"),
            "kv_ratio": statistics.mean(ratio) if ratio else float("nan"), "wall_s": wall}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo:tiny-llama", help="model.path (demo:llama2-7b on a GPU)")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--caches", default="full,keyformer0.5+kivi2", help=f"comma list of {', '.join(CACHES)}")
    ap.add_argument("--concurrency", default="1,8", help="comma list of client counts")
    ap.add_argument("--requests", type=int, default=32, help="requests per level (the count bound)")
    ap.add_argument("--max-seconds", type=float, default=120, help="per level (the time bound)")
    ap.add_argument("--timeout", type=float, default=600, help="per request, seconds")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--new", type=int, default=16, help="new tokens per request")
    ap.add_argument("--num-slots", default="8", help="sequences per replica, or auto (GPU)")
    ap.add_argument("--num-gpus", type=float, default=0)
    ap.add_argument("--num-cpus", type=float, default=1)
    ap.add_argument("--stream", action="store_true", help="streamed requests (adds time to first token; the server "
                    "then reads every step's tokens, a host sync per step)")
    ap.add_argument("--port", type=int, default=8000, help="Serve's HTTP port on 127.0.0.1")
    ap.add_argument("--prefill-tokens", type=int, default=None,
                    help="serve.prefill_tokens (default: Serve's own default); 0: each prompt prefilled whole")
    ap.add_argument("--out", default="bench/serve.csv")
    a = ap.parse_args(argv)
    caches = a.caches.split(",")
    unknown = [c for c in caches if c not in CACHES]
    levels = [int(c) for c in a.concurrency.split(",")]
    if unknown or min(levels) < 1 or a.requests < 1:
        ap.error(f"unknown caches {unknown} (valid: {', '.join(CACHES)})" if unknown else "counts must be >= 1")

    import ray
    import torch
    from ray import serve

    from kvstream.pipeline.serve import build_app

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, logging_level="WARNING")
    serve.start(http_options={"host": HOST, "port": a.port})
    model = {"path": a.model, "tokenizer": a.tokenizer, "dtype": a.dtype}
    prompts = make_prompts(model, max(a.requests, 64), a.prompt)
    slots = a.num_slots if a.num_slots == "auto" else int(a.num_slots)
    rows, name, prefix = [], "kvstream-bench", "/kvstream-bench"
    for cache in caches:
        cfg = {"model": model, "cache": CACHES[cache],
               "serve": {"max_new_tokens": a.new, "max_prompt_tokens": a.prompt + 16, "num_slots": slots,
                         "max_queue": 2 * max(levels), "timeout_s": a.timeout, "num_gpus": a.num_gpus,
                         "num_cpus": a.num_cpus, "model_name": "bench"}}
        if a.prefill_tokens is not None:
            cfg["serve"]["prefill_tokens"] = a.prefill_tokens or None
        serve.run(build_app(cfg), name=name, route_prefix=prefix)
        # warm-up at the largest level: the batch buckets (CUDA graphs, Triton's size specializations) the measured
        # levels reach are built here, not inside a timed level
        wc = min(max(levels), len(prompts))
        load(a.port, prefix, prompts[:wc], wc, min(a.new, 4), wc, a.max_seconds, a.timeout, a.stream)
        for c in levels:
            results, wall = load(a.port, prefix, prompts, c, a.new, a.requests, a.max_seconds, a.timeout, a.stream)
            rows.append(summarize(cache, c, results, wall))
            print(rows[-1], flush=True)
        serve.delete(name)
    base = {r["clients"]: r["gen_tok_per_s"] for r in rows if r["cache"] == "full"}
    for r in rows:
        r["tok_s_vs_full"] = r["gen_tok_per_s"] / base[r["clients"]] if base.get(r["clients"]) else float("nan")
    device = torch.cuda.get_device_name() if a.num_gpus > 0 and torch.cuda.is_available() else "cpu"
    head = (f"# device={device}; model={a.model}; prompt={a.prompt}; new={a.new}; num_slots={a.num_slots}; "
            f"stream={a.stream}; prefill_tokens={a.prefill_tokens if a.prefill_tokens is not None else 'default'}; "
            f"torch={torch.__version__}; ray={ray.__version__}; "
            f"date={datetime.datetime.now(datetime.timezone.utc).isoformat()}")
    from kvstream.bench_tables import write_tables

    print(write_tables(a.out, head, rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
