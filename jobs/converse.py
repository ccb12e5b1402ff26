"""kvstream converse job: `python jobs/converse.py [--config conf/converse.yaml] [key=value ...]`.

Runs locally (starts a local Ray) or under `ray job submit --working-dir . -- python jobs/converse.py ...`.
Configuration keys: pipeline/config.py. Output: <output.path>/results/*.parquet, stats.json, config.yaml.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from pipeline import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("converse", sys.argv[1:]))
