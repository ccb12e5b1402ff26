"""Job configuration: typed defaults -> `--config` YAML -> CLI `key=value` dotlist, validated on load.

The schema below is the reference of every key (README "Configuration"). `cache.*` is every `CacheConfig`
field and is validated by `CacheConfig.from_dict`. Errors name the bad key and say what to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

TASKS = ("summarize", "converse")
TRUNCATIONS = ("head", "tail", "middle", "reject")
FORMATS = ("parquet", "jsonl", "json", "csv")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DUPLICATE_MODES = ("error", "keep_first", "suffix")  # kvstream/pipeline/ids.py
LOG_LEVELS = ("error", "warning", "info", "debug")  # kvstream/pipeline/logs.py


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key."""


@dataclass
class ModelConf:
    path: str = "demo:tiny-llama"  # hub id | local HF dir | llama2.c *.bin | demo:tiny-llama
    tokenizer: Optional[str] = None  # default: from model.path (llama2.c: the tokenizer .bin)
    dtype: str = "auto"


@dataclass
class DataConf:
    path: str = "demo:summarize"  # file, directory or glob; local or s3://; demo:summarize | demo:converse
    format: Optional[str] = None  # default: from the extension
    text_column: str = "text"
    id_column: Optional[str] = None  # default: "<file>:<row index>"
    on_duplicate_id: str = "error"  # error | keep_first | suffix (<id>#2, ...): rows repeating an id_column value
    reference_column: Optional[str] = None
    messages_column: str = "messages"
    passthrough_columns: list = field(default_factory=list)
    limit: Optional[int] = None
    demo_rows: int = 32  # rows of the generated dataset when data.path is demo:summarize / demo:converse


@dataclass
class PromptConf:
    # summarize: must contain {text}
    template: str = "Summarize the following document.\n\nDocument: {text}\n\nSummary:"
    # converse: "auto" uses the tokenizer's chat template where it has one, else the plain turn template
    chat_template: str = "auto"  # auto | plain
    system: Optional[str] = None
    turn_template: str = "{role}: {content}\n"
    generation_prefix: str = "assistant:"


@dataclass
class GenerateConf:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list = field(default_factory=list)
    seed: int = 0
    max_input_tokens: Optional[int] = None  # default: model context - max_new_tokens
    truncation: str = "middle"  # head (keep the start) | tail (keep the end) | middle (drop the middle) | reject


CPU_BATCH, GPU_BATCH = 8, 256  # runtime.batch_size=auto: a GPU engine's slot pool holds ~30-500 long sequences


@dataclass
class RuntimeConf:
    address: Optional[str] = None  # Ray address; default: RAY_ADDRESS, else a new local Ray
    num_actors: Any = "auto"  # an int >= 1, or auto: one actor per GPU the cluster has (1 in CPU mode)
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 1.0
    batch_size: Any = "auto"  # rows per generation batch (one engine call): auto = 8 in CPU mode, 256 with GPUs
    sort_window: int = 0  # rows sorted by length together before batching; 0 = 16 x batch_size
    progress_every_s: float = 10.0
    files_per_wave: int = 0  # 0: one Ray Data execution; N: waves of N input files (driver memory bounded per wave)
    log_level: str = "warning"  # error | warning | info | debug: Ray's, Ray Data's and ROUGE's log lines (logs.py)


@dataclass
class EngineConf:  # the fast path's settings (kvstream.kvcache.config.engine_settings); rows do not depend on them
    gpu_memory_utilization: float = 0.9  # the share of the GPU's memory the slot pool may fill beside the weights
    max_num_seqs: Optional[int] = None  # at most this many sequences decoded together (null: as many as fit)
    prefill_tokens: Optional[int] = None  # chunked prefill: prompt tokens admitted per decode step (null: whole)


@dataclass
class S3Conf:
    endpoint_url: Optional[str] = None  # default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL
    region: Optional[str] = None  # default: AWS_REGION / AWS_DEFAULT_REGION
    key: Optional[str] = None  # default: AWS_ACCESS_KEY_ID (and the rest of botocore's chain)
    secret: Optional[str] = None
    anon: bool = False


@dataclass
class OutputConf:
    path: str = "outputs/summarize"
    rows_per_file: int = 1000
    resume: bool = True  # skip rows whose id is already in <path>/results
    overwrite: bool = False  # delete <path>/results first
    retry_failed: bool = False  # rerun the rows whose error is set; their new rows replace the old ones


@dataclass
class JobConf:
    task: str = "summarize"
    model: ModelConf = field(default_factory=ModelConf)
    cache: Any = field(default_factory=lambda: {"policy": "full", "quant": "none"})
    data: DataConf = field(default_factory=DataConf)
    prompt: PromptConf = field(default_factory=PromptConf)
    generate: GenerateConf = field(default_factory=GenerateConf)
    runtime: RuntimeConf = field(default_factory=RuntimeConf)
    engine: EngineConf = field(default_factory=EngineConf)
    s3: S3Conf = field(default_factory=S3Conf)
    output: OutputConf = field(default_factory=OutputConf)


def load_config(task: str, config_path: str | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Defaults (task-specific) -> YAML file -> dotlist overrides; returns a validated, resolved DictConfig."""
    if task not in TASKS:
        raise ConfigError(f"task={task!r} is not one of {', '.join(TASKS)}")
    cfg = OmegaConf.structured(JobConf(task=task))
    if task == "converse":
        cfg.data.path = "demo:converse"
        cfg.output.path = "outputs/converse"
    try:
        cfg = merge_layers(cfg, config_path, overrides, "generate.max_new_tokens=64")
    except OmegaConfBaseException as e:
        raise ConfigError(_omegaconf_message(e)) from None
    if cfg.task != task:
        raise ConfigError(f"task={cfg.task!r} (from --config/overrides) but this is the {task} job: "
                          f"run jobs/{cfg.task}.py, or set task: {task}")
    if cfg.runtime.batch_size == "auto":  # resolved here, so config.yaml records the number the run used
        cfg.runtime.batch_size = GPU_BATCH if cfg.runtime.num_gpus_per_actor > 0 else CPU_BATCH
    validate(cfg)
    return cfg


def merge_layers(cfg: DictConfig, config_path: str | None, overrides: list[str] | None, example: str,
                 tree: dict | None = None) -> DictConfig:
    """cfg <- the YAML file <- a nested `tree` <- `key=value` overrides (`example`: one for the error message);
    OmegaConf's own errors (unknown keys, wrong types) go to the caller, which names its sections."""
    if config_path:
        cfg = OmegaConf.merge(cfg, _load_yaml(config_path))
    if tree:
        cfg = OmegaConf.merge(cfg, tree)
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not key=value (e.g. {example})")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return cfg


def _load_yaml(path: str) -> DictConfig:
    try:
        node = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except Exception as e:  # yaml syntax
        raise ConfigError(f"--config {path}: cannot parse YAML: {e}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"--config {path}: the top level must be a mapping of sections (model:, data:, ...)")
    return node


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0]
    if "not in struct" in str(e) or "Key '" in msg:
        return f"unknown config key {key!r}: {msg}. Valid sections: {', '.join(JobConf.__dataclass_fields__)}"
    return f"config key {key!r}: {msg}"


def cache_config(cfg: DictConfig):
    """The `cache:` section as a kvcache.CacheConfig (max_new_tokens follows generate.max_new_tokens unless set)."""
    from kvstream.kvcache import CacheConfig

    d = OmegaConf.to_container(cfg.cache, resolve=True) if isinstance(cfg.cache, DictConfig) else dict(cfg.cache)
    if d.get("max_new_tokens") is None and "max_new_tokens" in CacheConfig.field_names():
        d["max_new_tokens"] = int(cfg.generate.max_new_tokens)
    try:
        return CacheConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        hint = ""
        if "budget" in str(e) and "fraction" not in str(e):
            hint = " (cache.budget takes a fraction of each prompt in (0, 1], e.g. 0.5, or an int token count >= 1)"
        raise ConfigError(f"cache: {e}{hint}") from None


def validate(cfg: DictConfig) -> None:
    """Check values the types cannot; raise ConfigError naming the key."""

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)!r}: {msg}")

    need(cfg.task in TASKS, "task", f"must be one of {', '.join(TASKS)}")
    if not isinstance(cfg.cache, DictConfig):
        raise ConfigError("cache must be a mapping of kvcache.CacheConfig fields (policy, budget, quant, ...)")
    cache_config(cfg)
    need(bool(cfg.model.path), "model.path", "set a hub id, a local model dir, a llama2.c .bin or demo:tiny-llama")
    need(cfg.model.dtype in DTYPES, "model.dtype", f"must be one of {', '.join(DTYPES)}")
    need(bool(cfg.data.path), "data.path", "set a file, directory or glob (local or s3://)")
    need(cfg.data.format is None or cfg.data.format in FORMATS, "data.format", f"must be one of {', '.join(FORMATS)}")
    need(cfg.data.on_duplicate_id in DUPLICATE_MODES, "data.on_duplicate_id",
         f"must be one of {', '.join(DUPLICATE_MODES)}")
    need(cfg.data.limit is None or cfg.data.limit >= 1, "data.limit", "must be >= 1 (or null for all rows)")
    need(cfg.data.demo_rows >= 1, "data.demo_rows", "must be >= 1")
    if cfg.task == "summarize":
        need("{text}" in cfg.prompt.template, "prompt.template", "must contain {text}")
    need(cfg.prompt.chat_template in ("auto", "plain"), "prompt.chat_template", "must be auto or plain")
    g = cfg.generate
    need(g.max_new_tokens >= 1, "generate.max_new_tokens", "must be >= 1")
    need(g.temperature >= 0, "generate.temperature", "must be >= 0 (0 = greedy)")
    need(0 < g.top_p <= 1, "generate.top_p", "must be in (0, 1]")
    need(g.max_input_tokens is None or g.max_input_tokens >= 1, "generate.max_input_tokens", "must be >= 1")
    need(g.truncation in TRUNCATIONS, "generate.truncation", f"must be one of {', '.join(TRUNCATIONS)}")
    r = cfg.runtime
    need(r.num_actors == "auto" or (isinstance(r.num_actors, int) and not isinstance(r.num_actors, bool)
                                    and r.num_actors >= 1), "runtime.num_actors", "must be an int >= 1 or auto")
    need(r.num_gpus_per_actor >= 0, "runtime.num_gpus_per_actor", "must be >= 0 (0 = CPU mode)")
    need(r.num_cpus_per_actor > 0, "runtime.num_cpus_per_actor", "must be > 0")
    need(isinstance(r.batch_size, int) and not isinstance(r.batch_size, bool) and r.batch_size >= 1,
         "runtime.batch_size", "must be an int >= 1 or auto (8 in CPU mode, 256 with GPUs)")
    need(r.sort_window >= 0, "runtime.sort_window", "must be >= 0")
    need(r.files_per_wave >= 0, "runtime.files_per_wave", "must be >= 0 (0 = every file in one Ray Data execution)")
    need(r.log_level in LOG_LEVELS, "runtime.log_level", f"must be one of {', '.join(LOG_LEVELS)}")
    from kvstream.kvcache.config import setting_problem

    for key, value in cfg.engine.items():
        problem = setting_problem(key, value)
        need(problem is None, f"engine.{key}", problem or "")
    need(bool(cfg.output.path), "output.path", "set a local directory or s3:// prefix")
    need(cfg.output.rows_per_file >= 1, "output.rows_per_file", "must be >= 1")


def flat_keys(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """[(dotted key, value)] of a nested mapping, in order."""
    out: list[tuple[str, Any]] = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out += flat_keys(v, key + ".") if isinstance(v, dict) and v else [(key, v)]
    return out


def keys_help(task: str) -> str:
    """Every config key with its default, for `--help` (README "Configuration" says what each means)."""
    from kvstream.kvcache import CacheConfig

    tree = OmegaConf.to_container(load_config(task))
    tree["cache"] = CacheConfig().to_dict() | tree["cache"]
    tree["runtime"]["batch_size"] = RuntimeConf.batch_size  # the default as a user writes it (load_config resolves it)
    lines = [f"  {k} = {v!r}" for k, v in flat_keys(tree)]
    return "config keys (key=value overrides; defaults shown; reference: kvstream/pipeline/config.py):\n" + \
        "\n".join(lines)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
