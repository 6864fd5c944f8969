"""The dependency floors leave out the releases with the known vulnerabilities docs/security.md names."""

import re
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DEPENDENCIES = {Requirement(d).name.lower(): Requirement(d)
                for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}

# package -> (first release past every advisory docs/security.md lists for it, those advisories)
FIXED = {
    "pillow": ("12.3.0", "CVE-2023-4863 (libwebp), CVE-2024-28219, CVE-2026-40192, CVE-2026-55379"),
    "python-multipart": ("0.0.31", "CVE-2024-53981, CVE-2026-24486, CVE-2026-40347, CVE-2026-42561, "
                                   "CVE-2026-53538, CVE-2026-53539, CVE-2026-53540"),
    "starlette": ("1.3.1", "CVE-2025-54121, CVE-2026-48710, CVE-2026-54282, CVE-2026-54283"),
}
# Advisories the lock does not clear, each with the reason docs/security.md gives: package -> (fixed in, advisory).
NOT_REACHED = {
    # The weights_only unpickler (torch.load): imageserve loads safetensors only. The image keeps torch 2.9, the
    # CUDA 12.8 build that matches Ray's base image (tests/test_dockerfile.py).
    "torch": ("2.10.0", "CVE-2026-24747"),
}


@pytest.mark.parametrize("package", sorted(FIXED))
def test_no_release_below_the_fix_is_allowed(package):
    fixed, advisory = FIXED[package]
    specifier = DEPENDENCIES[package].specifier
    floors = [Version(s.version) for s in specifier if s.operator in (">=", "==", "~=")]
    assert floors and min(floors) >= Version(fixed), f"{package}: {advisory} is fixed in {fixed}"
    assert not specifier.contains("0.0.1")


@pytest.mark.parametrize("package", sorted(FIXED))
def test_the_lock_is_past_every_fix_the_floors_name(package):
    """The floors keep a resolver off the affected releases; the image installs the lock, which must be past them
    too (today it is well past: the floors were raised to the advisories, not the lock lowered)."""
    fixed, advisory = FIXED[package]
    assert Version(LOCKED[package]) >= Version(fixed), f"lock/image.txt: {package} {LOCKED[package]} ({advisory})"


def test_every_advisory_considered_is_in_docs_security_md_with_its_release():
    """docs/security.md's advisories table has a row per advisory: | package | advisory | fixed in | reached? |"""
    rows = [line for line in (ROOT / "docs" / "security.md").read_text().splitlines() if line.startswith("| ")]
    for package, (fixed, advisories) in {**FIXED, **NOT_REACHED}.items():
        mine = [row for row in rows if row.startswith(f"| {package} |")]
        for advisory in re.findall(r"CVE-\d{4}-\d+", advisories):
            assert any(advisory in row for row in mine), f"{advisory} ({package}) has no row in docs/security.md"
        assert any(f"| {fixed} |" in row for row in mine), f"no {package} row is fixed in {fixed}"


@pytest.mark.parametrize("package", sorted(NOT_REACHED))
def test_an_advisory_the_lock_does_not_clear_is_one_docs_security_md_explains(package):
    """When the lock moves past the fix, this entry (and its paragraph in docs/security.md) can go."""
    fixed, advisory = NOT_REACHED[package]
    if Version(LOCKED[package].split("+")[0]) >= Version(fixed):
        pytest.fail(f"lock/image.txt has {package} {LOCKED[package]}, past {fixed}: move {advisory} to FIXED")
    section = (ROOT / "docs" / "security.md").read_text().split(advisory, 1)
    assert len(section) == 2 and "does not apply" in section[1][:1500], f"docs/security.md: why not {advisory}"


def test_the_real_nunchaku_is_never_a_dependency():
    assert "nunchaku" not in DEPENDENCIES  # the PyPI package of that name is an unrelated library


# ---- the suite runs what the node image ships (lock/image.txt) ------------------------------------------

def _lock_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("lock_constraints", ROOT / "lock" / "constraints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LOCK = _lock_tool()
LOCKED = LOCK.locked_versions(ROOT / "lock" / "image.txt")
# The libraries whose behaviour the engines and the service rely on: each must be installed here at the lock's
# version (tests that read a library's source read this version).
SHIPPED_LIBRARIES = ("diffusers", "transformers", "accelerate", "peft", "torchao", "huggingface-hub", "safetensors",
                     "tokenizers", "ray", "fastapi", "starlette", "pydantic", "pillow", "numpy", "python-multipart",
                     "prometheus-client")


def test_every_package_of_the_image_is_installed_here_at_the_lock_s_version():
    """`make install` installs lock/image.txt under constraints derived from it (lock/constraints.py); torch and
    its CUDA companions are the machine's own build."""
    from importlib.metadata import PackageNotFoundError, version

    constrained = LOCK.constrained_versions(ROOT / "lock" / "image.txt")
    assert set(SHIPPED_LIBRARIES) <= set(constrained)
    wrong = {}
    for name, locked in constrained.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = None
        if installed != locked:
            wrong[name] = (locked, installed)
    assert not wrong, f"(lock, installed) differ: {wrong}; run `make install`"


def test_the_constraints_leave_out_only_torch_and_what_is_built_against_its_cuda_build():
    left_out = set(LOCKED) - set(LOCK.constrained_versions(ROOT / "lock" / "image.txt"))
    assert left_out == {n for n in LOCKED if n in ("torch", "torchvision", "triton") or n.startswith("nvidia-")}
    assert "torch" in left_out and "torchao" not in left_out


def _requirements(path: Path) -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def test_pyproject_and_lock_image_in_admit_every_locked_version():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(d) for d in project["dependencies"] + project["optional-dependencies"]["fp8"]]
    requirements += _requirements(ROOT / "lock" / "image.in")
    refused = [f"{r} (lock: {LOCKED[LOCK.normalize(r.name)]})" for r in requirements
               if not r.specifier.contains(LOCKED[LOCK.normalize(r.name)], prereleases=True)]
    assert not refused


def test_the_libraries_own_runtime_minimums_hold_for_the_locked_versions():
    """Minimums the libraries check when they run, which no package metadata declares: each is called here, on
    the installed (locked) versions."""
    pytest.importorskip("torchao")
    from diffusers import TorchAoConfig
    from diffusers.utils import check_peft_version
    from diffusers.utils.constants import MIN_PEFT_VERSION
    from peft.import_utils import is_torchao_available
    from torchao.quantization import Float8WeightOnlyConfig

    TorchAoConfig(Float8WeightOnlyConfig())  # diffusers 0.42.1: ValueError below torchao 0.15.0
    assert is_torchao_available()  # peft 0.21.2: ImportError below torchao 0.16.0, on every LoRA load
    check_peft_version(MIN_PEFT_VERSION)  # diffusers' LoRA loading


def test_the_installed_packages_satisfy_each_other():
    import subprocess
    import sys

    checked = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
