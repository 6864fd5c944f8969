import sys

import pytest

from serve_app.engines.nunchaku_support import NunchakuUnavailableError, nunchaku_status, transformer_class


@pytest.fixture
def isolated_nunchaku(monkeypatch, tmp_path):
    """Put a package named ``nunchaku`` of our making first on sys.path."""
    for name in [m for m in sys.modules if m == "nunchaku" or m.startswith("nunchaku.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_missing_nunchaku_says_where_the_real_one_comes_from(isolated_nunchaku):
    usable, why = nunchaku_status()
    assert not usable
    assert "github.com/nunchaku-tech/nunchaku/releases" in why
    with pytest.raises(NunchakuUnavailableError, match="4-bit variants need the real nunchaku"):
        transformer_class("NunchakuQwenImageTransformer2DModel")


def test_the_unrelated_pypi_package_is_recognised(isolated_nunchaku):
    # The PyPI 'nunchaku' is a Bayesian segmentation library: importable, but no nunchaku.models.
    package = isolated_nunchaku / "nunchaku"
    package.mkdir()
    (package / "__init__.py").write_text("from .segmentation import Nunchaku\n")
    (package / "segmentation.py").write_text("class Nunchaku:\n    pass\n")
    usable, why = nunchaku_status()
    assert not usable
    assert "unrelated PyPI package" in why
    with pytest.raises(NunchakuUnavailableError, match="unrelated PyPI package"):
        transformer_class("NunchakuZImageTransformer2DModel")
