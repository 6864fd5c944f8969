"""Shared fixtures. Tests never reach the Hub: HF_HUB_OFFLINE is set before anything imports it."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Our clusters are started explicitly; Serve's handle threads must not silently reconnect after shutdown.
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
# The shared test clusters run without Ray token auth (the `serve` CLI and subprocess drivers attach to
# them); tests/serve_app/test_runner.py checks the token lock `imageserve run` puts on its cluster.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# The Batch API's store of every service a test starts (unless the test names its own): never the user's
# ~/.local/state/imageserve, and empty at each run.
import tempfile

os.environ["IMAGESERVE_STATE_DIR"] = tempfile.mkdtemp(prefix="imageserve-test-state-")

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """Tiny random-weight checkpoints of every base model (base model id -> folder), built once per session."""
    from serve_app.engines.random_weights import build_all

    return build_all(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_root(tiny_models):
    """The folder that holds every tiny checkpoint (what the embedded config and the simulation take)."""
    return next(iter(tiny_models.values())).parent


@pytest.fixture(scope="session")
def load_engine_for():
    """``load_engine_for(config, variant_id)``: the real engine of a variant, loaded as ``config`` says."""
    from serve_app.domain.specs import engine_spec
    from serve_app.engines import load_engine

    def load(config, variant_id: str):
        catalog = config.build_catalog()
        return load_engine(engine_spec(config, catalog.variant(variant_id), catalog))

    return load


@pytest.fixture(scope="session")
def catalog():
    from serve_app.domain.catalog import default_catalog

    return default_catalog()


@pytest.fixture(scope="session")
def prometheus_tool():
    """``prometheus_tool(name)``: the path of ``prometheus`` or ``promtool`` from `make test`'s .tools/ (or PATH)."""
    import shutil

    def find(name: str) -> str:
        configured = os.environ.get("IMAGESERVE_PROMETHEUS")
        candidates = [Path(configured).with_name(name)] if configured else []
        candidates.append(ROOT / ".tools" / "prometheus" / "usr" / "bin" / name)
        for path in candidates:
            if path.exists():
                return str(path)
        found = shutil.which(name)
        assert found, f"{name} not found: run `make test`, which unpacks Debian's prometheus into .tools/"
        return found

    return find


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Debian's headless Chromium under selenium (tests/browser.py), one per test module."""
    from tests.browser import start_chromium

    driver = start_chromium(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="session")
def png_bytes() -> bytes:
    """A 64x64 PNG, as an upload's bytes."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


# ---- `make unit` starts no Ray ----------------------------------------------------------------------------
# Tests without the `integration` mark are what `make unit` runs: fast, and without a Ray cluster. While such a
# test runs (its fixtures' set-up included, so a shared service it asks for counts), starting Ray in this
# process, by ray.init or as a Ray node (ray.cluster_utils.Cluster and the runner start them so), fails it,
# naming the fix.


# Fixtures that build or load the tiny model pipelines: a test that asks for one takes seconds, not
# milliseconds, and is left out of `make unit` (marked `models`), as are the benchmarks' smoke tests.
MODEL_FIXTURES = frozenset({"tiny_models", "tiny_root", "load_engine_for"})


# Every test of these folders runs against a Ray Serve service its folder's conftest starts.
SERVICE_FOLDERS = frozenset({"integration", "reliability", "multi_gpu"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.parent.name in SERVICE_FOLDERS:
            item.add_marker(pytest.mark.integration)
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.parent.name == "bench":
            item.add_marker(pytest.mark.models)


class RayStartedInAUnitTest(AssertionError):
    pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if item.get_closest_marker("integration") is not None:
        yield
        return
    from unittest import mock

    import ray
    import ray._private.node

    def refuse(*_, **__):
        raise RayStartedInAUnitTest(f"{item.nodeid} starts Ray: mark it @pytest.mark.integration "
                                    "(`make unit` runs the tests that start no Ray cluster)")

    with mock.patch.object(ray, "init", refuse), mock.patch.object(ray._private.node.Node, "__init__", refuse):
        yield
