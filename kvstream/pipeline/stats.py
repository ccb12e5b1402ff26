"""Run statistics: accumulated on the driver from small per-row stats tables (one invocation's, or every row of an
output), in counters only: nothing per row is kept, so the driver's memory does not grow with the rows.

`RunStats` over one invocation's stats tables (what the workers' WriteParts stage returns, kvstream/pipeline/parts.py)
gives that invocation's figures (a resumed run reports the rows it skipped separately); over the tables of
`results/` it gives the output's totals (kvstream/pipeline/totals.py).
ROUGE-1/2/L (F-measure, stemmed) of generated text against the reference column, when the data has one: scored per
row where the row is (`rouge_scores`, on the workers: the `_rouge1/2/L` columns) or here from the text columns;
a reference that is a JSON list of strings counts as several references (the best score is kept).
"""

from __future__ import annotations

import collections
import json
import re
import time
from typing import Any

import pyarrow as pa


def _references(value: str | None) -> list[str]:
    if not value:
        return []
    if value.startswith("["):
        try:
            refs = json.loads(value)
            if isinstance(refs, list) and all(isinstance(r, str) for r in refs):
                return [r for r in refs if r.strip()]
        except ValueError:
            pass
    return [value] if value.strip() else []


ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
_scorer = None


def rouge_scores(pred: str | None, reference: str | None) -> dict[str, float] | None:
    """{rouge1, rouge2, rougeL} F-measures of `pred` against the best of the row's references; None without one."""
    global _scorer
    refs = _references(reference)
    if not refs:
        return None
    if _scorer is None:
        from rouge_score import rouge_scorer

        _scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    scores = [_scorer.score(ref, pred or "") for ref in refs]
    return {k: max(s[k].fmeasure for s in scores) for k in ROUGE_KEYS}


class RunStats:
    def __init__(self, reference_column: str | None = None):
        self.start = time.time()
        self.ref_col = reference_column
        self.ok = self.failed = self.skipped = self.retried = 0
        self.input_tokens = self.output_tokens = self.truncated = 0
        self.kv_bytes = self.kv_bytes_full = 0
        self.actors: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.errors: collections.Counter = collections.Counter()
        self.rouge_sums = dict.fromkeys(ROUGE_KEYS, 0.0)
        self.rouge_rows = 0
        self.first: tuple[float, int, int] | None = None  # (time, rows, output tokens) when the first batch came
        self.last = self.start

    def add(self, table: pa.Table) -> None:
        """Count one stats table: rows of results (with their `rouge1/2/L` columns, else `generated_text` and the
        reference column) or the workers' stats rows (`_rouge1/2/L` instead of the texts)."""
        now = time.time()
        names = table.column_names
        # where the scores are: the workers' stats columns `_rouge1/2/L`, a part's `rouge1/2/L`, else the texts
        prefix = "_" if "_rouge1" in names else ("" if self.ref_col and "rouge1" in names else None)
        for r in table.to_pylist():
            actor = r.get("_actor") or "?"
            if r["error"] is not None:
                self.failed += 1
                self.errors[re.sub(r"\d+", "N", r["error"])[:120]] += 1
                self.actors[actor]["rows_failed"] += 1
                continue
            self.ok += 1
            self.input_tokens += r["num_input_tokens"] or 0
            self.output_tokens += r["num_generated_tokens"] or 0
            self.truncated += bool(r.get("truncated"))
            self.kv_bytes += r["kv_bytes"] or 0
            self.kv_bytes_full += r["kv_bytes_full"] or 0
            a = self.actors[actor]
            a["rows_ok"] += 1
            a["input_tokens"] += r["num_input_tokens"] or 0
            a["output_tokens"] += r["num_generated_tokens"] or 0
            if prefix is not None:
                score = {k: r[prefix + k] for k in ROUGE_KEYS} if r[prefix + "rouge1"] is not None else None
            else:
                score = rouge_scores(r.get("generated_text"), r.get(self.ref_col)) if self.ref_col else None
            if score is not None:
                self.rouge_rows += 1
                for k in ROUGE_KEYS:
                    self.rouge_sums[k] += score[k]
        if self.first is None:
            self.first = (now, self.rows, self.output_tokens)
        self.last = now

    @property
    def rows(self) -> int:
        return self.ok + self.failed

    def rouge(self) -> dict[str, float] | None:
        if not self.rouge_rows:
            return None
        return {k: self.rouge_sums[k] / self.rouge_rows for k in ROUGE_KEYS} | {"rouge_rows": self.rouge_rows}

    def counts(self) -> dict[str, Any]:
        """Row and token counts, KV bytes and the most common errors (no timing)."""
        return dict(
            rows=self.rows, rows_ok=self.ok, rows_failed=self.failed, rows_truncated=self.truncated,
            input_tokens=self.input_tokens, output_tokens=self.output_tokens,
            kv_bytes=self.kv_bytes, kv_bytes_full=self.kv_bytes_full,
            kv_bytes_ratio=(self.kv_bytes / self.kv_bytes_full) if self.kv_bytes_full else None,
            errors=[{"error": e, "rows": n} for e, n in self.errors.most_common(10)],
        )

    def result(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """This invocation's figures: counts, rows skipped as already done, timing, per-actor rows, ROUGE."""
        wall = max(time.time() - self.start, 1e-9)
        out: dict[str, Any] = dict(extra or {})
        out.update(self.counts())
        out.update(
            rows_skipped_resume=self.skipped, rows_retried=self.retried, wall_time_s=round(wall, 3),
            rows_per_s=self.rows / wall,
            output_tokens_per_s=self.output_tokens / wall,
            total_tokens_per_s=(self.input_tokens + self.output_tokens) / wall,
            actors=[
                {"actor": k, "rows_ok": v["rows_ok"], "rows_failed": v["rows_failed"],
                 "input_tokens": v["input_tokens"], "output_tokens": v["output_tokens"],
                 "output_tokens_per_s": v["output_tokens"] / wall}
                for k, v in sorted(self.actors.items())
            ],
        )
        if self.first is not None and self.last > self.first[0]:
            # after the first batch arrived: model loading and warm-up excluded
            steady = self.last - self.first[0]
            out.update(first_result_s=round(self.first[0] - self.start, 3),
                       steady_rows_per_s=(self.rows - self.first[1]) / steady,
                       steady_output_tokens_per_s=(self.output_tokens - self.first[2]) / steady)
        out["rouge"] = self.rouge()
        return out


def summary(stats: dict[str, Any]) -> str:
    """The one-screen summary printed at the end of a job."""
    retried = f", {stats['rows_retried']} of them failed rows retried" if stats.get("rows_retried") else ""
    lines = [
        "=" * 72,
        (f"kvstream {stats.get('task', '')}: {stats['rows']} rows ({stats['rows_ok']} ok, {stats['rows_failed']} "
         f"failed, {stats['rows_skipped_resume']} already done, {stats['rows_truncated']} truncated{retried}) in "
         f"{stats['wall_time_s']:.1f} s"),
        f"model {stats.get('model', '?')}   cache {stats.get('cache', '?')}",
        (f"tokens: {stats['input_tokens']} in, {stats['output_tokens']} out; {stats['rows_per_s']:.2f} rows/s, "
         f"{stats['output_tokens_per_s']:.1f} output tok/s, {stats['total_tokens_per_s']:.1f} total tok/s"),
    ]
    if "steady_rows_per_s" in stats:
        lines.append(f"after the first results ({stats['first_result_s']:.1f} s, model load included): "
                     f"{stats['steady_rows_per_s']:.2f} rows/s, {stats['steady_output_tokens_per_s']:.1f} output tok/s")
    if stats["kv_bytes_full"]:
        lines.append(f"KV cache: {stats['kv_bytes'] / 2**20:.2f} MiB held vs {stats['kv_bytes_full'] / 2**20:.2f} MiB "
                     f"full ({stats['kv_bytes_ratio']:.3f}), summed over rows")
    for a in stats["actors"]:
        lines.append(f"  actor {a['actor']}: {a['rows_ok']} ok, {a['rows_failed']} failed, "
                     f"{a['output_tokens']} tokens out ({a['output_tokens_per_s']:.1f}/s)")
    if stats.get("rouge"):
        r = stats["rouge"]
        lines.append(f"ROUGE vs references ({r['rouge_rows']} rows): R-1 {r['rouge1']:.4f}  R-2 {r['rouge2']:.4f}  "
                     f"R-L {r['rougeL']:.4f}")
    for e in stats["errors"][:5]:
        lines.append(f"  error x{e['rows']}: {e['error']}")
    if "output_rows" in stats:
        held = f"output holds {stats['output_rows']} rows, {stats['output_rows_failed']} of them failed"
        if stats["output_rows_failed"]:
            held += " (rerun with output.retry_failed=true to retry them)"
        lines.append(held + "; stats.json: totals over all of them")
    lines += [f"results: {stats.get('results', '?')}", "=" * 72]
    return "\n".join(lines)
