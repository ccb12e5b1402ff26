"""What a job prints: kvstream's own lines always; Ray's, Ray Data's and ROUGE's chatter at `runtime.log_level`.

Default `warning`: kvstream's progress line, summary and warnings, Ray Data's progress bars in a terminal, and
warnings/errors of Python loggers. Quieted below that: Ray's token-auth notice and start-up INFO lines, Ray Data's
plan lines, its operator-name notice and its 10-line progress block every 10 s when stdout is not a terminal, and
rouge_score's "Using default tokenizer". `info` or `debug` brings them all back.

Not quieted: the driver's one `core_worker.cc` error line about actor constructor arguments in the object store
(Ray's C++ log; RAY_BACKEND_LOG_LEVEL would hide it but prints its own line in every Ray process), and warnings
that Ray forwards from the workers' stderr.
"""

from __future__ import annotations

import logging

QUIETED = ("ray", "ray.data", "absl")
NOTICES = ("ray._private.authentication.authentication_token_setup",  # a WARNING on every normal local start
           "ray.data._internal.progress.utils")  # "Truncating long operator name" on every run


def configure_driver(level: str) -> None:
    """Before Ray starts: Python logging on the driver."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("kvstream").setLevel(logging.INFO)
    quiet(level)


def quiet(level: str) -> None:
    """Set Ray's, Ray Data's and absl's loggers to `level` (again after `import ray.data`, which configures its
    own)."""
    for name in QUIETED:
        logging.getLogger(name).setLevel(python_level(level))
    for name in NOTICES:
        logging.getLogger(name).setLevel(logging.ERROR if level in ("error", "warning") else python_level(level))


def python_level(level: str) -> int:
    return getattr(logging, level.upper())
