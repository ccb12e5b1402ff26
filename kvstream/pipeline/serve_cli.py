"""CLI of the Serve deployment: `python jobs/serve.py [--config conf/serve.yaml] [--check] [key=value ...]`.

Loads the serve config (kvstream/pipeline/serve_config.py: model.*, cache.*, serve.*), connects to the Ray cluster
(RAY_ADDRESS, else a new local Ray), starts Serve's HTTP proxy on serve.host:serve.port and runs the app until
Ctrl-C. `--check` prints the resolved config and exits without starting anything.
"""

import argparse
import logging
import os
import signal
import sys

from omegaconf import OmegaConf

from kvstream.pipeline.config import ConfigError, flat_keys
from kvstream.pipeline.serve_config import load_serve_config

EXIT_CONFIG = 2


def keys_help() -> str:
    from kvstream.kvcache import CacheConfig

    tree = OmegaConf.to_container(load_serve_config())
    tree["cache"] = CacheConfig().to_dict() | tree["cache"]
    return "config keys (key=value overrides; defaults shown; reference: kvstream/pipeline/serve_config.py):\n" + \
        "\n".join(f"  {k} = {v!r}" for k, v in flat_keys(tree))


def serve_forever(cfg) -> None:
    """Start Ray (RAY_ADDRESS or local), Serve on serve.host:serve.port, and the app; block until interrupted."""
    import ray
    from ray import serve

    from kvstream.pipeline.serve import build_app

    s = cfg.serve
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", logging_level="WARNING", include_dashboard=False)
    serve.start(http_options={"host": s.host, "port": s.port})
    app = build_app(OmegaConf.to_container(cfg, resolve=True))
    serve.run(app, name=s.app_name, route_prefix=s.route_prefix)
    print(f"kvstream: serving {s.model_name or cfg.model.path} at http://{s.host}:{s.port}{s.route_prefix.rstrip('/')}"
          "/v1 (Ctrl-C stops)", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        serve.shutdown()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    epilog = keys_help() if {"-h", "--help"} & set(argv) else None  # imports torch: only for --help
    parser = argparse.ArgumentParser(prog="jobs/serve.py", description="kvstream OpenAI-compatible server (Ray Serve)",
                                     epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file merged over the defaults")
    parser.add_argument("--check", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value (omegaconf dotlist), e.g. serve.num_slots=16")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        cfg = load_serve_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"kvstream: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        print(OmegaConf.to_yaml(cfg, resolve=True), end="")
        return 0
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})  # taken by sigwait, not raised
    serve_forever(cfg)
    return 0
