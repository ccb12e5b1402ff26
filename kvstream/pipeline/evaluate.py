"""Fidelity of compressed KV caches to the full cache, over a grid of (policy, budget, quant).

    python jobs/evaluate.py [--config conf/evaluate.yaml] key=value ...    (omegaconf dotlist; lists as
    "eval.policies=[full,h2o]")

For each sample and grid cell (kvstream.kvcache.fidelity): teacher-forced KL(full || compressed), top-1 agreement and
perplexity over a continuation, ROUGE-L of the compressed greedy generation against the full one, ROUGE-1/2/L
against references where the data has them, and kv_bytes / kv_bytes_full from `cache.stats()`.
Writes <output.path>/fidelity.parquet (one row per dataset x cell), fidelity_samples.parquet (per sample),
config.yaml (resolved), report.md and fidelity.png.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from kvstream.pipeline.fidelity_report import NOTES_MARKER, write_outputs  # noqa: F401  (NOTES_MARKER: for callers)
from kvstream.kvcache.config import POLICIES, QUANTS, CacheConfig
from kvstream.kvcache.fidelity import fidelity_batch

SAMPLES = "model-samples"  # data.path value: prompts the model samples itself from BOS
DEFAULTS = {
    "model": {"path": None, "tokenizer": None, "dtype": None, "device": None},  # dtype/device None: Engine's
    "data": {
        "path": SAMPLES,  # a file (jsonl/json/parquet/csv), "model-samples", or a list of those
        "format": None,  # default: from the extension
        "text_column": "text", "reference_column": None,  # reference: a column name or a list (best of)
        "min_prompt_tokens": 32, "max_prompt_tokens": None,  # None: the model's context - eval.max_new_tokens
        "sample_tokens": 384, "sample_temperature": 1.0, "seed": 0,  # model-samples: length, temperature, seed
    },
    "eval": {
        "policies": ["full", "window", "sink", "h2o", "keyformer"], "budgets": [0.2, 0.5, 0.8], "quants": ["none"],
        "quant_policies": None,  # policies crossed with quants other than none (None: all)
        "quant_budgets": None,  # budgets of those crossed cells under eviction policies (None: eval.budgets)
        "max_samples": 8, "max_new_tokens": 64, "batch_size": 16, "num_threads": 1,  # torch CPU threads
        "continuation": "generation",  # generation (the full cache's greedy output) | reference
    },
    "cache": {k: v for k, v in CacheConfig().to_dict().items()
              if k not in ("policy", "budget", "quant", "max_new_tokens")},
    "output": {"path": "outputs/fidelity"},
}


def load_config(argv: list[str]) -> DictConfig:
    """Defaults <- --config YAML <- dotlist overrides; unknown keys and bad values exit naming the key."""
    keys = "\n".join(f"  {s}.{k} = {v!r}" for s in DEFAULTS for k, v in DEFAULTS[s].items())
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=f"config keys (key=value overrides; defaults shown):\n{keys}")
    ap.add_argument("--config", default=None, help="YAML file layered over the built-in defaults")
    ap.add_argument("overrides", nargs="*", help="key=value (omegaconf dotlist)")
    args = ap.parse_args(argv)
    cfg = OmegaConf.create(DEFAULTS)
    OmegaConf.set_struct(cfg, True)
    try:
        if args.config:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(args.config))
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(args.overrides))
    except ConfigKeyError as e:
        raise SystemExit(f"evaluate: unknown config key {e.full_key!r}; valid keys: "
                         f"{', '.join(f'{s}.{k}' for s in DEFAULTS for k in DEFAULTS[s])}") from None
    except OmegaConfBaseException as e:
        raise SystemExit(f"evaluate: bad config value for {getattr(e, 'full_key', '?')!r}: {e}") from None
    validate(cfg)
    return cfg


def as_list(cfg: DictConfig, key: str) -> list:
    v = OmegaConf.select(cfg, key)
    v = OmegaConf.to_container(v) if OmegaConf.is_config(v) else v
    return [] if v is None else [v] if isinstance(v, (str, int, float)) else list(v)


def validate(cfg: DictConfig) -> None:
    if not cfg.model.path:
        raise SystemExit("evaluate: model.path is not set (a llama2.c .bin, a local transformers dir or a hub id)")
    for key, valid in (("eval.policies", POLICIES), ("eval.quants", QUANTS), ("eval.quant_policies", POLICIES)):
        bad = [x for x in as_list(cfg, key) if x not in valid]
        if bad or (key != "eval.quant_policies" and not as_list(cfg, key)):
            raise SystemExit(f"evaluate: {key}={as_list(cfg, key)}: {bad or 'empty'} invalid; valid: {', '.join(valid)}")
    budgets = as_list(cfg, "eval.budgets") + as_list(cfg, "eval.quant_budgets")
    if any(isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= 1 for b in budgets):
        raise SystemExit(f"evaluate: eval.budgets / eval.quant_budgets={budgets}: each must be a fraction in (0, 1]")
    for key in ("eval.max_samples", "eval.max_new_tokens", "eval.batch_size", "eval.num_threads",
                "data.min_prompt_tokens", "data.sample_tokens"):
        v = OmegaConf.select(cfg, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SystemExit(f"evaluate: {key}={v!r} must be an int >= 1")
    if cfg.eval.continuation not in ("generation", "reference"):
        raise SystemExit(f"evaluate: eval.continuation={cfg.eval.continuation!r}: use generation or reference")
    if cfg.eval.continuation == "reference" and not cfg.data.reference_column:
        raise SystemExit("evaluate: eval.continuation=reference needs data.reference_column")
    for cell in grid(cfg):
        try:
            cell_config(cfg, *cell)
        except ValueError as e:
            raise SystemExit(f"evaluate: grid cell {cell} (from eval.* and cache.*): {e}") from None


def grid(cfg: DictConfig) -> list[tuple[str, float, str]]:
    """(policy, budget, quant) cells: full once per quant at budget 1.0; quants other than none only under
    eval.quant_policies (all policies when unset), at eval.quant_budgets (eval.budgets when unset)."""
    qp = as_list(cfg, "eval.quant_policies") or list(POLICIES)
    budgets = [float(b) for b in as_list(cfg, "eval.budgets")]
    quant_budgets = [float(b) for b in as_list(cfg, "eval.quant_budgets")] or budgets
    cells = []
    for p in as_list(cfg, "eval.policies"):
        for q in as_list(cfg, "eval.quants"):
            if q == "none" or p in qp:
                cells += [(p, b, q) for b in ([1.0] if p == "full" else budgets if q == "none" else quant_budgets)]
    return cells


def cell_config(cfg: DictConfig, policy: str, budget: float, quant: str) -> CacheConfig:
    return CacheConfig.from_dict({**OmegaConf.to_container(cfg.cache), "policy": policy, "budget": float(budget),
                                  "quant": quant, "max_new_tokens": int(cfg.eval.max_new_tokens)})


# ---- model and data -----------------------------------------------------------------------------------------
def load_model(cfg: DictConfig):
    """(model, tokenizer or None, context length) through the Engine's loader (llama2.c .bin + its tokenizer,
    local transformers dir, hub id). A transformers dir without a tokenizer loads with none (data: token ids)."""
    from kvstream.kvcache import Engine

    path, tok = str(cfg.model.path), cfg.model.tokenizer
    try:
        eng = Engine.from_pretrained(path, tokenizer=tok, dtype=cfg.model.dtype, device=cfg.model.device)
    except ValueError as e:
        if tok is not None or not Path(path).is_dir():
            raise SystemExit(f"evaluate: model.path={path} / model.tokenizer={tok}: {e}") from None
        from transformers import AutoModelForCausalLM

        eng = Engine.from_pretrained(AutoModelForCausalLM.from_pretrained(path), dtype=cfg.model.dtype,
                                     device=cfg.model.device)
    return eng.model, eng.tokenizer, eng.max_context


@dataclass
class Sample:
    dataset: str
    index: int
    prompt: list[int]
    references: list[str] = field(default_factory=list)
    continuation: list[int] | None = None


def read_table(path: str, fmt: str | None) -> pd.DataFrame:
    fmt = fmt or {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(Path(path).suffix)
    if not Path(path).is_file():
        raise SystemExit(f"evaluate: data.path={path}: no such file")
    readers = {"jsonl": lambda: pd.read_json(path, lines=True), "json": lambda: pd.read_json(path),
               "parquet": lambda: pd.read_parquet(path), "csv": lambda: pd.read_csv(path)}
    if fmt not in readers:
        raise SystemExit(f"evaluate: data.format={fmt!r} for {path}: use one of {', '.join(readers)}")
    return readers[fmt]()


def _encode(tokenizer, text: str, bos: bool) -> list[int]:
    ids = list(tokenizer.encode(text))  # the Engine's protocol: BOS included where the model uses one
    return ids if bos or not ids or ids[0] != tokenizer.bos_token_id else ids[1:]


def file_samples(cfg: DictConfig, path: str, tokenizer, max_prompt: int) -> list[Sample]:
    df, d = read_table(path, cfg.data.format), cfg.data
    ref_cols = as_list(cfg, "data.reference_column")
    for col in [d.text_column] + ref_cols:
        if col not in df.columns:
            raise SystemExit(f"evaluate: column {col!r} (data.text_column / data.reference_column) is not in {path}; "
                             f"it has {list(df.columns)}")
    name, out = Path(path).name, []
    for suffix in (".jsonl", ".json", ".parquet", ".csv"):
        name = name.removesuffix(suffix)
    for i, row in df.iterrows():
        text = row[d.text_column]
        if isinstance(text, str):
            if tokenizer is None:
                raise SystemExit(f"evaluate: {path} holds text but {cfg.model.path} has no tokenizer: set model.tokenizer")
            ids = _encode(tokenizer, text, bos=True) if text.strip() else []
        else:
            ids = [int(x) for x in text] if hasattr(text, "__len__") else []
        refs = [str(row[c]) for c in ref_cols if isinstance(row[c], str) and row[c].strip()]
        if len(ids) < d.min_prompt_tokens:
            continue
        s = Sample(name, int(i), ids[:max_prompt], refs)
        if cfg.eval.continuation == "reference":
            if not refs:
                continue
            s.continuation = _encode(tokenizer, refs[0], bos=False)[: cfg.eval.max_new_tokens]
        out.append(s)
        if len(out) == cfg.eval.max_samples:
            break
    return out


def model_samples(cfg: DictConfig, model, max_prompt: int, bos: int) -> list[Sample]:
    """eval.max_samples prompts of data.sample_tokens tokens that the model samples from BOS (seed data.seed)."""
    n, t = int(cfg.eval.max_samples), int(cfg.data.sample_tokens)
    if t > max_prompt:
        raise SystemExit(f"evaluate: data.sample_tokens={t} exceeds the prompt room {max_prompt} "
                         f"(context - eval.max_new_tokens): lower it")
    torch.manual_seed(int(cfg.data.seed))
    dev = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(input_ids=torch.full((n, 1), bos, device=dev),
                             attention_mask=torch.ones(n, 1, dtype=torch.long, device=dev),
                             do_sample=True, temperature=float(cfg.data.sample_temperature), top_k=0, top_p=1.0,
                             max_new_tokens=t - 1, min_new_tokens=t - 1)
    return [Sample(SAMPLES, i, out[i].tolist()) for i in range(n)]


def load_samples(cfg: DictConfig, model, tokenizer, context: int) -> list[Sample]:
    m = int(cfg.eval.max_new_tokens)
    max_prompt = int(cfg.data.max_prompt_tokens or context - m)
    if max_prompt + m > context or max_prompt < 1:
        raise SystemExit(f"evaluate: data.max_prompt_tokens={max_prompt} + eval.max_new_tokens={m} exceeds the "
                         f"model's context {context}: lower one of them")
    bos = getattr(tokenizer, "bos_token_id", None) or model.generation_config.bos_token_id or 1
    samples = []
    for path in as_list(cfg, "data.path"):
        got = model_samples(cfg, model, max_prompt, bos) if path == SAMPLES else file_samples(cfg, path, tokenizer,
                                                                                              max_prompt)
        if not got:
            raise SystemExit(f"evaluate: data.path={path}: no usable sample (>= data.min_prompt_tokens tokens)")
        samples += got
    return samples


# ---- run ----------------------------------------------------------------------------------------------------
def summarize(per_sample: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, policy, budget, quant): token-weighted KL / top-1 / perplexity, mean ROUGE, byte ratio."""
    keys = ["dataset", "policy", "budget", "quant"]
    out = per_sample.groupby(keys, sort=False).agg(
        n_samples=("sample", "count"), n_tokens=("n_tokens", "sum"), kl=("kl_sum", "sum"), top1=("top1_sum", "sum"),
        nll=("nll_sum", "sum"), kv_bytes=("kv_bytes", "sum"), kv_bytes_full=("kv_bytes_full", "sum"),
        rougeL_vs_full=("rougeL_vs_full", "mean"), rouge1_ref=("rouge1_ref", "mean"),
        rouge2_ref=("rouge2_ref", "mean"), rougeL_ref=("rougeL_ref", "mean"),
        seconds_per_sample=("seconds", "mean")).reset_index()
    out["kl_mean"] = out.kl / out.n_tokens
    out["top1_agreement"] = out.top1 / out.n_tokens
    out["ppl"] = (out.nll / out.n_tokens).map(math.exp)
    out["kv_bytes_ratio"] = out.kv_bytes / out.kv_bytes_full
    return out[keys + ["kl_mean", "top1_agreement", "ppl", "rougeL_vs_full", "kv_bytes_ratio", "n_samples",
                       "n_tokens", "rouge1_ref", "rouge2_ref", "rougeL_ref", "kv_bytes", "kv_bytes_full",
                       "seconds_per_sample"]]


def main(argv: list[str] | None = None) -> pd.DataFrame:
    argv = sys.argv[1:] if argv is None else argv
    cfg = load_config(argv)
    torch.set_num_threads(int(cfg.eval.num_threads))
    model, tokenizer, context = load_model(cfg)
    samples = load_samples(cfg, model, tokenizer, context)
    if tokenizer is not None:
        def text_of(ids):
            return tokenizer.decode(ids)
    else:
        def text_of(ids):
            return " ".join(f"t{x}" for x in ids)
    cells = grid(cfg)
    configs = [cell_config(cfg, *c) for c in cells]
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else (model.generation_config.eos_token_id or 0)
    bs, t0, records = int(cfg.eval.batch_size), time.perf_counter(), []
    for name in dict.fromkeys(s.dataset for s in samples):
        ds = sorted((s for s in samples if s.dataset == name), key=lambda s: len(s.prompt))
        for start in range(0, len(ds), bs):
            batch = ds[start:start + bs]
            seeds = [(int(cfg.cache.seed) * 1_000_003 + s.index) % 2**31 for s in batch]
            conts = [s.continuation for s in batch] if cfg.eval.continuation == "reference" else None
            res = fidelity_batch(model, [s.prompt for s in batch], configs, int(cfg.eval.max_new_tokens), pad,
                                 text_of, seeds, conts, [s.references for s in batch])
            for (policy, budget, quant), rows in zip(cells, res):
                records += [dict(dataset=s.dataset, sample=s.index, prompt_tokens=len(s.prompt), policy=policy,
                                 budget=budget, quant=quant, **r) for s, r in zip(batch, rows)]
            print(f"evaluate: {name}: {start + len(batch)}/{len(ds)} samples x {len(cells)} cells "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    per_sample = pd.DataFrame.from_records(records)
    summary = summarize(per_sample)
    write_outputs(cfg, argv, summary, per_sample, time.perf_counter() - t0)
    return summary


if __name__ == "__main__":
    main()
