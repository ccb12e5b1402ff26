"""Report of the fidelity job (jobs/evaluate.py): fidelity.parquet, per-sample parquet, config, report.md with
computed observations (hand-written notes below NOTES_MARKER survive a rerun), and fidelity.png."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

NOTES_MARKER = "<!-- notes: everything below this line is kept when the job rewrites this report -->"


def _table(df: pd.DataFrame) -> str:
    cols = ["policy", "quant", "budget", "kv_bytes_ratio", "kl_mean", "top1_agreement", "ppl", "rougeL_vs_full"]
    if df.rougeL_ref.notna().any():
        cols.append("rougeL_ref")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def _observations(df: pd.DataFrame) -> list[str]:
    """Comparisons computed from the numbers: pairs of policies at equal budgets, KIVI vs the token2 control."""
    out, key = [], lambda p, q: df[(df.policy == p) & (df.quant == q)].set_index("budget")
    for a, b in (("keyformer", "h2o"), ("h2o", "window"), ("sink", "window")):
        ra, rb = key(a, "none"), key(b, "none")
        both = list(ra.index.intersection(rb.index))
        if both:
            wins = [x for x in both if ra.kl_mean[x] < rb.kl_mean[x]]
            out.append(f"{a} has lower KL than {b} at {len(wins)}/{len(both)} budgets ({wins or 'none'}); "
                       f"higher or equal at {[x for x in both if x not in wins] or 'none'}.")
    for pol in ("full", "keyformer"):
        rows = {q: key(pol, q) for q in ("kivi2", "kivi4", "token2")}
        for b in rows["kivi2"].index.intersection(rows["token2"].index):
            k2, t2 = rows["kivi2"].loc[b], rows["token2"].loc[b]
            out.append(f"{pol}@{b:g}: kivi2 (per-channel keys, fp residual) KL {k2.kl_mean:.4g} at bytes "
                       f"{k2.kv_bytes_ratio:.3f} vs token2 (per-token, no residual) KL {t2.kl_mean:.4g} at bytes "
                       f"{t2.kv_bytes_ratio:.3f}: kivi2 is {'better' if k2.kl_mean < t2.kl_mean else 'NOT better'}.")
    return out


def _pivot(df: pd.DataFrame) -> str:
    """Compact table: one row per (policy, quant), one column per budget; cells 'KL / top-1 / bytes ratio'."""
    d = df.assign(name=[p if q == "none" else f"{p}+{q}" for p, q in zip(df.policy, df.quant)])
    budgets = sorted(d.budget.unique())
    lines = ["| cache | " + " | ".join(f"{b:g}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for name, g in d.groupby("name", sort=False):
        g = g.set_index("budget")
        cells = [f"{g.kl_mean[b]:.3f} / {g.top1_agreement[b]:.3f} / {g.kv_bytes_ratio[b]:.2f}" if b in g.index
                 else "" for b in budgets]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: pd.DataFrame, path: Path) -> None:
    """top1_agreement and KL vs kv_bytes_ratio, one line per (policy, quant), one column per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"full": "black", "window": "tab:blue", "sink": "tab:orange", "h2o": "tab:green",
              "keyformer": "tab:red"}
    markers = {"none": "o", "kivi2": "s", "kivi4": "^", "token2": "x"}
    linestyles = {"none": "-", "kivi2": "--", "kivi4": ":", "token2": "-."}
    names = list(dict.fromkeys(summary.dataset))
    fig, axes = plt.subplots(2, len(names), figsize=(6 * len(names), 8), squeeze=False)
    for j, name in enumerate(names):
        d = summary[summary.dataset == name]
        for (policy, quant), g in d.groupby(["policy", "quant"], sort=False):
            g = g.sort_values("kv_bytes_ratio")
            label = policy if quant == "none" else f"{policy}+{quant}"
            style = {"color": colors.get(policy, "gray"), "marker": markers.get(quant, "o"),
                     "linestyle": "none" if policy == "full" else linestyles.get(quant, "-"),
                     "markersize": 10 if policy == "full" else 5}
            axes[0, j].plot(g.kv_bytes_ratio, g.top1_agreement, label=label, **style)
            nz = g[g.kl_mean > 0]  # the full cache's own KL is 0: off a log axis
            axes[1, j].plot(nz.kv_bytes_ratio, nz.kl_mean, label=label, **style)
        axes[0, j].set_title(f"{name} ({int(d.n_samples.max())} samples)")
        axes[0, j].set_ylabel("top-1 agreement with full cache")
        axes[1, j].set_ylabel("KL(full || compressed), nats/token")
        axes[1, j].set_yscale("log")
        for ax in axes[:, j]:
            ax.set_xlabel("kv_bytes / kv_bytes_full")
            ax.grid(alpha=0.3)
        axes[0, j].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_outputs(cfg: DictConfig, argv: list[str], summary: pd.DataFrame, per_sample: pd.DataFrame,
                  wall_s: float) -> None:
    out = Path(str(cfg.output.path))
    out.mkdir(parents=True, exist_ok=True)
    summary.to_parquet(out / "fidelity.parquet", index=False)
    per_sample.to_parquet(out / "fidelity_samples.parquet", index=False)
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    plot(summary, out / "fidelity.png")
    report = out / "report.md"
    notes = report.read_text().split(NOTES_MARKER, 1)[1] if report.exists() and NOTES_MARKER in report.read_text() else ""
    import transformers

    lines = [f"# KV-cache fidelity: {cfg.model.path}", "",
             f"Command: `python jobs/evaluate.py {' '.join(argv)}`  ",
             (f"Wall time: {wall_s:.0f} s; torch {torch.__version__}, transformers {transformers.__version__}; "
              f"{time.strftime('%Y-%m-%d')}.  "),
             (f"Cache settings (all cells): {OmegaConf.to_container(cfg.cache)}; continuation: "
              f"{cfg.eval.continuation}, {cfg.eval.max_new_tokens} new tokens."), ""]
    for name, d in summary.groupby("dataset", sort=False):
        lines += [f"## {name} ({int(d.n_samples.max())} samples, {int(d.n_tokens.max())} continuation tokens)", "",
                  "KL(full || compressed) / top-1 agreement / kv_bytes_ratio, by budget:", "", _pivot(d), "",
                  "Observations (computed):", ""] + [f"- {o}" for o in _observations(d)] + [
                  "", "<details><summary>All columns</summary>", "", _table(d), "", "</details>", ""]
    lines += ["![fidelity](fidelity.png)", "", NOTES_MARKER]
    report.write_text("\n".join(lines) + (notes or "\n"))
    print(f"evaluate: wrote {out}/fidelity.parquet, report.md, fidelity.png ({wall_s:.0f} s)")
