"""Configuration of the Serve deployment: typed defaults -> `--config` YAML -> `key=value` overrides, validated.

The same keys reach the deployment three ways: `python jobs/serve.py [--config conf/serve.yaml] key=value ...`,
`serve run kvstream.pipeline.serve:build_app [config=conf/serve.yaml] key=value ...` (Ray Serve hands the builder
its arguments as a dict of strings) and `build_app({...})` from Python (nested dicts, dotted keys or both).
Sections: `model.*` (the jobs' ModelConf), `cache.*` (every kvcache.CacheConfig field, checked by
CacheConfig.from_dict), `serve.*` (ServeConf below). Errors name the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kvstream.pipeline.config import ConfigError, ModelConf, merge_layers


@dataclass
class ServeConf:
    model_name: Optional[str] = None  # the `model` clients send and /v1/models lists; default: model.path
    max_new_tokens: int = 256  # the largest max_tokens a request may ask
    max_prompt_tokens: int = 2048  # the longest prompt (after the chat template) a slot holds
    num_slots: Any = 8  # sequences decoded together per replica, or auto (from GPU memory; GPU only)
    # chunked prefill: prompt tokens admitted per step between decode steps. Admissions are capped at this many
    # prompt tokens a step: at 512, a 4096-token prompt took 8 steps, so a replica could start one long request every
    # 8 decode steps whatever its free slots
    prefill_tokens: Optional[int] = 2048
    gpu_memory_utilization: float = 0.9  # num_slots auto: the share of the GPU's memory the slot pool may fill
    max_queue: int = 64  # requests in flight per replica (running + waiting); over it: 429 + Retry-After
    timeout_s: float = 300.0  # per request; over it: 504 (or an error event in a stream) and the sequence cancelled
    num_gpus: float = 0.0  # per replica (1 on a GPU machine); 0: CPU mode
    num_cpus: float = 1.0  # per replica
    num_replicas: Optional[int] = None  # default 1; leave unset with autoscaling_config
    max_ongoing_requests: Optional[int] = None  # Serve's per-replica cap; default 2 x max_queue (so 429s are quick)
    max_queued_requests: Optional[int] = None  # Serve's queue before the replicas (over it, Serve's 503); -1: no cap
    autoscaling_config: Optional[Any] = None  # Serve's autoscaling_config dict (min_replicas, max_replicas, ...)
    host: str = "127.0.0.1"  # jobs/serve.py's HTTP address (`serve run` takes its own --address / config)
    port: int = 8000
    route_prefix: str = "/"
    app_name: str = "kvstream"


@dataclass
class ServeJobConf:
    model: ModelConf = field(default_factory=ModelConf)
    cache: Any = field(default_factory=lambda: {"policy": "full", "quant": "none"})
    serve: ServeConf = field(default_factory=ServeConf)


def load_serve_config(config_path: str | None = None, overrides: list[str] | None = None,
                      tree: dict | None = None) -> DictConfig:
    """Defaults -> YAML file -> nested `tree` -> dotlist overrides; returns a validated, resolved DictConfig."""
    cfg = OmegaConf.structured(ServeJobConf)
    try:
        cfg = merge_layers(cfg, config_path, overrides, "serve.num_slots=16", tree)
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        raise ConfigError(f"config key {getattr(e, 'full_key', None)!r}: {msg}. Sections: model, cache, serve "
                          "(kvstream/pipeline/serve_config.py)") from None
    validate_serve(cfg)
    return cfg


def from_builder_args(args: dict) -> DictConfig:
    """The config of `build_app`'s argument: nested sections, dotted `key: value` strings (`serve run`'s
    arguments) and an optional `config` (a YAML path), in that order of precedence: dotted keys win."""
    if not isinstance(args, dict):
        raise ConfigError(f"build_app takes a dict of config keys, not {type(args).__name__}")
    args = dict(args)
    path = args.pop("config", None)
    dotted = [f"{k}={v}" for k, v in args.items() if "." in str(k)]
    tree = {k: v for k, v in args.items() if "." not in str(k)}
    unknown = sorted(set(tree) - {"model", "cache", "serve"})
    if unknown:
        raise ConfigError(f"build_app: unknown keys {unknown}; valid: model, cache, serve (sections), dotted keys "
                          "such as serve.num_slots, and config (a YAML path)")
    return load_serve_config(path, dotted, tree)


def cache_dict(cfg: DictConfig) -> dict:
    """The `cache:` section as CacheConfig fields (max_new_tokens follows serve.max_new_tokens), checked."""
    from kvstream.kvcache import CacheConfig

    if not isinstance(cfg.cache, DictConfig):
        raise ConfigError("cache must be a mapping of kvcache.CacheConfig fields (policy, budget, quant, ...)")
    d = dict(OmegaConf.to_container(cfg.cache, resolve=True), max_new_tokens=int(cfg.serve.max_new_tokens))
    try:
        return CacheConfig.from_dict(d).to_dict()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"cache: {e}") from None


def validate_serve(cfg: DictConfig) -> None:
    """Check values the types cannot; raise ConfigError naming the key."""

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)!r}: {msg}")

    need(bool(cfg.model.path), "model.path", "set a hub id, a local model dir, a llama2.c .bin or demo:tiny-llama")
    cache_dict(cfg)
    s = cfg.serve
    need(s.max_new_tokens >= 1, "serve.max_new_tokens", "must be >= 1")
    need(s.max_prompt_tokens >= 1, "serve.max_prompt_tokens", "must be >= 1")
    need(s.num_slots == "auto" or (isinstance(s.num_slots, int) and not isinstance(s.num_slots, bool)
                                   and s.num_slots >= 1), "serve.num_slots", "must be an int >= 1 or auto")
    need(s.num_slots != "auto" or s.num_gpus > 0, "serve.num_slots",
         "auto sizes the pool from GPU memory: set serve.num_gpus > 0, or a number of slots in CPU mode")
    from kvstream.kvcache.config import setting_problem

    for key in ("prefill_tokens", "gpu_memory_utilization"):  # checked as the Engine checks them
        problem = setting_problem(key, s[key])
        need(problem is None, f"serve.{key}", problem or "")
    need(s.max_queue >= 1, "serve.max_queue", "must be >= 1")
    need(s.timeout_s > 0, "serve.timeout_s", "must be > 0 seconds")
    need(s.num_gpus >= 0, "serve.num_gpus", "must be >= 0 (0 = CPU mode)")
    need(s.num_cpus >= 0, "serve.num_cpus", "must be >= 0")
    need(s.num_replicas is None or s.num_replicas >= 1, "serve.num_replicas", "must be >= 1")
    need(s.num_replicas is None or s.autoscaling_config is None, "serve.num_replicas",
         "set either serve.num_replicas or serve.autoscaling_config, not both")
    need(s.autoscaling_config is None or isinstance(s.autoscaling_config, DictConfig), "serve.autoscaling_config",
         "must be a mapping (min_replicas, max_replicas, target_ongoing_requests, ...)")
    need(s.max_ongoing_requests is None or s.max_ongoing_requests >= 1, "serve.max_ongoing_requests", "must be >= 1")
    need(s.max_queued_requests is None or s.max_queued_requests == -1 or s.max_queued_requests >= 1,
         "serve.max_queued_requests", "must be >= 1, or -1 for no cap")
    need(1 <= s.port <= 65535, "serve.port", "must be a TCP port in [1, 65535]")
    need(str(s.route_prefix).startswith("/"), "serve.route_prefix", "must start with /")


def deployment_options(cfg: DictConfig) -> dict:
    """Ray Serve's `.options(...)` of the deployment from the serve section."""
    s = OmegaConf.to_container(cfg.serve, resolve=True)
    opts: dict[str, Any] = {"ray_actor_options": {"num_gpus": s["num_gpus"], "num_cpus": s["num_cpus"]},
                            "max_ongoing_requests": s["max_ongoing_requests"] or 2 * s["max_queue"]}
    if s["autoscaling_config"] is not None:
        opts["autoscaling_config"] = s["autoscaling_config"]
    else:
        opts["num_replicas"] = s["num_replicas"] or 1
    if s["max_queued_requests"] is not None:
        opts["max_queued_requests"] = s["max_queued_requests"]
    return opts
