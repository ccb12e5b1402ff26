"""The benchmarks' CSV + Markdown writer (kvstream/bench_tables.py), used by jobs/bench_engine.py and bench_serve.py."""

import pandas as pd

from kvstream.bench_tables import markdown, write_tables


def test_write_tables_writes_the_head_the_csv_and_the_markdown(tmp_path):
    rows = [{"config": "hf-static", "tokens_per_s": 602.04, "batch": 20}, {"config": "full", "tokens_per_s": 479.4,
                                                                            "batch": 26}]
    text = write_tables(str(tmp_path / "sub" / "t.csv"), "# gpu=x", rows)
    csv_text = (tmp_path / "sub" / "t.csv").read_text()
    assert csv_text.splitlines()[:2] == ["# gpu=x", "config,tokens_per_s,batch"]
    assert pd.read_csv(tmp_path / "sub" / "t.csv", skiprows=1).to_dict("records") == rows
    assert (tmp_path / "sub" / "t.md").read_text() == text + "\n"
    assert text.splitlines() == ["# gpu=x", "", "| config | tokens_per_s | batch |", "| --- | --- | --- |",
                                 "| hf-static | 602 | 20 |", "| full | 479 | 26 |"]
    assert markdown(rows) == "\n".join(text.splitlines()[2:])
