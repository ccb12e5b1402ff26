"""The Serve config (kvstream.pipeline.serve_config) and jobs/serve.py's CLI, without starting Ray: the same keys
from YAML, dotted `serve run` strings and nested dicts, and every bad key refused with its name."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvstream.pipeline.config import ConfigError
from kvstream.pipeline.serve_config import deployment_options, from_builder_args, load_serve_config
from tests.pipeline.helpers import ROOT


def test_yaml_dotted_strings_and_nested_sections_merge_into_deployment_options():
    cfg = from_builder_args({"config": str(ROOT / "conf/serve.yaml"), "serve.num_slots": "3",
                             "serve.max_queue": "10", "cache": {"budget": 0.25}})
    assert cfg.serve.num_slots == 3 and cfg.cache.budget == 0.25 and cfg.cache.quant == "kivi2"
    opts = deployment_options(cfg)
    assert opts["max_ongoing_requests"] == 20 and opts["num_replicas"] == 1
    assert opts["ray_actor_options"] == {"num_gpus": 0.0, "num_cpus": 1.0}
    auto = load_serve_config(overrides=["serve.autoscaling_config.min_replicas=1",
                                        "serve.autoscaling_config.max_replicas=4", "serve.max_queued_requests=8"])
    opts = deployment_options(auto)
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4} and "num_replicas" not in opts
    assert opts["max_queued_requests"] == 8


@pytest.mark.parametrize("args, key", [
    ({"serve.bogus": "1"}, "serve.bogus"),
    ({"server": {}}, "server"),
    ({"serve.num_slots": "0"}, "serve.num_slots"),
    ({"serve.num_slots": "auto"}, "serve.num_slots"),  # CPU mode: auto needs a GPU
    ({"serve.max_queue": "0"}, "serve.max_queue"),
    ({"serve.prefill_tokens": "0"}, "serve.prefill_tokens"),
    ({"serve.gpu_memory_utilization": "0"}, "serve.gpu_memory_utilization"),
    ({"serve.timeout_s": "-1"}, "serve.timeout_s"),
    ({"serve.port": "70000"}, "serve.port"),
    ({"serve.num_replicas": "2", "serve.autoscaling_config.max_replicas": "3"}, "serve.num_replicas"),
    ({"cache.policy": "lru"}, "policy"),
    ({"model.path": ""}, "model.path"),
    ({"config": "/nonexistent/serve.yaml"}, "/nonexistent/serve.yaml"),
])
def test_bad_keys_are_refused_by_name(args, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_builder_args(args)


def test_jobs_serve_check_prints_the_resolved_config_and_bad_keys_exit_2(capsys):
    from kvstream.pipeline.serve_cli import main

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "jobs/serve.py"), "--config", str(ROOT / "conf/serve.yaml")]
    ok = subprocess.run(cmd + ["--check", "serve.port=8123"], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0 and "port: 8123" in ok.stdout and "policy: keyformer" in ok.stdout, ok.stderr
    assert main(["--config", str(ROOT / "conf/serve.yaml"), "serve.nope=1"]) == 2  # exits before starting Ray
    assert "serve.nope" in capsys.readouterr().err
