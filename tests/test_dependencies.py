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
