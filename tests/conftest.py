"""Shared fixtures. Tests never reach the Hub: HF_HUB_OFFLINE is set before anything imports it."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Our clusters are started explicitly; Serve's handle threads must not silently reconnect after shutdown.
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """Tiny random-weight checkpoints of every pipeline, built once per test session."""
    from serve_app.tiny_models import build_all

    return build_all(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def catalog():
    from serve_app.catalog import default_catalog

    return default_catalog()
