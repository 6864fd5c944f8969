import pytest

from serve_app.engines.nunchaku_support import NunchakuUnavailableError, nunchaku_status, transformer_class


@pytest.fixture
def isolated_nunchaku(nunchaku_on_path, tmp_path):
    """An empty folder first on sys.path, where a test writes a package named ``nunchaku`` of its making."""
    nunchaku_on_path(tmp_path)
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


def test_a_real_build_that_fails_to_import_is_not_reported_as_missing(isolated_nunchaku):
    # A wheel built for another torch: installed (its metadata says which), but its extension won't load.
    package = isolated_nunchaku / "nunchaku"
    package.mkdir()
    (package / "__init__.py").write_text(
        "raise ImportError('_C.cpython-311-x86_64-linux-gnu.so: undefined symbol: _ZN3c104cuda9SetDeviceEi')\n")
    metadata = isolated_nunchaku / "nunchaku-1.1.0+torch2.9.dist-info"
    metadata.mkdir()
    (metadata / "METADATA").write_text("Metadata-Version: 2.1\nName: nunchaku\nVersion: 1.1.0+torch2.9\n")
    usable, why = nunchaku_status()
    assert not usable
    assert "nunchaku 1.1.0+torch2.9 is installed" in why and "fails to import" in why and "undefined symbol" in why
    assert "not installed" not in why
