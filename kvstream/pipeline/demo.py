"""The demo dataset, generated in code (seeded): synthetic news-like documents with reference summaries, and
short synthetic conversations with reference replies. No network, no files needed.

`data.path=demo:summarize` (or `demo:converse`) writes it as JSONL under `<output.path>/_demo_input/` on first
use and reads it from there like any other input; `jobs/make_demo_data.py` writes it anywhere.
"""

from __future__ import annotations

import json
import random

from kvstream.pipeline.fs import filesystem, join, write_bytes_atomic

KINDS = ("summarize", "converse")
TOWNS = ["Alderby", "Brookmere", "Caldwick", "Dunmore", "Eastwold", "Fernhill", "Glenrock", "Harwick", "Ivybridge",
         "Juniper Falls", "Kingsmoor", "Larkspur"]
EVENTS = ["harvest festival", "river cleanup", "chess tournament", "library reopening", "bicycle race",
          "science fair", "winter market", "jazz night", "charity run", "flower show"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
FILLER = [
    "Volunteers arrived early to set up tents and tables along the main street.",
    "Local shops stayed open late and reported a busy evening.",
    "The weather held, with a light breeze and clear skies for most of the day.",
    "Several families said they had travelled from neighbouring villages to attend.",
    "The mayor thanked the organisers in a short speech near the town hall.",
    "Children took part in games and a painting corner run by the school.",
    "Organisers said parking had been the biggest challenge of the day.",
    "A brass band played in the square during the afternoon.",
    "Food stalls offered soup, bread and pies made by residents.",
    "Police reported no incidents and praised the crowd for its good spirit.",
]
QUESTIONS = ["What time does the {e} start?", "Is the {e} in {t} free to attend?",
             "Can I bring my dog to the {e}?", "Where should I park for the {e} in {t}?"]
ANSWERS = ["It starts at nine in the morning.", "Yes, entry is free for everyone.",
           "Dogs on a lead are welcome.", "Use the car park behind the town hall."]


def summarize_rows(n: int = 32, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        town, event, day = rng.choice(TOWNS), rng.choice(EVENTS), rng.choice(DAYS)
        people, money = rng.randrange(150, 5000, 10), rng.randrange(500, 20000, 100)
        lead = f"The town of {town} held its {event} on {day}, drawing about {people} visitors."
        close = f"Organisers said the {event} raised {money} pounds for local causes and will return next year."
        body = rng.sample(FILLER, k=rng.randint(2, len(FILLER)))
        rows.append({
            "doc_id": f"demo-{i:04d}",
            "text": " ".join([lead] + body + [close]),
            "summary": f"{town} held its {event} on {day} with about {people} visitors, raising {money} pounds.",
        })
    return rows


def converse_rows(n: int = 24, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        town, event = rng.choice(TOWNS), rng.choice(EVENTS)
        q1, q2 = rng.sample(range(len(QUESTIONS)), k=2)
        messages = [
            {"role": "user", "content": QUESTIONS[q1].format(e=event, t=town)},
            {"role": "assistant", "content": ANSWERS[q1]},
            {"role": "user", "content": QUESTIONS[q2].format(e=event, t=town)},
        ]
        rows.append({"conv_id": f"conv-{i:04d}", "messages": messages, "reply": ANSWERS[q2]})
    return rows


def to_jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def materialize(kind: str, output: str, s3: dict | None = None, rows: int | None = None) -> str:
    """Write the demo dataset `kind` (`rows` rows) under `<output>/_demo_input/` (once) and return its path."""
    if kind not in KINDS:
        raise ValueError(f"data.path=demo:{kind}: unknown demo dataset; valid: {', '.join('demo:' + k for k in KINDS)}")
    n = rows or 32
    url = join(output, "_demo_input", f"{kind}-{n}.jsonl")
    fs, p = filesystem(url, s3)
    if not fs.exists(p):
        rows = summarize_rows(n) if kind == "summarize" else converse_rows(n)
        write_bytes_atomic(url, to_jsonl(rows), s3)
    return url


DEMO_COLUMNS = {
    "summarize": {"id_column": "doc_id", "text_column": "text", "reference_column": "summary"},
    "converse": {"id_column": "conv_id", "messages_column": "messages", "reference_column": "reply"},
}
