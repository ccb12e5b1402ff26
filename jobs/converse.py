"""kvstream converse job: `python jobs/converse.py [--config conf/converse.yaml] [key=value ...]`.

Runs locally (starts a local Ray) or under `ray job submit --working-dir . -- python jobs/converse.py ...`.
Configuration keys: kvstream/pipeline/config.py. Output: <output.path>/results/*.parquet, stats.json, config.yaml.
"""

import sys

from kvstream.pipeline import main

if __name__ == "__main__":
    sys.exit(main("converse", sys.argv[1:]))
