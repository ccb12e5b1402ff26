"""The fidelity job (jobs/evaluate.py) and its teacher-forcing helpers (kvcache/fidelity.py).

End to end on the real tiny model ../shared/data/stories260K with a tiny grid (skips, with the reason, only
where ../shared is absent); the helpers on a tiny random Llama built from a config (conftest's `tiny_llama`):
teacher-forced logits must equal one cache-free forward pass over prompt + continuation.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]

from kvstream.pipeline.evaluate import load_config
from kvstream.kvcache import CacheConfig
from kvstream.kvcache.fidelity import decode, fidelity_batch, left_pad, make_cache, token_metrics


def prompts_of(lengths, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab, (n - 1,), generator=g).tolist() for n in lengths]


def test_job_end_to_end_on_stories260k(tmp_path, shared_dir, stories260k):
    out = tmp_path / "fid"
    args = [sys.executable, str(ROOT / "jobs" / "evaluate.py"), "--config", str(ROOT / "conf" / "evaluate.yaml"),
            f"model.path={stories260k['model']}", f"model.tokenizer={stories260k['tokenizer']}",
            f"data.path=[model-samples,{shared_dir / 'data' / 'dialogsum' / 'dialogsum.dev.jsonl'}]",
            "data.reference_column=summary", "data.sample_tokens=96", "data.min_prompt_tokens=64",
            "eval.policies=[full,h2o,keyformer]", "eval.budgets=[0.5]", "eval.quants=[none,kivi2]",
            "eval.quant_policies=[full]", "eval.max_samples=2", "eval.max_new_tokens=12", f"output.path={out}"]
    run = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    df = pd.read_parquet(out / "fidelity.parquet")
    need = {"policy", "budget", "quant", "kl_mean", "top1_agreement", "ppl", "rougeL_vs_full", "kv_bytes_ratio",
            "n_samples", "dataset", "rougeL_ref"}
    assert need <= set(df.columns)
    assert sorted(df.dataset.unique()) == ["dialogsum.dev", "model-samples"]
    cells = {(p, b, q) for p, b, q in zip(df.policy, df.budget, df.quant)}
    assert cells == {("full", 1.0, "none"), ("full", 1.0, "kivi2"), ("h2o", 0.5, "none"), ("keyformer", 0.5, "none")}
    assert (df.n_samples == 2).all() and len(df) == 8
    for _, full in df[(df.policy == "full") & (df.quant == "none")].iterrows():
        assert abs(full.kl_mean) < 1e-9 and full.top1_agreement == 1.0 and full.rougeL_vs_full == 1.0
        assert 1.0 <= full.kv_bytes_ratio < 1.3  # held bytes include the buffers' slack slots
        assert 1.0 < full.ppl < 512
    for name, d in df.groupby("dataset"):
        full = d[(d.policy == "full") & (d.quant == "none")].iloc[0]
        for _, r in d[d.policy != "full"].iterrows():
            assert r.kv_bytes_ratio < 0.8 * full.kv_bytes_ratio, (name, r.policy)
            assert r.kl_mean > 0 and 0 <= r.top1_agreement <= 1 and math.isfinite(r.ppl)
        kivi = d[d.quant == "kivi2"].iloc[0]
        assert kivi.kv_bytes_ratio < full.kv_bytes_ratio and kivi.kl_mean >= 0
        assert d.rougeL_ref.notna().all() if name == "dialogsum.dev" else d.rougeL_ref.isna().all()
    samples = pd.read_parquet(out / "fidelity_samples.parquet")
    assert len(samples) == 16 and (samples.n_tokens == 12).all()
    resolved = OmegaConf.load(out / "config.yaml")
    assert list(resolved.eval.budgets) == [0.5] and resolved.cache.group_size == 8
    assert (out / "fidelity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "| keyformer | none | 0.5 |" in report and "keyformer has lower KL than h2o at" in report
    assert "| full+kivi2 |" in report  # the pivot table


def test_teacher_forcing_equals_one_forward_pass(tiny_llama):
    model = tiny_llama
    prompts = prompts_of([9, 5, 13])
    ids, mask = left_pad(prompts, pad_id=0)
    cont = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(2))
    got = decode(model, ids, mask, make_cache(CacheConfig(), model), 6, force=cont)
    assert torch.equal(got.tokens, cont) and got.logits.shape == (3, 6, 128)
    full_ids, full_mask = torch.cat([ids, cont], 1), torch.cat([mask, torch.ones_like(cont)], 1)
    pos = (full_mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        ref = model(input_ids=full_ids, attention_mask=full_mask, position_ids=pos).logits
    want = ref[:, ids.shape[1] - 1: -1]  # the logits that predict each continuation token
    torch.testing.assert_close(got.logits, want, rtol=1e-4, atol=1e-4)


def test_token_metrics_hand_checked():
    p, q = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64), torch.tensor([0.2, 0.6, 0.2], dtype=torch.float64)
    ref = torch.stack([p.log(), p.log()])[None]  # (1, 2, 3)
    test = torch.stack([q.log(), p.log()])[None]
    m = token_metrics(ref, test, torch.tensor([[1, 0]]), torch.tensor([2]))
    kl = 0.5 * math.log(0.5 / 0.2) + 0.25 * math.log(0.25 / 0.6) + 0.25 * math.log(0.25 / 0.2)
    assert m.kl.item() == pytest.approx(kl, rel=1e-9)
    assert m.top1.item() == 1.0  # step 0: argmax 0 vs 1; step 1: same distribution
    assert m.nll.item() == pytest.approx(-math.log(0.6) - math.log(0.5), rel=1e-9)
    assert m.count.item() == 2
    short = token_metrics(ref, test, torch.tensor([[1, 0]]), torch.tensor([1]))  # only step 0 counts
    assert short.count.item() == 1 and short.top1.item() == 0.0 and short.kl.item() == pytest.approx(kl)


def test_fidelity_batch_reference_continuation_and_compression(tiny_llama):
    model = tiny_llama
    prompts = prompts_of([40, 28])
    cells = [CacheConfig(policy="full", max_new_tokens=8), CacheConfig(policy="window", budget=0.25, max_new_tokens=8)]
    conts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    res = fidelity_batch(model, prompts, cells, 8, pad_id=0, text_of=lambda ids: " ".join(map(str, ids)),
                         seeds=[0, 1], continuations=conts, references=[["5 6 7"], []])
    full, window = res
    assert [r["n_tokens"] for r in full] == [5, 3]
    assert all(r["kl_sum"] == 0.0 and r["top1_sum"] == r["n_tokens"] for r in full)
    assert all(r["rougeL_vs_full"] == 1.0 for r in full)
    assert all(r["kl_sum"] > 0 for r in window)
    assert all(r["kv_bytes"] < 0.6 * r["kv_bytes_full"] for r in window)
    assert 0.0 <= full[0]["rougeL_ref"] <= 1.0 and math.isnan(full[1]["rougeL_ref"])


@pytest.mark.parametrize("override, needle", [
    ("eval.polices=[full]", "eval.polices"),
    ("eval.policies=[full,h3o]", "eval.policies"),
    ("eval.budgets=[0.5,1.5]", "eval.budgets"),
    ("eval.max_samples=0", "eval.max_samples"),
    ("cache.group_size=12", "group_size"),
    ("eval.continuation=reference", "data.reference_column"),
])
def test_config_errors_name_the_key(override, needle):
    with pytest.raises(SystemExit) as e:
        load_config(["model.path=x.bin", override])
    assert needle in str(e.value)


def test_grid_cells_and_report_notes_survive_a_rerun(tmp_path):
    from kvstream.pipeline.evaluate import NOTES_MARKER, grid, summarize, write_outputs

    cfg = load_config(["model.path=x.bin", "eval.policies=[full,h2o,keyformer]", "eval.budgets=[0.2,0.6]",
                       "eval.quants=[none,kivi4]", "eval.quant_policies=[full,keyformer]", "eval.quant_budgets=[0.6]",
                       f"output.path={tmp_path}"])
    assert grid(cfg) == [("full", 1.0, "none"), ("full", 1.0, "kivi4"), ("h2o", 0.2, "none"), ("h2o", 0.6, "none"),
                         ("keyformer", 0.2, "none"), ("keyformer", 0.6, "none"), ("keyformer", 0.6, "kivi4")]
    const = {"prompt_tokens": 10, "top1_sum": 3.0, "nll_sum": 2.0, "n_tokens": 4, "kv_bytes": 50,
             "kv_bytes_full": 100, "seconds": 0.1, "rougeL_vs_full": 0.5, "rouge1_ref": math.nan,
             "rouge2_ref": math.nan, "rougeL_ref": math.nan}
    rows = [{"dataset": "d", "sample": i, "policy": p, "budget": b, "quant": q, "kl_sum": 0.1 * i, **const}
            for i in range(2) for p, b, q in grid(cfg)]
    per_sample = pd.DataFrame(rows)
    summary = summarize(per_sample)
    assert summary.kl_mean.tolist() == pytest.approx([0.1 / 8] * 7) and (summary.top1_agreement == 0.75).all()
    assert summary.ppl.tolist() == pytest.approx([math.exp(0.5)] * 7) and (summary.kv_bytes_ratio == 0.5).all()
    write_outputs(cfg, [], summary, per_sample, 1.0)
    report = tmp_path / "report.md"
    report.write_text(report.read_text() + "Hand-written analysis.\n")
    write_outputs(cfg, [], summary, per_sample, 2.0)
    text = report.read_text()
    assert text.count(NOTES_MARKER) == 1 and text.endswith(NOTES_MARKER + "\nHand-written analysis.\n")
    assert "Wall time: 2 s" in text
