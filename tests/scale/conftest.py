"""Servers the scale-out tests run against: a Prefect API (temporary, in-process flows) and an
S3-compatible object store (moto in server mode: real HTTP on a free loopback port)."""
from __future__ import annotations

import socket

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_api():
    """A temporary Prefect API and database for flows run in this process (and their Dask and Ray workers).

    One per test process (its start costs ~10 s of CPU), shared by the modules here that need one: their
    tests read back only their own flow and task runs, and test_gpu_limit.py removes the GPU limit it makes."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on loopback; yields its endpoint URL."""
    pytest.importorskip("s3fs", reason="object-store tests need s3fs: pip install 'booruflow[s3]'")
    server_mod = pytest.importorskip("moto.server", reason="object-store tests need moto[server]")
    port = free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture()
def s3_env(s3_endpoint, monkeypatch):
    """Credentials the way users give them (environment), scoped to the test; a fresh bucket each time."""
    import uuid

    import fsspec

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    fs = fsspec.filesystem("s3", endpoint_url=s3_endpoint, use_listings_cache=False, skip_instance_cache=True)
    bucket = f"booru-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    return fs, bucket
