"""The Serve deployment (kvstream.pipeline.serve) over real HTTP on loopback, one app for the module: completions and
chat completions, streamed and not, through the openai client and raw HTTP, equal to Engine.generate; per-request
kv_cache; 64 requests at 16 in flight; bad requests get their 4xx and the replica keeps serving; a full queue
answers 429 with Retry-After; a client that disconnects frees its slot; a killed replica is replaced by Serve."""

from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
import logging
import os
import signal
import statistics
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.pipeline.helpers import free_port

log = logging.getLogger(__name__)
SERVE = {"max_new_tokens": 1500, "max_prompt_tokens": 64, "num_slots": 4, "max_queue": 16, "timeout_s": 60,
         "num_cpus": 0.5, "model_name": "kvs-tiny", "max_ongoing_requests": 48}
CONFIG = {"model": {"path": "demo:tiny-llama"}, "cache": {"policy": "keyformer", "budget": 0.5}, "serve": SERVE}
PROMPTS = ["The river town held its fair", "A quiet morning in the village", "Results of the chess match"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is the fair?"}]


@pytest.fixture(scope="module")
def server(ray_local):
    from ray import serve

    from kvstream.pipeline.serve import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"model.path": "demo:tiny-llama", "cache.policy": "keyformer", "cache.budget": "0.5",
            **{f"serve.{k}": str(v) for k, v in SERVE.items()}}  # strings, as `serve run ... key=value` passes them
    serve.run(build_app(args), name="kvs", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def offline():
    """generate(prompt, max_new_tokens, budget=None) -> Engine.generate's row for the same cache config."""
    from kvstream.kvcache import CacheConfig
    from kvstream.pipeline.models import build_engine

    engines = {}

    def generate(prompts, max_new_tokens, budget=0.5):
        if budget not in engines:
            engines[budget] = build_engine(CONFIG["model"], CacheConfig(policy="keyformer", budget=budget), "cpu")
        return engines[budget].generate(prompts, max_new_tokens=max_new_tokens)

    return generate


def chat_prompt(messages) -> str:
    from kvstream.pipeline.models import ByteTokenizer
    from kvstream.pipeline.prompts import ChatPrompt

    text, ids = ChatPrompt({}).render(messages, ByteTokenizer())  # the demo tokenizer has no chat template
    assert ids is None
    return text


def post(url: str, body, raw: bool = False, timeout: float = 120) -> tuple[int, dict, dict]:
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text), dict(e.headers)
        except ValueError:  # Serve's own 5xx bodies are plain text
            return e.code, {"text": text.decode(errors="replace")}, dict(e.headers)


def health(server: str) -> dict:
    with urllib.request.urlopen(server + "/health", timeout=30) as r:
        return json.loads(r.read())


def sse(server: str, path: str, body: dict) -> tuple[int, str, list]:
    """POST a stream over raw HTTP: (status, content type, [each event's JSON, or "[DONE]"])."""
    conn = http.client.HTTPConnection(server.split("//")[1], timeout=60)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    events = [line[6:] for line in r.read().decode().split("\n\n") if line.startswith("data: ")]
    conn.close()
    return r.status, r.getheader("Content-Type"), [e if e == "[DONE]" else json.loads(e) for e in events]


def test_openai_client_completions_and_chat_streamed_or_not_equal_the_engine(server, offline):
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)
    want = offline(PROMPTS + [chat_prompt(CHAT)], 12)
    got = {}

    def ask(i):  # three concurrent completions share the batch
        got[i] = client.completions.create(model="kvs-tiny", prompt=PROMPTS[i], max_tokens=12, temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(len(PROMPTS)):
        assert got[i].choices[0].text == want[i]["generated_text"], i
        assert got[i].usage.completion_tokens == want[i]["num_generated_tokens"] == 12
        assert got[i].usage.prompt_tokens == want[i]["num_input_tokens"]
        assert got[i].choices[0].finish_reason == "length"
        assert got[i].model_extra["kv_bytes"] == want[i]["kv_bytes"] < got[i].model_extra["kv_bytes_full"]
    chunks = list(client.completions.create(model="kvs-tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert len(chunks) >= 3 and "".join(c.choices[0].text for c in chunks) == want[0]["generated_text"]
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 12
    chat = client.chat.completions.create(model="kvs-tiny", messages=CHAT, max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == want[3]["generated_text"] and chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == want[3]["num_input_tokens"]
    parts = list(client.chat.completions.create(model="kvs-tiny", messages=CHAT, max_tokens=12, temperature=0,
                                                stream=True))
    assert parts[0].choices[0].delta.role == "assistant" and parts[-1].choices[0].finish_reason == "length"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == want[3]["generated_text"]
    assert parts[-1].model_extra["kv_bytes"] == want[3]["kv_bytes"]
    assert [m.id for m in client.models.list().data] == ["kvs-tiny"]
    assert health(server)["status"] == "ok"


def test_raw_http_streams_server_sent_events_with_stop_strings(server, offline):
    plain = post(server + "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 40, "temperature": 0})[1]
    full = plain["choices"][0]["text"]
    assert full == offline([PROMPTS[1]], 40)[0]["generated_text"]
    stop = full[15:18]  # a stop string that occurs in the text: the stream must stop before it
    body = {"prompt": PROMPTS[1], "max_tokens": 40, "temperature": 0, "stop": [stop], "stream": True}
    status, ctype, events = sse(server, "/v1/completions", body)
    assert status == 200 and ctype.startswith("text/event-stream") and events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["text"] for e in events[:-1])
    assert text == full[:full.find(stop)] and stop not in text
    assert events[-2]["choices"][0]["finish_reason"] == "stop" and events[-2]["kv_bytes"] > 0
    status, _, events = sse(server, "/v1/chat/completions",
                            {"messages": CHAT, "max_tokens": 12, "temperature": 0, "stream": True})
    assert status == 200 and events[-1] == "[DONE]" and events[0]["object"] == "chat.completion.chunk"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    want = offline([chat_prompt(CHAT)], 12)[0]
    assert text == want["generated_text"]
    code, chat, _ = post(server + "/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 12,
                                                           "temperature": 0})
    assert code == 200 and chat["object"] == "chat.completion" and chat["choices"][0]["message"]["content"] == text
    assert chat["usage"] == {"prompt_tokens": want["num_input_tokens"], "completion_tokens": 12, "total_tokens":
                             want["num_input_tokens"] + 12}


def test_kv_cache_sets_the_request_budget(server, offline):
    body = {"prompt": PROMPTS[2] * 2, "max_tokens": 10, "temperature": 0}
    base = post(server + "/v1/completions", body)[1]
    code, small, _ = post(server + "/v1/completions", {**body, "kv_cache": {"budget": 0.25, "policy": "keyformer"}})
    want = offline([PROMPTS[2] * 2], 10, budget=0.25)[0]
    assert code == 200 and small["choices"][0]["text"] == want["generated_text"]
    assert small["kv_bytes"] < base["kv_bytes"] and small["kv_bytes_full"] == base["kv_bytes_full"]
    code, err, _ = post(server + "/v1/completions", {**body, "kv_cache": {"budget": 0.9}})  # over the slots
    assert code == 400 and err["error"]["param"] == "kv_cache" and "budget" in err["error"]["message"], err


GOOD = {"prompt": "x", "max_tokens": 4}
BAD = [
    ("/v1/completions", b"{not json", None),
    ("/v1/completions", [1, 2], None),
    ("/v1/completions", {"model": "kvs-tiny", "max_tokens": 4}, "prompt"),
    ("/v1/completions", {"prompt": 7, "max_tokens": 4}, "prompt"),
    ("/v1/completions", {**GOOD, "n": 2}, "n"),
    ("/v1/completions", {**GOOD, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": 1501}, "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": "4"}, "max_tokens"),
    ("/v1/completions", {**GOOD, "temperature": "hot"}, "temperature"),
    ("/v1/completions", {**GOOD, "stream": "yes"}, "stream"),
    ("/v1/completions", {**GOOD, "model": "gpt-4"}, "model"),
    ("/v1/completions", {"prompt": "y" * 200, "max_tokens": 4}, "prompt"),
    ("/v1/completions", {**GOOD, "kv_cache": {"policy": "h2o"}}, "kv_cache"),
    ("/v1/completions", {**GOOD, "kv_cache": {"ratio": 0.5}}, "kv_cache"),
    ("/v1/completions", {**GOOD, "kv_cache": {"budget": -1}}, "kv_cache"),
    ("/v1/chat/completions", {"max_tokens": 4}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "z" * 200}]}, "messages"),
]


@pytest.mark.parametrize("path, body, param", BAD, ids=[f"{i}-{p}" for i, (_, _, p) in enumerate(BAD)])
def test_bad_requests_get_a_400_naming_the_field_and_the_replica_keeps_serving(server, path, body, param):
    code, err, _ = post(server + path, body, raw=isinstance(body, bytes))
    assert code == 400 and err["error"]["param"] == param and err["error"]["message"], err
    code, ok, _ = post(server + "/v1/completions", {"prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert code == 200 and ok["usage"]["completion_tokens"] == 3


def test_64_requests_at_16_in_flight_each_equal_its_offline_result(server, offline):
    prompts = [f"{PROMPTS[i % 3]} number {i}" for i in range(64)]
    want = offline(prompts, 8)

    def ask(p):
        t = time.perf_counter()
        code, body, _ = post(server + "/v1/completions", {"prompt": p, "max_tokens": 8, "temperature": 0})
        return code, body, time.perf_counter() - t

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, prompts))
    wall = time.perf_counter() - start
    assert [a[0] for a in answers] == [200] * 64
    assert [a[1]["choices"][0]["text"] for a in answers] == [w["generated_text"] for w in want]
    lat = sorted(a[2] for a in answers)
    log.warning("serve: 64 requests at 16 in flight: p50 %.3f s, p99 %.3f s, %.1f req/s", statistics.median(lat),
                lat[int(0.99 * (len(lat) - 1))], 64 / wall)


def test_a_full_queue_answers_429_with_retry_after(server):
    body = {"prompt": "Count the apples", "max_tokens": 60, "temperature": 0}
    with cf.ThreadPoolExecutor(40) as pool:  # 40 at once over max_queue=16 (Serve lets 48 reach the replica)
        answers = list(pool.map(lambda _: post(server + "/v1/completions", body), range(40)))
    codes = [a[0] for a in answers]
    assert set(codes) <= {200, 429} and codes.count(200) >= 16 and 429 in codes, codes
    refused = [a for a in answers if a[0] == 429]
    assert all({k.lower(): v for k, v in a[2].items()}.get("retry-after") == "1" for a in refused)
    assert all(a[1]["error"]["type"] == "rate_limit_error" for a in refused)


def wait_idle(server: str, cancelled: int, timeout: float = 20) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = health(server)
        if h["cancelled"] >= cancelled and h["running"] == h["waiting"] == h["in_flight"] == 0:
            return h
        time.sleep(0.1)
    raise AssertionError(f"the replica did not free the disconnected requests' slots: {h}")


LONG = {"prompt": "Hello there", "max_tokens": 1500, "temperature": 0}  # greedy: no EOS in 1500 tokens (seconds)


def test_a_client_that_disconnects_cancels_its_sequence_and_frees_the_slot(server):
    before = health(server)["cancelled"]
    conn = http.client.HTTPConnection(server.split("//")[1], timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({**LONG, "stream": True}), {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: ")
    conn.sock.shutdown(2)
    conn.close()
    wait_idle(server, before + 1)
    with pytest.raises(TimeoutError):  # a non-streamed request whose client gives up
        post(server + "/v1/completions", LONG, timeout=0.5)
    assert wait_idle(server, before + 2)["cancelled"] == before + 2
    code, ok, _ = post(server + "/v1/completions", {"prompt": "Hello", "max_tokens": 5})
    assert code == 200 and ok["usage"]["completion_tokens"] == 5


def test_a_request_over_the_timeout_gets_504_or_an_error_event_and_is_cancelled(server):
    """A second app beside this module's, with serve.timeout_s=1 and one slot: 1500 greedy tokens take seconds."""
    from ray import serve

    from kvstream.pipeline.serve import build_app

    serve.run(build_app({**CONFIG, "serve": {**SERVE, "timeout_s": 1, "num_slots": 1, "num_cpus": 0.25}}),
              name="kvs-short", route_prefix="/short")
    try:
        short = server + "/short"
        t = time.perf_counter()
        code, err, _ = post(short + "/v1/completions", LONG, timeout=30)
        assert code == 504 and err["error"]["type"] == "timeout_error" and time.perf_counter() - t < 10, err
        status, _, events = sse(server, "/short/v1/completions", {**LONG, "stream": True})
        assert status == 200 and events[-1]["error"]["type"] == "timeout_error", events[-1]
        assert wait_idle(short, 2)["cancelled"] == 2
        code, ok, _ = post(short + "/v1/completions", {"prompt": "Hello", "max_tokens": 3, "temperature": 0})
        assert code == 200 and ok["usage"]["completion_tokens"] == 3
    finally:
        serve.delete("kvs-short")


def test_bench_serve_smoke_run_writes_its_tables(server, tmp_path):
    """jobs/bench_serve.py on the running Serve (its own app beside this module's): 2 levels, a few requests."""
    import importlib.util

    from tests.pipeline.helpers import ROOT

    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "jobs/bench_serve.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "serve.csv"
    rows = bench.main(["--caches", "keyformer0.5+kivi2", "--concurrency", "1,3", "--requests", "4", "--prompt", "24",
                       "--new", "6", "--num-slots", "2", "--num-cpus", "0.25", "--stream", "--port", server.rsplit(":", 1)[1],
                       "--out", str(out)])
    assert [r["clients"] for r in rows] == [1, 3]
    assert all(r["requests_ok"] == 4 and r["requests_failed"] == 0 and r["gen_tok_per_s"] > 0 for r in rows)
    assert all(0 < r["kv_ratio"] < 0.5 and 0 < r["p50_ttft_s"] <= r["p50_s"] <= r["p99_s"] for r in rows), rows
    assert out.read_text().startswith("# device=cpu")
    assert "| keyformer0.5+kivi2 | 3 | 4 | 0 |" in out.with_suffix(".md").read_text()
    assert health(server)["status"] == "ok"  # this module's app still serves


def replica_pid() -> tuple[int, str]:
    import ray

    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
               if a["name"].startswith("SERVE_REPLICA::kvs#KVStreamServer")]
    return ray.get(ray.get_actor(name, namespace="serve").__ray_call__.remote(lambda _: os.getpid())), name


def test_a_killed_replica_is_replaced_and_no_request_hangs(server):
    pid, name = replica_pid()
    body = {"prompt": "A long tale", "max_tokens": 400, "temperature": 0}  # no EOS before 400
    with cf.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(post, server + "/v1/completions", body, False, 90) for _ in range(6)]
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        answers = [f.result() for f in futures]  # post raises on a hang past its 90 s timeout
    log.warning("serve: replica %d killed mid-load; in-flight requests answered %s", pid, [a[0] for a in answers])
    assert all(a[0] == 200 or 500 <= a[0] < 600 for a in answers), [a[0] for a in answers]
    assert any(a[0] >= 500 for a in answers), "the kill landed after every request was served"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            code, ok, _ = post(server + "/v1/completions", {"prompt": "Hello", "max_tokens": 3}, timeout=30)
            if code == 200:
                break
        except (urllib.error.URLError, TimeoutError, json.JSONDecodeError):
            pass
        time.sleep(0.5)
    assert code == 200 and ok["usage"]["completion_tokens"] == 3
    assert replica_pid()[1] != name
