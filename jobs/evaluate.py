"""Fidelity of compressed KV caches to the full cache, over a grid of (policy, budget, quant).

    python jobs/evaluate.py [--config conf/evaluate.yaml] key=value ...

The job lives in `kvstream.pipeline.evaluate` (its docstring lists the outputs; `--help` the keys).
"""

from kvstream.pipeline.evaluate import main

if __name__ == "__main__":
    main()
