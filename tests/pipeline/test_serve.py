"""The Serve deployment (kvstream.pipeline.serve) over real HTTP on loopback, with the openai client and raw
requests: greedy completions equal Engine.generate, concurrent requests share the batch, bad requests get their
4xx and the replica keeps serving, a full queue answers 429 with Retry-After."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest

from tests.pipeline.helpers import free_port

CONFIG = {"model": {"path": "demo:tiny-llama"}, "cache": {"policy": "keyformer", "budget": 0.5},
          "serve": {"max_new_tokens": 12, "max_prompt_tokens": 64, "num_slots": 2, "max_queue": 3, "num_cpus": 0.5,
                    "model_name": "kvs-tiny"}}
PROMPTS = ["The river town held its fair", "A quiet morning in the village", "Results of the chess match"]


@pytest.fixture(scope="module")
def server(ray_local):
    from ray import serve

    from kvstream.pipeline.serve import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(CONFIG), name="kvs", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def post(url: str, body, raw: bool = False) -> tuple[int, dict, dict]:
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def test_completions_equal_the_engine_and_run_concurrently(server):
    import openai

    from kvstream.kvcache import CacheConfig
    from kvstream.pipeline.models import build_engine

    client = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)
    results = {}

    def ask(i):
        results[i] = client.completions.create(model="kvs-tiny", prompt=PROMPTS[i], max_tokens=12, temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    eng = build_engine(CONFIG["model"], CacheConfig(policy="keyformer", budget=0.5), "cpu")
    for i, p in enumerate(PROMPTS):
        (want,) = eng.generate([p], max_new_tokens=12)
        got = results[i]
        assert got.choices[0].text == want["generated_text"], i
        assert got.usage.completion_tokens == want["num_generated_tokens"]
        assert got.usage.prompt_tokens == want["num_input_tokens"]
        assert got.choices[0].finish_reason in ("stop", "length")
        assert got.model_extra["kv_bytes"] == want["kv_bytes"] < got.model_extra["kv_bytes_full"]
    assert [m.id for m in client.models.list().data] == ["kvs-tiny"]
    with urllib.request.urlopen(server + "/health", timeout=30) as r:
        assert json.loads(r.read()) == {"status": "ok"}


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ({"model": "kvs-tiny", "max_tokens": 4}, 400, "prompt"),
    ({"prompt": "x", "n": 2, "max_tokens": 4}, 400, "n"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 13}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": "hot", "max_tokens": 4}, 400, "temperature"),
    ({"prompt": "x", "model": "gpt-4", "max_tokens": 4}, 400, "model"),
    ({"prompt": "y" * 200, "max_tokens": 4}, 400, "prompt"),
])
def test_bad_requests_get_a_4xx_and_the_replica_keeps_serving(server, body, status, param):
    code, err, _ = post(server + "/v1/completions", body, raw=isinstance(body, bytes))
    assert code == status and err["error"]["param"] == param and err["error"]["message"], err
    code, ok, _ = post(server + "/v1/completions", {"prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert code == 200 and ok["usage"]["completion_tokens"] >= 1


def test_a_full_queue_answers_429_with_retry_after(server):
    answers = []

    def ask():
        answers.append(post(server + "/v1/completions", {"prompt": "Count the apples", "max_tokens": 12,
                                                         "temperature": 0}))

    threads = [threading.Thread(target=ask) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(a[0] for a in answers)
    assert set(codes) <= {200, 429} and codes.count(200) >= 3 and 429 in codes, codes
    refused = [a for a in answers if a[0] == 429]
    assert all(a[2].get("retry-after") == "1" or a[2].get("Retry-After") == "1" for a in refused)
    assert all(a[1]["error"]["type"] == "rate_limit_error" for a in refused)
