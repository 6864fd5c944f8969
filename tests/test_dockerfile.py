"""The node image installs exactly what the project declares (base images cannot be pulled here, so the
Dockerfile is read rather than built: docs/deploy.md says so)."""

import re
import shlex
from pathlib import Path

import tomllib
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from cluster.configs import DEFAULT_IMAGE, RAY_BASE_IMAGE
from serve_app import __version__

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each Dockerfile line, continuations joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    lines = [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def build_args() -> dict[str, str]:
    args = {}
    for kind, rest in instructions():
        if kind == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name] = value.strip('"')
    return args


def pip_installs() -> list[list[str]]:
    """The arguments of every `pip install`, options dropped, build arguments filled in."""
    args = build_args()
    installs = []
    for kind, rest in instructions():
        if kind != "RUN":
            continue
        for command in rest.split("&&"):
            words = shlex.split(command.replace(";", " ; "))
            if words[:2] != ["pip", "install"]:
                if "pip" in words and "install" in words:  # e.g. inside `if ...; then pip install ...; fi`
                    words = words[words.index("pip"):]
                    words = words[:words.index(";")] if ";" in words else words
                else:
                    continue
            targets, skip = [], False
            for word in words[2:]:
                if skip:
                    skip = False
                elif word.startswith("--"):
                    skip = word in ("--index-url", "--extra-index-url")
                else:
                    targets.append(re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), word))
            installs.append(targets)
    return installs


def test_the_image_builds_on_rays_cuda_image_for_this_ray_and_python():
    assert build_args()["RAY_IMAGE"] == RAY_BASE_IMAGE
    ray_pin = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray[serve]"))
    ray_version = re.search(r"ray:(\d+\.\d+\.\d+)-py(\d)(\d+)", RAY_BASE_IMAGE)
    assert Version(ray_version.group(1)) in SpecifierSet(ray_pin.removeprefix("ray[serve]"))
    python = f"{ray_version.group(2)}.{ray_version.group(3)}"
    assert Version(python) in SpecifierSet(PYPROJECT["project"]["requires-python"])


def test_it_installs_the_project_and_a_cuda_torch_and_nothing_else():
    installs = pip_installs()
    torch_spec = build_args()["TORCH_SPEC"]
    assert installs == [[torch_spec], ["."], [""]], installs  # "": the nunchaku wheel, empty by default
    torch_bound = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch"))
    wanted = Version(torch_spec.split("==")[1].replace("*", "0"))
    assert wanted in SpecifierSet(torch_bound.removeprefix("torch"))
    assert build_args()["TORCH_INDEX"].endswith("/cu128")  # the base image's CUDA 12.8
    assert RAY_BASE_IMAGE.endswith("-cu128")


def test_nunchaku_comes_only_from_the_wheel_argument_never_from_pypi():
    for targets in pip_installs():
        assert not any(t.split("==")[0].split("[")[0].lower() == "nunchaku" for t in targets)
    assert 'pip install --no-cache-dir "${NUNCHAKU_WHEEL}"' in DOCKERFILE


def test_it_copies_every_package_the_project_ships_and_dockerignore_lets_them_through():
    copied = {source for kind, rest in instructions() if kind == "COPY"
              for source in rest.split()[:-1] if not source.startswith("--")}
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"pyproject.toml", "README.md"} <= copied
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for package in packages:
        assert f"!{package}/" in ignore


def test_a_non_root_user_and_the_weights_on_a_volume():
    users = [rest for kind, rest in instructions() if kind == "USER"]
    assert users and users[-1] not in ("root", "0")
    volumes = [rest for kind, rest in instructions() if kind == "VOLUME"]
    hf_home = re.search(r"HF_HOME=(\S+)", DOCKERFILE).group(1)
    assert volumes == [hf_home]
    assert "HF_HUB_OFFLINE=1" in DOCKERFILE


def test_the_cluster_configs_run_the_image_make_image_tags():
    assert DEFAULT_IMAGE == f"imageserve:{__version__}"
    assert "IMAGE ?= imageserve:$(VERSION)" in (ROOT / "Makefile").read_text()
