"""Write the generated demo datasets as JSONL: `python jobs/make_demo_data.py [OUT_DIR] [--rows N]`.

The jobs make them on their own with `data.path=demo:summarize` / `demo:converse`; this script is for looking
at them or using them as a template for real inputs.
"""

import argparse
from pathlib import Path

from kvstream.pipeline.demo import converse_rows, summarize_rows, to_jsonl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out_dir", nargs="?", default="outputs/demo_data")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("summarize", summarize_rows(a.rows, a.seed)), ("converse", converse_rows(a.rows, a.seed))):
        (out / f"{name}.jsonl").write_bytes(to_jsonl(rows))
        print(f"wrote {len(rows)} rows to {out / f'{name}.jsonl'}")


if __name__ == "__main__":
    main()
