import pytest

from serve_app.engines.nunchaku_support import NunchakuUnavailableError, nunchaku_status, transformer_class


@pytest.fixture
def isolated_nunchaku(nunchaku_on_path, tmp_path):
    """An empty folder first on sys.path, where a test writes a package named ``nunchaku`` of its making."""
    nunchaku_on_path(tmp_path)
    return tmp_path


def write_nunchaku(folder, files: dict[str, str], version: str | None = None) -> None:
    """A package named ``nunchaku`` in ``folder`` (file name -> source), with distribution metadata when
    ``version`` is given."""
    package = folder / "nunchaku"
    package.mkdir()
    for name, source in files.items():
        (package / name).write_text(source)
    if version is not None:
        metadata = folder / f"nunchaku-{version}.dist-info"
        metadata.mkdir()
        (metadata / "METADATA").write_text(f"Metadata-Version: 2.1\nName: nunchaku\nVersion: {version}\n")


def test_missing_nunchaku_says_where_the_real_one_comes_from(isolated_nunchaku):
    usable, why = nunchaku_status()
    assert not usable
    assert "github.com/nunchaku-tech/nunchaku/releases" in why
    with pytest.raises(NunchakuUnavailableError, match="4-bit variants need the real nunchaku"):
        transformer_class("NunchakuQwenImageTransformer2DModel")


def test_the_unrelated_pypi_package_is_recognised(isolated_nunchaku):
    # The PyPI 'nunchaku' is a Bayesian segmentation library: importable, but no nunchaku.models.
    write_nunchaku(isolated_nunchaku, {"__init__.py": "from .segmentation import Nunchaku\n",
                                       "segmentation.py": "class Nunchaku:\n    pass\n"})
    usable, why = nunchaku_status()
    assert not usable
    assert "unrelated PyPI package" in why
    with pytest.raises(NunchakuUnavailableError, match="unrelated PyPI package"):
        transformer_class("NunchakuZImageTransformer2DModel")


def test_a_real_build_that_fails_to_import_is_not_reported_as_missing(isolated_nunchaku):
    # A wheel built for another torch: installed (its metadata says which), but its extension won't load.
    broken = "raise ImportError('_C.cpython-311-x86_64-linux-gnu.so: undefined symbol: _ZN3c104cuda9SetDeviceEi')\n"
    write_nunchaku(isolated_nunchaku, {"__init__.py": broken}, version="1.1.0+torch2.9")
    usable, why = nunchaku_status()
    assert not usable
    assert "nunchaku 1.1.0+torch2.9 is installed" in why and "fails to import" in why and "undefined symbol" in why
    assert "not installed" not in why
