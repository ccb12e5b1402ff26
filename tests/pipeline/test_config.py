"""Config layering (defaults -> YAML -> dotlist) and validation errors that name the key."""

import pytest

from kvstream.kvcache import CacheConfig
from kvstream.pipeline.config import ConfigError, cache_config, load_config
from kvstream.pipeline.job import check_fits
from tests.pipeline.helpers import ROOT


def test_layering_yaml_then_cli(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("generate:\n  max_new_tokens: 17\n  truncation: tail\ncache:\n  policy: window\n  budget: 0.5\n")
    cfg = load_config("summarize", str(y), ["generate.max_new_tokens=9", "runtime.num_actors=3"])
    assert cfg.generate.max_new_tokens == 9  # CLI wins over YAML
    assert cfg.generate.truncation == "tail"  # YAML wins over defaults
    assert cfg.runtime.num_actors == 3
    assert cfg.runtime.batch_size == 8  # default kept
    cc = cache_config(cfg)
    assert isinstance(cc, CacheConfig) and cc.policy == "window" and cc.budget == 0.5
    assert cc.max_new_tokens == 9  # follows generate.max_new_tokens


def test_converse_defaults_differ():
    cfg = load_config("converse")
    assert cfg.data.path == "demo:converse" and cfg.output.path == "outputs/converse"


@pytest.mark.parametrize("override, key", [
    (["generate.max_new_tokenz=3"], "max_new_tokenz"),
    (["runtime.batch_size=abc"], "runtime.batch_size"),
    (["generate.truncation=sideways"], "generate.truncation"),
    (["runtime.num_actors=0"], "runtime.num_actors"),
    (["generate.top_p=0"], "generate.top_p"),
    (["data.format=xml"], "data.format"),
    (["prompt.template=no placeholder"], "prompt.template"),
    (["cache.policy=lru"], "policy"),
    (["cache.colour=red"], "colour"),
    (["engine.max_num_seqs=0"], "engine.max_num_seqs"),
    (["engine.gpu_memory_utilization=1.5"], "engine.gpu_memory_utilization"),
    (["engine.prefill_tokens=-3"], "engine.prefill_tokens"),
    (["nonsense"], "nonsense"),
])
def test_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config("summarize", None, override)
    assert key in str(e.value)


def test_config_of_another_task_is_refused():
    with pytest.raises(ConfigError, match="jobs/summarize.py"):
        load_config("converse", None, ["task=summarize"])


def test_missing_yaml_file_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config("summarize", str(tmp_path / "nope.yaml"))


def test_every_cache_field_settable():
    over = [f"cache.{k}={v}" for k, v in CacheConfig().to_dict().items() if v is not None and not isinstance(v, dict)]
    cfg = load_config("summarize", None, over + ["cache.policy=keyformer", "cache.budget=0.4", "cache.quant=kivi2"])
    cc = cache_config(cfg)
    assert (cc.policy, cc.budget, cc.quant) == ("keyformer", 0.4, "kivi2")


def test_negative_budget_says_fractions_are_accepted_too():
    with pytest.raises(ConfigError) as e:
        load_config("summarize", None, ["cache.policy=h2o", "cache.budget=-1"])
    assert "cache.budget" in str(e.value) and "(0, 1]" in str(e.value) and ">= 1" in str(e.value)


def test_demo_yaml_own_example_fits_two_cores():
    cfg = load_config("summarize", str(ROOT / "conf/demo.yaml"), ["cache.policy=h2o", "runtime.num_actors=2"])
    check_fits(cfg, {"CPU": 2.0})  # conf/demo.yaml's header example on the 2-core machine the README targets


def test_log_level_brings_ray_logs_back():
    import logging

    from kvstream.pipeline.logs import NOTICES, quiet

    with pytest.raises(ConfigError, match="runtime.log_level"):
        load_config("summarize", None, ["runtime.log_level=loud"])
    try:
        quiet("warning")
        assert logging.getLogger("ray.data").level == logging.WARNING
        assert logging.getLogger(NOTICES[0]).level == logging.ERROR
        quiet("info")
        assert logging.getLogger("ray.data").level == logging.getLogger(NOTICES[0]).level == logging.INFO
    finally:
        quiet("warning")


def test_help_lists_every_key_and_the_exit_codes(capsys):
    from omegaconf import OmegaConf

    from kvstream.pipeline import evaluate, main

    with pytest.raises(SystemExit) as e:
        main("summarize", ["--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0
    for key in ("data.on_duplicate_id = 'error'", "output.retry_failed = False", "runtime.log_level = 'warning'",
                "cache.group_size = 32", "exit codes:", "130 / 143"):
        assert key in text, key
    with pytest.raises(SystemExit):
        evaluate.load_config(["--help"])
    assert "eval.policies = " in capsys.readouterr().out
    # the README's evaluate command writes into the ignored outputs/, not over the tracked results/fidelity/
    assert OmegaConf.load(ROOT / "conf/evaluate.yaml").output.path == "outputs/fidelity"


def test_batch_size_auto_follows_the_mode():
    """One engine call per generation batch: auto gives a GPU actor a batch that can fill its slot pool."""
    assert load_config("summarize").runtime.batch_size == 8
    assert load_config("summarize", None, ["runtime.num_gpus_per_actor=1"]).runtime.batch_size == 256
    assert load_config("summarize", None, ["runtime.num_gpus_per_actor=1", "runtime.batch_size=64"]).runtime.batch_size == 64


def test_files_per_wave_must_not_be_negative():
    with pytest.raises(ConfigError, match="runtime.files_per_wave=-1: must be >= 0"):
        load_config("summarize", None, ["runtime.files_per_wave=-1"])
    assert load_config("summarize", None, ["runtime.files_per_wave=8"]).runtime.files_per_wave == 8
