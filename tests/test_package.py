"""kvstream is one import package that lives beside transformers and Hugging Face's `kernels`, and runs the ways a
user runs it: imported from anywhere, installed non-editable into a fresh virtualenv, its jobs started from any
working directory. (`ray job submit --working-dir .` is tests/pipeline/test_submit.py.)"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pyarrow.parquet as pq
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path, python: str = sys.executable, timeout: float = 300) -> str:
    """Run `code` in a fresh interpreter in `cwd` (not the repository root, so nothing is found through it)."""
    proc = subprocess.run([python, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def test_public_api_and_version():
    import kvstream
    from kvstream import CacheConfig, CompressedCache, Engine
    from kvstream.kvcache.cache import CompressedCache as cache_cls
    from kvstream.kvcache.engine import Engine as engine_cls

    assert CompressedCache is cache_cls and Engine is engine_cls
    assert CacheConfig(policy="keyformer", budget=0.5, quant="kivi2").policy == "keyformer"
    assert kvstream.__version__ == importlib.metadata.version("kvstream")
    assert {"CacheConfig", "CompressedCache", "Engine", "__version__"} <= set(dir(kvstream))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        kvstream.Nope  # noqa: B018


def test_no_bare_top_level_modules(tmp_path):
    """Nothing of the project is importable as `kvcache`, `pipeline` or `kernels` (generic names other
    distributions own); `kernels`, where installed, is Hugging Face's."""
    out = run_python("""
        import importlib.util, json
        specs = {n: importlib.util.find_spec(n) for n in ("kvcache", "pipeline", "kernels")}
        print(json.dumps({n: (s.origin if s else None) for n, s in specs.items()}))
    """, tmp_path)
    origins = json.loads(out.strip().splitlines()[-1])
    assert origins["kvcache"] is None and origins["pipeline"] is None, origins
    assert origins["kernels"] is None or not origins["kernels"].startswith(str(REPO)), origins


def test_hf_kernels_and_kvstream_kernels_in_one_process(tmp_path):
    """transformers >= 5.25 imports Hugging Face's `kernels` from its attention integrations; with kvstream loaded
    both packages import and transformers' model code builds and runs a model on kvstream's cache."""
    needs_hf_kernels = Version(importlib.metadata.version("transformers")) >= Version("5.25")
    out = run_python(f"""
        import importlib.util
        import torch
        import kvstream
        from kvstream import CacheConfig, CompressedCache
        import kvstream.kernels.decode_attention, kvstream.kernels.kivi_quant, kvstream.kernels.gumbel
        has_hf = importlib.util.find_spec("kernels") is not None
        if {needs_hf_kernels!r} or has_hf:
            import kernels  # Hugging Face's
            import transformers.integrations.hub_kernels as hub
            assert hasattr(kernels, "get_kernel"), kernels.__file__
            assert kernels.__name__ != kvstream.kernels.__name__
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.modeling_utils import PreTrainedModel
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
        model = LlamaForCausalLM(cfg).eval()
        cache = CompressedCache(CacheConfig(policy="h2o", budget=4), model.config)
        from kvstream.kvcache.models import cache_kwarg
        out = model.generate(torch.tensor([[1, 5, 9, 3, 7, 2, 8]]), **{{cache_kwarg(model): cache}}, max_new_tokens=3,
                             do_sample=False)
        print("ok", has_hf, tuple(out.shape))
    """, tmp_path)
    line = out.strip().splitlines()[-1]
    assert line in ("ok True (1, 10)", "ok False (1, 10)"), out
    if needs_hf_kernels:
        assert line == "ok True (1, 10)", out


def test_non_editable_install_in_a_fresh_virtualenv(tmp_path):
    """`pip install .` (a wheel, not the checkout) into a new virtualenv: `import kvstream` resolves to the
    virtualenv's copy, the wheel holds only the `kvstream` package, and a tiny Engine generates."""
    if Version(importlib.metadata.version("setuptools")) < Version("77"):  # pyproject.toml's build requirement
        pytest.skip("the wheel is built offline with this interpreter's setuptools, older than the >= 77 it needs")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "kvstream", src / "kvstream", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    venv = tmp_path / "venv"
    # the system site-packages give torch / transformers without a download; kvstream itself comes from the wheel
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    wheels = tmp_path / "wheels"
    # what `pip install .` does, in two steps, offline: build the wheel (with this interpreter's setuptools: the
    # virtualenv's bundled one may predate the build backend pyproject.toml asks for), then install it
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(src)], capture_output=True, text=True, timeout=300, check=False)
    assert build.returncode == 0, build.stderr[-4000:]
    (wheel,) = wheels.glob("kvstream-*.whl")
    import zipfile

    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"kvstream"}, tops
    inst = subprocess.run([py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert inst.returncode == 0, inst.stderr[-4000:]
    out = run_python(f"""
        import torch, kvstream
        from kvstream import CacheConfig, Engine
        assert kvstream.__file__.startswith({str(venv)!r}), kvstream.__file__
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0)
        eng = Engine.from_pretrained(LlamaForCausalLM(cfg).eval(), device="cpu",
                                     cache=CacheConfig(policy="keyformer", budget=0.5, quant="kivi2", group_size=8,
                                                       residual=16))
        (row,) = eng.generate([[1] + list(range(3, 43))], max_new_tokens=5)
        print("generated", row["num_generated_tokens"], row["kv_bytes"] < row["kv_bytes_full"], kvstream.__version__)
    """, tmp_path, python=py)
    assert out.strip().splitlines()[-1] == f"generated 5 True {importlib.metadata.version('kvstream')}", out


def test_summarize_job_from_another_working_directory(tmp_path):
    """`python /path/to/jobs/summarize.py --config /path/to/conf/demo.yaml` from an unrelated directory: the job
    and its Ray actors import the installed kvstream (no path set up by the script)."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS") and k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "summarize.py"), "--config", str(REPO / "conf" / "demo.yaml"),
         f"output.path={out}", "data.limit=6", "generate.max_new_tokens=2", "runtime.batch_size=3"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    rows = pq.read_table(str(out / "results")).to_pylist()
    assert sorted(r["id"] for r in rows) == [f"demo-{i:04d}" for i in range(6)]
    assert all(r["error"] is None and r["num_generated_tokens"] >= 1 for r in rows), rows
