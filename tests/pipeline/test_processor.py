"""The ray.data.llm-shaped processor (kvstream/pipeline/processor.py) on a real local Ray with the demo model.

The demo model (random weights, greedy) does not reach EOS within these prompts' first 12 tokens (checked: every
row below that is expected to produce max_tokens tokens does), so num_generated_tokens == max_tokens exactly.
Generation actors take half a CPU: the folder's Ray has 2, and the read / prepare tasks need the rest.
"""

import json
import re
import subprocess
import sys

import pyarrow as pa
import pytest

from kvstream.pipeline import ConfigError, KVStreamProcessorConfig, build_processor
from kvstream.pipeline.models import ByteTokenizer

DEMO = dict(model_source="demo:tiny-llama", num_cpus=0.5, concurrency=1)
DOCS = [{"id": f"d{i}", "text": f"document {i} about the river and the hills."} for i in range(6)]
OUT = ["generated_text", "num_input_tokens", "num_generated_tokens", "time_taken_llm", "kv_bytes", "kv_bytes_full",
       "truncated", "error"]


def by_id(rows):
    ids = [r["id"] for r in rows]
    assert sorted(ids) == sorted(set(ids)), f"an id came out twice: {ids}"
    return {r["id"]: r for r in rows}


def test_readme_example_offline(ray_local, tmp_path):
    ray = ray_local
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    config = KVStreamProcessorConfig(cache={"policy": "keyformer", "budget": 0.5, "quant": "kivi2"}, batch_size=4,
                                     accelerator_type=None, **DEMO)
    processor = build_processor(
        config,
        preprocess=lambda row: dict(messages=[{"role": "user", "content": "Summarize:\n" + row["text"]}],
                                    sampling_params=dict(temperature=0.0, max_tokens=8)),
        postprocess=lambda row: dict(id=row["id"], summary=row["generated_text"], n=row["num_input_tokens"]))
    rows = by_id(processor(ray.data.read_json(str(path))).take_all())
    assert sorted(rows) == [d["id"] for d in DOCS]
    tok = ByteTokenizer()
    for d in DOCS:
        r = rows[d["id"]]
        assert set(r) == {"id", "summary", "n", "error"} and r["error"] is None and isinstance(r["summary"], str)
        # the byte tokenizer has no chat template: the converse job's plain turns
        assert r["n"] == len(tok.encode(f"user: Summarize:\n{d['text']}\nassistant:"))


def test_per_row_sampling_params_and_cache_budget_in_one_batch(ray_local):
    ray = ray_local
    items = [{"id": "short", "prompt": DOCS[0]["text"], "sampling_params": {"max_tokens": 3}},
             {"id": "long", "prompt": DOCS[1]["text"], "sampling_params": {"max_tokens": 9}},
             {"id": "default", "prompt": DOCS[2]["text"]},
             {"id": "small_cache", "prompt": DOCS[2]["text"], "kv_cache": 0.25}]
    config = KVStreamProcessorConfig(cache={"policy": "keyformer", "budget": 0.5}, batch_size=8,
                                     sampling_params={"max_tokens": 5}, **DEMO)
    # one block, one batch: the four rows share one actor call and are split into groups inside it
    out = by_id(build_processor(config)(ray.data.from_items(items, override_num_blocks=1)).take_all())
    assert set(out) == {"short", "long", "default", "small_cache"}
    assert {k: out[k]["num_generated_tokens"] for k in out} == {"short": 3, "long": 9, "default": 5, "small_cache": 5}
    assert all(r["error"] is None and r["truncated"] is False for r in out.values())
    assert list(out["short"])[:2] == ["id", "prompt"] and list(out["short"])[-len(OUT):] == OUT
    assert "sampling_params" not in out["short"] and "kv_cache" not in out["short"]
    d, s = out["default"], out["small_cache"]
    assert s["kv_bytes_full"] == d["kv_bytes_full"] and s["kv_bytes"] < d["kv_bytes"]


def test_a_failing_row_leaves_the_others(ray_local):
    ray = ray_local
    items = [{"id": "ok", "text": "fine"}, {"id": "no_text", "text": None},
             {"id": "typo", "text": "x", "sp": {"max_token": 3}}, {"id": "neg", "text": "x", "sp": {"temperature": -1}},
             {"id": "budget", "text": "x", "kv": 2.5}, {"id": "too_long", "text": "y" * 64}]

    def pre(row):
        return dict(prompt="Summarize: " + row["text"], sampling_params=row.get("sp"), kv_cache=row.get("kv"))

    config = KVStreamProcessorConfig(cache={"policy": "h2o", "budget": 0.5}, batch_size=8, max_input_tokens=32,
                                     truncation="reject", sampling_params={"max_tokens": 2}, **DEMO)
    out = by_id(build_processor(config, preprocess=pre)(ray.data.from_items(items)).take_all())
    assert sorted(out) == sorted(i["id"] for i in items)
    ok = out.pop("ok")
    assert ok["error"] is None and ok["num_generated_tokens"] == 2
    assert out["no_text"]["error"].startswith("preprocess failed: TypeError")
    assert "unknown key(s) 'max_token'" in out["typo"]["error"]
    assert "sampling_params.temperature=-1" in out["neg"]["error"]
    assert "kv_cache=2.5" in out["budget"]["error"]
    assert "prompt has 76 tokens > 32 (max_input_tokens=32); set truncation=head|tail|middle" in \
        out["too_long"]["error"]
    assert all(r["generated_text"] is None and r["num_generated_tokens"] is None and r["num_input_tokens"] is None
               for r in out.values())


def test_should_continue_on_error_false_raises(ray_local):
    ray = ray_local
    config = KVStreamProcessorConfig(should_continue_on_error=False, sampling_params={"max_tokens": 2}, **DEMO)
    items = [{"id": "ok", "prompt": "fine"}, {"id": "bad", "prompt": "x", "sampling_params": {"top_p": 2.0}}]
    with pytest.raises(Exception, match=r"sampling_params.top_p=2.0"):
        build_processor(config)(ray.data.from_items(items)).take_all()


def test_processor_used_twice_in_one_pipeline(ray_local):
    ray = ray_local
    cfg = KVStreamProcessorConfig(cache={"policy": "keyformer", "budget": 0.5}, batch_size=4,
                                  sampling_params={"max_tokens": 6}, **DEMO)
    summarize = build_processor(cfg, preprocess=lambda row: dict(prompt="Summarize: " + row["text"]),
                                postprocess=lambda row: dict(id=row["id"], summary=row["generated_text"]))
    title = build_processor(cfg, preprocess=lambda row: dict(prompt="Title for: " + row["summary"],
                                                             sampling_params=dict(max_tokens=4)),
                            postprocess=lambda row: dict(**row, title=row["generated_text"]))
    out = by_id(title(summarize(ray.data.from_items(DOCS))).take_all())
    assert sorted(out) == [d["id"] for d in DOCS]
    tok = ByteTokenizer()
    for r in out.values():
        assert r["error"] is None and r["num_generated_tokens"] == 4 and r["title"] == r["generated_text"]
        # the second pass read the first pass's output: its prompt holds the summary
        assert r["num_input_tokens"] == len(tok.encode("Title for: " + r["summary"]))
        assert r["prompt"] == "Title for: " + r["summary"] and "text" not in r


def test_missing_prompt_column_is_a_value_error_naming_it(ray_local, tmp_path):
    ray = ray_local
    processor = build_processor(KVStreamProcessorConfig(**DEMO))
    with pytest.raises(ValueError, match=r"'prompt' \(str\) or 'messages'.*\(it has: id, text\)"):
        processor(ray.data.from_items(DOCS))  # schema known: at build time
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    with pytest.raises(Exception, match=r"required column 'prompt' \(str\) or 'messages'"):
        processor(ray.data.read_json(str(path))).take_all()  # schema unknown until read: at the first batch


@pytest.mark.parametrize("field, value, says", [
    ("batch_size", 0, "must be an int >= 1"),
    ("concurrency", (3, 1), "(min, max)"),
    ("cache", {"policy": "nope"}, "CacheConfig.policy='nope' is not one of"),
    ("cache", {"budget": 2.5}, "as a fraction must be in (0, 1]"),
    ("dtype", "fp8", "must be one of auto"),
    ("truncation", "left", "must be one of head"),
    ("sampling_params", {"max_token": 3}, "unknown key(s) 'max_token'"),
    ("sampling_params", {"top_p": 0}, "top_p=0"),
    ("max_input_tokens", 0, "must be an int >= 1"),
    ("num_gpus", -1, "must be a number >= 0"),
    ("model_source", "", "set a hub id"),
    ("engine_kwargs", {"max_num_seq": 4}, "unknown engine setting(s) ['max_num_seq']"),
    ("engine_kwargs", {"prefill_tokens": 0}, "prefill_tokens=0 must be an int >= 1"),
])
def test_config_errors_name_the_field(field, value, says):
    kwargs = {**DEMO, field: value}
    with pytest.raises(ConfigError) as e:
        KVStreamProcessorConfig(**kwargs)
    assert f"KVStreamProcessorConfig.{field}" in str(e.value) and says in str(e.value)


def test_build_time_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"num_gpus=0.*accelerator_type='H100'"):
        KVStreamProcessorConfig(accelerator_type="H100", **{**DEMO, "num_gpus": 0})
    assert KVStreamProcessorConfig(accelerator_type="H100", **DEMO).num_gpus == 1
    too_long = KVStreamProcessorConfig(max_input_tokens=2000, sampling_params={"max_tokens": 100}, **DEMO)
    with pytest.raises(ConfigError, match=r"max_input_tokens=2000 \+ sampling_params.max_tokens=100 exceeds the "
                                          r"model's 2048-token context"):
        build_processor(too_long)
    with pytest.raises(ConfigError, match=r"model_source='demo:nope'.*valid: demo:tiny-llama"):
        build_processor(KVStreamProcessorConfig(**{**DEMO, "model_source": "demo:nope"}))


class TemplateTokenizer(ByteTokenizer):
    """The byte tokenizer with a chat template: '<role>content' per turn, then '<assistant>', as token ids."""

    chat_template = "test"

    def apply_chat_template(self, messages):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
        return self.encode(text)


def test_messages_rows_use_the_tokenizers_chat_template(monkeypatch):
    from kvstream.pipeline import requests

    monkeypatch.setattr(requests, "load_tokenizer", lambda path, tokenizer=None: TemplateTokenizer())
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    table = pa.Table.from_pylist([{"id": "m", "messages": msgs, "prompt": None},
                                  {"id": "p", "messages": None, "prompt": "hi"},
                                  {"id": "both", "messages": msgs, "prompt": "hi"}])
    for chat, expect in ((True, "<system>be brief<user>hi<assistant>"), (False, "system: be brief\nuser: hi\n"
                                                                                 "assistant:")):
        stage = requests.PrepareRequests({"path": "demo:tiny-llama"}, {**requests.SAMPLING_DEFAULTS}, "full", chat,
                                         None, 2048, "middle")
        out = stage(table).to_pylist()
        assert out[0]["_prompt_token_ids"] == TemplateTokenizer().encode(expect) and out[0]["error"] is None
        assert out[1]["_prompt_token_ids"] == TemplateTokenizer().encode("hi")
        assert out[2]["error"] == "the row has both prompt and messages: give one"


def prepared(rows, max_tokens=2, policy="h2o"):
    from kvstream.pipeline.requests import SAMPLING_DEFAULTS, PrepareRequests

    prep = PrepareRequests({"path": "demo:tiny-llama"}, {**SAMPLING_DEFAULTS, "max_tokens": max_tokens}, policy, True,
                           None, 2048, "middle")
    return prep(pa.Table.from_pylist(rows))


@pytest.fixture(scope="module")
def udf():
    from kvstream.pipeline.generate_requests import GenerateRequestsUDF

    return GenerateRequestsUDF({"path": "demo:tiny-llama"}, {"policy": "h2o", "budget": 0.5}, 0, 1)


def test_grouped_rows_match_their_own_calls(udf):
    """Grouping is exact: each row of a mixed batch gets what it gets generated alone."""
    rows = [{"id": "a", "prompt": DOCS[0]["text"], "sampling_params": {"max_tokens": 3}, "kv_cache": None},
            {"id": "b", "prompt": DOCS[1]["text"], "sampling_params": {"max_tokens": 6}, "kv_cache": None},
            {"id": "c", "prompt": DOCS[3]["text"], "sampling_params": {"max_tokens": 3}, "kv_cache": 8},
            {"id": "d", "prompt": DOCS[4]["text"], "sampling_params": {"max_tokens": 6}, "kv_cache": None}]
    mixed = udf(prepared(rows)).to_pylist()
    for row, got in zip(rows, mixed):
        alone = udf(prepared([row])).to_pylist()[0]
        assert got["error"] is None and got["id"] == row["id"]
        for k in ("generated_text", "num_generated_tokens", "kv_bytes", "kv_bytes_full", "num_input_tokens"):
            assert got[k] == alone[k], (row["id"], k)
    assert [r["num_generated_tokens"] for r in mixed] == [3, 6, 3, 6]
    assert mixed[2]["kv_bytes"] < mixed[0]["kv_bytes"]  # 8 tokens kept vs half of a longer prompt


def test_a_generation_exception_stays_on_its_row(udf, monkeypatch):
    from kvstream.pipeline.generate_requests import RowFailed

    table = prepared([{"id": i, "prompt": p} for i, p in enumerate(["ok", "poison", "fine"])])
    real, poison = udf._engine_generate, ByteTokenizer().encode("poison")

    def flaky(ids):
        if poison in [list(i) for i in ids]:
            raise RuntimeError("kaboom")
        return real(ids)

    monkeypatch.setattr(udf, "_engine_generate", flaky)
    out = udf(table).to_pylist()
    assert [r["error"] for r in out] == [None, "generation failed: RuntimeError: kaboom", None]
    assert [r["num_generated_tokens"] for r in out] == [2, None, 2]
    monkeypatch.setattr(udf, "continue_on_error", False)
    with pytest.raises(RowFailed, match="1 row\\(s\\) of a batch failed, the first: generation failed: RuntimeError"):
        udf(table)


@pytest.mark.parametrize("value, policy, expect", [
    (None, "full", None), (0.25, "h2o", 0.25), (1.0, "h2o", 1.0), (64, "keyformer", 64),
    (64.0, "keyformer", 64),  # an int column Arrow widened to float
    (0.5, "full", "cache policy 'full' keeps every token"), (0, "h2o", "a float in (0, 1]"),
    (1.5, "h2o", "a float in (0, 1]"), (True, "h2o", "a float in (0, 1]"), ("half", "h2o", "a float in (0, 1]"),
])
def test_kv_cache_budget(value, policy, expect):
    from kvstream.pipeline.requests import kv_cache_budget

    if isinstance(expect, str):
        with pytest.raises(ValueError, match=re.escape(expect)):
            kv_cache_budget(value, policy)
    else:
        got = kv_cache_budget(value, policy)
        assert got == expect and type(got) is type(expect)


def test_the_request_stage_imports_no_torch():
    """Ray Data's read / prepare workers unpickle PrepareRequests: kvstream.pipeline stays lazy, no torch there."""
    code = ("import sys, pyarrow as pa; from kvstream.pipeline import build_processor; "
            "from kvstream.pipeline.requests import PrepareRequests, SAMPLING_DEFAULTS; "
            "PrepareRequests({'path': 'demo:tiny-llama'}, SAMPLING_DEFAULTS, 'full', True, None, 2048, 'middle')"
            "(pa.table({'prompt': ['hi']})); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_sort_window_orders_rows_by_prompt_length(ray_local):
    ray = ray_local
    items = [{"id": f"r{n}", "prompt": "word " * n} for n in (9, 3, 7, 1, 8, 2)]  # one block, longest first
    config = KVStreamProcessorConfig(batch_size=2, sort_window=6, sampling_params={"max_tokens": 1}, **DEMO)
    options = ray.data.DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, True  # the order out is the order generated
    try:
        out = build_processor(config)(ray.data.from_items(items, override_num_blocks=1)).take_all()
    finally:
        options.preserve_order = before
    assert [r["id"] for r in out] == ["r1", "r2", "r3", "r7", "r8", "r9"]
    assert [r["num_input_tokens"] for r in out] == sorted(r["num_input_tokens"] for r in out)
    with pytest.raises(ConfigError, match="sort_window"):
        KVStreamProcessorConfig(sort_window=0, **DEMO)


def test_engine_settings_reach_every_engine_of_the_actor():
    """The jobs' engine.* keys become the processor's engine_kwargs, and the actor's engines (the one per extra
    kv_cache budget too) are built with them."""
    from kvstream.pipeline import load_config
    from kvstream.pipeline.generate_requests import GenerateRequestsUDF
    from kvstream.pipeline.job_processor import job_processor

    cfg = load_config("summarize", None, ["engine.max_num_seqs=3", "engine.prefill_tokens=64", "runtime.num_actors=1"])
    settings = job_processor(cfg, 16).config.engine_kwargs
    assert settings == {"gpu_memory_utilization": 0.9, "max_num_seqs": 3, "prefill_tokens": 64}
    udf = GenerateRequestsUDF({"path": "demo:tiny-llama"}, {"policy": "h2o", "budget": 0.5}, 0, 1, engine=settings)
    assert udf.engine.settings() == settings and udf.engine_for(0.25).settings() == settings
