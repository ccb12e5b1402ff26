"""A local transformers directory (model + tokenizer with a chat template): the converse job uses the template."""

import pyarrow.parquet as pq
import pytest

from kvstream.pipeline import load_config, run
from tests.pipeline.helpers import job_overrides, write_jsonl

WORDS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "hello", "how", "are", "you", "fine", "thanks", "?"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("hf_model")
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def test_converse_with_the_tokenizers_chat_template(tmp_path, ray_local, hf_dir):
    convs = [[{"role": "user", "content": "hello how are you ?"}],
             [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "fine thanks"},
              {"role": "user", "content": "how are you ?"}]]
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in convs])
    over = job_overrides(tmp_path, **{"model.path": hf_dir, "data.path": src, "generate.max_new_tokens": 3})
    stats = run(load_config("converse", None, over))
    rows = sorted(pq.read_table(str(tmp_path / "out" / "results")).to_pylist(), key=lambda r: r["id"])
    # <s> + per message (role token + words) + <|assistant|>: the template's tokens, one BOS
    want = [1 + sum(1 + len(m["content"].split()) for m in c) + 1 for c in convs]
    assert [r["num_input_tokens"] for r in rows] == want
    assert all(r["error"] is None and r["num_generated_tokens"] >= 1 for r in rows) and stats["rows_ok"] == 2
