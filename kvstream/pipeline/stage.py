"""The stage shape: a small callable over Arrow batches that declares the columns it needs.

A stage checks its input columns on every batch and raises `ValueError` naming the missing ones (a wiring bug
must not turn into wrong rows). `apply(ds)` adds it to a Ray Dataset lazily (`map_batches`). Rows that already
carry an `error` pass through every stage untouched, so every input row reaches the output exactly once.

Also here: the two small stages that only move rows around, `SkipDone` (resume) and `SortByLength`.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc


class Stage:
    """Base class: subclasses set `name` and `required`, and implement `process(table) -> table`."""

    name: str = "stage"
    required: tuple[str, ...] = ()

    @classmethod
    def check(cls, table: pa.Table) -> None:
        missing = [c for c in cls.required if c not in table.column_names]
        if missing:
            raise ValueError(
                f"stage {cls.name!r}: required column(s) {', '.join(missing)} missing from its input "
                f"(it has: {', '.join(table.column_names)})"
            )

    def __call__(self, table: pa.Table) -> pa.Table:
        self.check(table)
        return self.process(table)

    def process(self, table: pa.Table) -> pa.Table:  # pragma: no cover - abstract
        raise NotImplementedError

    def map_kwargs(self) -> dict[str, Any]:
        return {}

    def apply(self, ds):
        return ds.map_batches(self, batch_format="pyarrow", **self.map_kwargs())


def replace_column(table: pa.Table, name: str, values: Any, type_: pa.DataType) -> pa.Table:
    arr = pa.array(values, type=type_)
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, arr)
    return table.append_column(pa.field(name, type_), arr)


class SkipDone(Stage):
    """Drops rows whose `id` is already in the output (resume). `done` is an ObjectRef of a list of ids."""

    name = "skip_done"
    required = ("id",)

    def __init__(self, done_ref: Any):
        self.done_ref = done_ref
        self._done: pa.Array | None = None

    def process(self, table: pa.Table) -> pa.Table:
        if self._done is None:
            import ray

            self._done = pa.array(ray.get(self.done_ref), type=pa.string())
        return table.filter(pc.invert(pc.is_in(table["id"], value_set=self._done)))


class SortByLength(Stage):
    """Sorts windows of `window` rows by `num_input_tokens` so each generation batch holds similar lengths
    (streaming: a window, not a global sort)."""

    name = "sort_by_length"
    required = ("num_input_tokens",)

    def __init__(self, window: int):
        self.window = window

    def process(self, table: pa.Table) -> pa.Table:
        return table.sort_by([("num_input_tokens", "ascending")])

    def map_kwargs(self) -> dict[str, Any]:
        return {"batch_size": self.window}
