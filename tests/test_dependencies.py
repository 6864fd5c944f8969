"""The dependency floors leave out the releases with the known vulnerabilities docs/security.md names."""

from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DEPENDENCIES = {Requirement(d).name.lower(): Requirement(d)
                for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}

# package -> (first fixed release, advisory)
FIXED = {
    "pillow": ("10.3.0", "CVE-2023-4863 (libwebp), CVE-2024-28219"),
    "python-multipart": ("0.0.18", "CVE-2024-53981"),
    "starlette": ("0.47.2", "CVE-2025-54121"),
}


@pytest.mark.parametrize("package", sorted(FIXED))
def test_no_release_below_the_fix_is_allowed(package):
    fixed, advisory = FIXED[package]
    specifier = DEPENDENCIES[package].specifier
    floors = [Version(s.version) for s in specifier if s.operator in (">=", "==", "~=")]
    assert floors and min(floors) >= Version(fixed), f"{package}: {advisory} is fixed in {fixed}"
    assert not specifier.contains("0.0.1")


def test_the_real_nunchaku_is_never_a_dependency():
    assert "nunchaku" not in DEPENDENCIES  # the PyPI package of that name is an unrelated library
