"""Engine: real weights (stories260K through the llama2.c loader), batching, EOS and stop strings, seeds,
per-row fields, loading paths and dtypes, and bad input."""

from __future__ import annotations

import time

import pytest
import torch

from kvstream.kvcache.config import CacheConfig
from kvstream.kvcache.engine import Engine
from kvstream.kvcache.llama2c import Llama2cTokenizer
from kvstream.kvcache.models import decode_continuation

LILY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
FIELDS = {"generated_text", "token_ids", "num_input_tokens", "num_generated_tokens", "time_taken_llm", "kv_bytes",
          "kv_bytes_full"}


@pytest.fixture(scope="module")
def stories(stories260k) -> Engine:
    return Engine.from_pretrained(str(stories260k["model"]), tokenizer=str(stories260k["tokenizer"]),
                                  cache=CacheConfig(policy="full"), device="cpu")


def test_lily_from_bos(stories):
    (row,) = stories.generate([[stories.tokenizer.bos_token_id]], max_new_tokens=40)
    assert row["generated_text"].startswith(LILY), row["generated_text"]
    assert stories.max_context == 512 and stories.model.dtype == torch.float32


def test_rows_have_consistent_fields(stories):
    prompts = ["Once upon a time, there was a big dog", "Tom", [1, 403]]
    t0 = time.perf_counter()
    rows = stories.generate(prompts, max_new_tokens=12)
    wall = time.perf_counter() - t0
    assert len(rows) == 3
    for prompt, row in zip(prompts, rows):
        assert set(row) == FIELDS
        want_in = len(stories.tokenizer.encode(prompt)) if isinstance(prompt, str) else len(prompt)
        assert row["num_input_tokens"] == want_in
        assert row["num_generated_tokens"] == len(row["token_ids"]) == 12  # no EOS within 12 tokens here
        assert isinstance(row["kv_bytes"], int) and isinstance(row["kv_bytes_full"], int) and row["kv_bytes"] > 0
    assert rows[0]["kv_bytes_full"] > rows[1]["kv_bytes_full"]  # a longer prompt, the same number of new tokens
    assert all(0 < row["time_taken_llm"] <= wall for row in rows)  # each row's own time, from its admission
    # a string prompt's text continues it: prompt text + generated text is the decode of all ids
    ids = stories.tokenizer.encode(prompts[0])
    assert "Once upon a time, there was a big dog" + rows[0]["generated_text"] == stories.tokenizer.decode(
        ids + rows[0]["token_ids"])


def test_batch_equals_one_by_one_real_weights(stories):
    prompts = ["Once upon a time, there was a big dog", "Tom", [1], "The sun was hot and the cat sat on the mat"]
    batched = stories.generate(prompts, max_new_tokens=16)
    for prompt, row in zip(prompts, batched):
        (alone,) = stories.generate([prompt], max_new_tokens=16)
        assert row["token_ids"] == alone["token_ids"]
        assert row["generated_text"] == alone["generated_text"]


def test_batch_equals_one_by_one_token_ids(tiny_llama):
    eng = Engine.from_pretrained(tiny_llama, device="cpu")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (3, 17, 9, 1)]
    batched = eng.generate(prompts, max_new_tokens=10)
    for prompt, row in zip(prompts, batched):
        assert row["token_ids"] == eng.generate([prompt], max_new_tokens=10)[0]["token_ids"]
        assert row["generated_text"] == ""  # no tokenizer: ids only


def test_eos_ends_a_row(make_tiny_llama):
    model = make_tiny_llama(seed=3, eos_token_id=None, initializer_range=0.2)
    eng = Engine.from_pretrained(model, device="cpu")
    prompt = [5, 9, 33, 70]
    free = eng.generate([prompt], max_new_tokens=12)[0]["token_ids"]
    assert len(free) == 12
    eos = free[5]
    model.generation_config.eos_token_id = eos
    eng = Engine(model)
    (row,) = eng.generate([prompt, [7, 8]], max_new_tokens=12)[:1]
    cut = free.index(eos) + 1
    assert row["token_ids"] == free[:cut] and row["num_generated_tokens"] == cut  # EOS counted, row ended


def test_stop_strings_cut_text_and_ids(stories):
    prompt = [stories.tokenizer.bos_token_id]
    (free,) = stories.generate([prompt], max_new_tokens=40)
    assert "Lily" in free["generated_text"]
    (row,) = stories.generate([prompt], max_new_tokens=40, stop=["Lily", "never appears"])
    assert row["generated_text"] == free["generated_text"].split("Lily")[0]
    n = row["num_generated_tokens"]
    assert row["token_ids"] == free["token_ids"][:n] and n == len(row["token_ids"]) < free["num_generated_tokens"]
    assert "Lily" in stories.tokenizer.decode(row["token_ids"])
    assert "Lily" not in stories.tokenizer.decode(row["token_ids"][:-1])  # the shortest prefix that holds it
    (same,) = stories.generate([prompt], max_new_tokens=40, stop="never appears")
    assert same["token_ids"] == free["token_ids"]


def test_sampling_seeds(stories):
    prompts = ["Once upon a time", "Tom had a"]
    kw = dict(max_new_tokens=20, temperature=1.0, top_p=0.95)
    state = torch.get_rng_state()
    a = stories.generate(prompts, seed=1, **kw)
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is left alone
    b = stories.generate(prompts, seed=1, **kw)
    c = stories.generate(prompts, seed=2, **kw)
    assert [r["token_ids"] for r in a] == [r["token_ids"] for r in b]
    assert [r["token_ids"] for r in a] != [r["token_ids"] for r in c]
    greedy = stories.generate(prompts, max_new_tokens=20)
    assert [r["token_ids"] for r in a] != [r["token_ids"] for r in greedy]


def test_bad_input_errors(stories, stories260k, tiny_llama):
    with pytest.raises(ValueError, match="empty prompt"):
        stories.generate([""])
    with pytest.raises(ValueError, match="empty prompt"):
        stories.generate([[]])
    with pytest.raises(ValueError, match="max_context 512"):
        stories.generate(["a " * 400], max_new_tokens=200)
    with pytest.raises(ValueError, match="non-empty list"):
        stories.generate("a bare string")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        stories.generate([[1, 9999]])
    with pytest.raises(ValueError, match="temperature"):
        stories.generate(["x"], temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        stories.generate(["x"], temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        stories.generate(["x"], max_new_tokens=0)
    with pytest.raises(ValueError, match="seed"):
        stories.generate(["x"], seed=None)
    with pytest.raises(ValueError, match="stop"):
        stories.generate(["x"], stop=[""])
    with pytest.raises(ValueError, match="tokenizer="):
        Engine.from_pretrained(str(stories260k["model"]))
    with pytest.raises(ValueError, match="dtype='int8'"):
        Engine.from_pretrained(tiny_llama, dtype="int8")
    with pytest.raises(ValueError, match="policy"):
        Engine.from_pretrained(tiny_llama, cache={"policy": "nope"})
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=64))
    with pytest.raises(NotImplementedError, match="'gpt2'"):
        Engine.from_pretrained(gpt2, device="cpu")
    with pytest.raises(ValueError, match="group_size"):  # head_dim 16 is not a multiple of 32
        Engine.from_pretrained(tiny_llama, cache={"quant": "kivi2", "group_size": 32, "residual": 128})
    ids_only = Engine.from_pretrained(tiny_llama, device="cpu")
    with pytest.raises(ValueError, match="need a tokenizer"):
        ids_only.generate(["text without a tokenizer"])
    with pytest.raises(ValueError, match="not a llama2.c checkpoint"):
        Engine.from_pretrained(str(stories260k["tokenizer"]), tokenizer=str(stories260k["tokenizer"]))


def test_dtype_and_tokenizer_object(stories260k):
    tok = Llama2cTokenizer(str(stories260k["tokenizer"]))
    eng = Engine.from_pretrained(str(stories260k["model"]), tokenizer=tok, dtype="bfloat16", device="cpu")
    assert eng.model.dtype == torch.bfloat16 and eng.tokenizer is tok
    (row,) = eng.generate(["Once upon a time"], max_new_tokens=8)
    assert row["num_generated_tokens"] == 8 and row["generated_text"]


def test_transformers_directory(tiny_llama, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + "the cat sat on a mat and dog ran far away".split()
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tk.decoder = decoders.WordPiece()
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                 pad_token="<pad>")
    hf.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
                        "{% if add_generation_prompt %}the{% endif %}")
    tiny_llama.save_pretrained(tmp_path)
    hf.save_pretrained(tmp_path)
    eng = Engine.from_pretrained(str(tmp_path), dtype="auto", device="cpu")
    assert eng.tokenizer.encode("the cat sat") == [1, 4, 5, 6]
    assert eng.tokenizer.chat_template
    # a continuation keeps the space a word-level decoder puts between words
    assert decode_continuation(eng.tokenizer, [1, 4, 5], [6, 7]) == " sat on"
    assert eng.tokenizer.apply_chat_template([{"role": "user", "content": "a dog ran"}]) == [1, 8, 11, 12, 4]
    rows = eng.generate(["the cat sat", [1, 8, 11, 12, 4]], max_new_tokens=6)
    want = Engine.from_pretrained(tiny_llama, device="cpu").generate([[1, 4, 5, 6]], max_new_tokens=6)
    assert rows[0]["token_ids"] == want[0]["token_ids"]
    assert all(r["num_generated_tokens"] == len(r["token_ids"]) for r in rows)


def test_keyformer_kivi2_holds_fewer_bytes(stories, shared_dir):
    import json

    lines = (shared_dir / "data" / "dialogsum" / "dialogsum.dev.jsonl").read_text().splitlines()[:2]
    prompts = [stories.tokenizer.encode(json.loads(line)["dialogue"])[:160] for line in lines]
    cfg = CacheConfig(policy="keyformer", budget=0.5, quant="kivi2", group_size=8, residual=32)  # head_dim 8
    eng = Engine(stories.model, stories.tokenizer, cfg)
    rows = eng.generate(prompts, max_new_tokens=16)
    for row in rows:
        assert row["num_generated_tokens"] == len(row["token_ids"]) > 0
        assert 0 < row["kv_bytes"] < row["kv_bytes_full"]
    # Keyformer noise is seeded per row from (cfg.seed, seed, prompt): the same call repeats, and a row does
    # not depend on its batch-mates
    assert [r["token_ids"] for r in eng.generate(prompts, max_new_tokens=16)] == [r["token_ids"] for r in rows]
    assert eng.generate(prompts[1:], max_new_tokens=16)[0]["token_ids"] == rows[1]["token_ids"]
