"""Fixtures for the pipeline tests: one local Ray shared by the whole folder, and a loopback S3 server."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from tests.pipeline.helpers import free_port


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for every in-process job of this folder (2 CPUs, as in CI)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free loopback port; yields the env for clients and stops it afterwards."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1"}
    yield env
    proc.terminate()
    proc.wait(timeout=10)
