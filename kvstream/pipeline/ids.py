"""Repeated ids in the input, found before the job starts and resolved by `data.on_duplicate_id`.

Resume and failed-row retry key rows by id, so two input rows with one id would be written twice and the second
skipped on resume as already done. With `data.id_column` set, the driver reads the ids once, in input order
(files sorted, rows in file order; only the id column of Parquet files), before Ray starts:
  - `error` (default): stop with one message giving the count and the first few repeated ids;
  - `keep_first`: the first row with an id is kept, later ones are dropped (not read into the job);
  - `suffix`: later rows get `<id>#2`, `<id>#3`, ... (skipping ids the input already has).
The same input gives the same plan on every run, so resume and retry find the same ids. Without
`data.id_column` the ids are `<file>:<row index>`: unique, nothing to read.
"""

from __future__ import annotations

import logging

from kvstream.pipeline.fs import InputError
from kvstream.pipeline.reader import iter_records, rel_name, row_id

log = logging.getLogger("kvstream")
MODES = ("error", "keep_first", "suffix")
SHOWN = 5

Plan = dict[str, dict[int, "str | None"]]  # rel -> {row index: new id, or None to drop the row}


def duplicate_plan(files: list[str], base: str, spec: dict, s3: dict | None, mode: str,
                   limit: int | None = None) -> Plan:
    """Read the ids of `files` (up to the `limit` rows the job keeps) and return the plan for repeated ones."""
    if not spec.get("id_column"):
        return {}
    seen: set[str] = set()
    repeats: list[tuple[str, int, str]] = []  # (rel, row index, id) of every row whose id came before
    kept = 0
    for url in files:
        rel = rel_name(url, base)
        for i, rec in iter_records(url, spec.get("format"), s3, columns=[spec["id_column"]]):
            if limit is not None and kept >= limit:
                break
            ident = row_id(i, rec, rel, spec)
            if ident in seen:
                repeats.append((rel, i, ident))
                kept += mode != "keep_first"
            else:
                seen.add(ident)
                kept += 1
        if limit is not None and kept >= limit:
            break
    if not repeats:
        return {}
    distinct = list(dict.fromkeys(r[2] for r in repeats))
    shown = ", ".join(repr(x) for x in distinct[:SHOWN]) + (", ..." if len(distinct) > SHOWN else "")
    if mode == "error":
        raise InputError(
            f"data.id_column={spec['id_column']!r}: {len(repeats)} rows repeat the id of an earlier row "
            f"({len(distinct)} distinct ids: {shown}); make the ids unique, or set data.on_duplicate_id=keep_first "
            f"(drop the repeats) or data.on_duplicate_id=suffix (rename them <id>#2, <id>#3, ...)")
    plan: Plan = {}
    for rel, i, ident in repeats:
        new = None
        if mode == "suffix":
            k = 2
            while f"{ident}#{k}" in seen:
                k += 1
            new = f"{ident}#{k}"
            seen.add(new)
        plan.setdefault(rel, {})[i] = new
    what = "dropped" if mode == "keep_first" else "renamed <id>#N"
    log.warning("data.on_duplicate_id=%s: %d rows repeat an earlier id (%s): %s", mode, len(repeats), shown, what)
    return plan
