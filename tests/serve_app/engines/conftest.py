"""Fixtures for the engine tests."""

import sys

import pytest


def _forget_nunchaku() -> None:
    # Plain deletes, not monkeypatch.delitem: monkeypatch would put the test's nunchaku back on undo.
    for name in [m for m in sys.modules if m == "nunchaku" or m.startswith("nunchaku.")]:
        del sys.modules[name]


@pytest.fixture
def nunchaku_on_path(monkeypatch):
    """``nunchaku_on_path(*folders)``: make the ``nunchaku`` in these folders the importable one for this
    test; no nunchaku module outlives the test."""
    _forget_nunchaku()

    def put(*folders) -> None:
        _forget_nunchaku()
        for folder in folders:
            monkeypatch.syspath_prepend(str(folder))

    yield put
    _forget_nunchaku()
