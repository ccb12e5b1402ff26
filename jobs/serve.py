"""kvstream server: `python jobs/serve.py [--config conf/serve.yaml] [--check] [key=value ...]`.

An OpenAI-compatible endpoint (Ray Serve) over the engine: /v1/completions, /v1/chat/completions (streamed or
not), /v1/models, /health. Starts a local Ray unless RAY_ADDRESS is set. The same app under Serve's own CLI:
`serve run kvstream.pipeline.serve:build_app config=conf/serve.yaml key=value ...`.
Configuration keys: kvstream/pipeline/serve_config.py.
"""

import sys

from kvstream.pipeline.serve_cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
