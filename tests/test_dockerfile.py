"""The node image installs exactly what the project declares (base images cannot be pulled here, so the
Dockerfile is read rather than built: docs/deploy.md says so)."""

import re
import shlex
import shutil
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


def lock_pins() -> dict[str, tuple[str, list[str]]]:
    """lock/image.txt as {name: (version, sha256 hashes)}."""
    pins = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", (ROOT / "lock" / "image.txt").read_text()):
        match = re.match(r"([A-Za-z0-9_.\-\[\]]+)==(\S+)", block)
        if match:
            name = re.sub(r"\[.*\]", "", match.group(1)).lower().replace("_", "-")
            pins[name] = (match.group(2), re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return pins


def test_it_installs_the_hashed_lock_then_the_project_and_nothing_else():
    installs = pip_installs()
    assert installs == [["-r", "lock/image.txt"], ["."], ["-r", "/tmp/nunchaku.txt"]], installs
    runs = [rest for kind, rest in instructions() if kind == "RUN" and "pip install" in rest]
    assert "--require-hashes -r lock/image.txt" in runs[0]
    # Its dependencies are all in the lock, and so are its build tools: no index, no build isolation.
    assert "pip install --no-cache-dir --no-index --no-deps --no-build-isolation ." in runs[1]


def test_the_lock_pins_every_dependency_with_hashes_within_pyprojects_bounds():
    from packaging.requirements import Requirement

    pins = lock_pins()
    assert all(hashes for _, hashes in pins.values()), [n for n, (_, h) in pins.items() if not h]
    for dependency in PYPROJECT["project"]["dependencies"]:
        requirement = Requirement(dependency)
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not in lock/image.txt: run `make lock`"
        assert Version(pins[name][0]) in requirement.specifier, f"{name} {pins[name][0]} not {requirement.specifier}"
    # The CUDA 12.8 torch of PyPI, for the base image's CUDA, and its CUDA libraries with it.
    assert pins["torch"][0].startswith("2.9.") and RAY_BASE_IMAGE.endswith("-cu128")
    assert pins["nvidia-cuda-runtime-cu12"][0].startswith("12.8.")
    # Everything the nunchaku wheel imports, since it is installed with --no-deps.
    for name in ("accelerate", "diffusers", "einops", "huggingface-hub", "peft", "protobuf", "sentencepiece",
                 "torchvision", "transformers"):
        assert name in pins, name
    assert "nunchaku" not in pins  # the PyPI package of that name is an unrelated library


def test_the_lock_is_what_make_lock_resolves_from_its_inputs():
    text = (ROOT / "lock" / "image.txt").read_text()
    assert "#    make lock" in text.splitlines()[1]
    inputs = (ROOT / "lock" / "image.in").read_text()
    for line in inputs.splitlines():
        if line and not line.startswith("#"):
            name = re.split(r"[=<>!~]", line)[0].strip().lower()
            assert name in lock_pins(), f"{name} of lock/image.in is not locked: run `make lock`"


def test_nunchaku_comes_only_from_the_wheel_argument_with_its_hash_never_from_pypi():
    for targets in pip_installs():
        assert not any(t.split("==")[0].split("[")[0].lower() == "nunchaku" for t in targets)
    assert 'echo "${NUNCHAKU_WHEEL} --hash=sha256:${NUNCHAKU_WHEEL_SHA256}" > /tmp/nunchaku.txt' in DOCKERFILE
    assert "pip install --no-cache-dir --no-deps --require-hashes -r /tmp/nunchaku.txt" in DOCKERFILE
    assert 'if [ -z "${NUNCHAKU_WHEEL_SHA256}" ]; then echo' in DOCKERFILE and "exit 1" in DOCKERFILE


def test_the_nunchaku_step_refuses_a_wheel_without_its_hash_and_installs_by_hash(tmp_path):
    """The Dockerfile's nunchaku step run by sh, with pip replaced by a recorder (no image can be built here)."""
    import subprocess

    run = next(rest for kind, rest in instructions() if kind == "RUN" and "NUNCHAKU_WHEEL" in rest)
    step = run[run.index("if [ -n"):run.index("fi", run.index("pip install --no-cache-dir --no-deps --require"))]
    step = step.replace("/tmp/nunchaku.txt", str(tmp_path / "nunchaku.txt")) + "fi"
    recorder = tmp_path / "bin" / "pip"
    recorder.parent.mkdir()
    recorder.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/pip-args\n')
    recorder.chmod(0o755)
    env = {"PATH": f"{recorder.parent}:/usr/bin:/bin", "NUNCHAKU_WHEEL": "https://example.invalid/n.whl"}
    refused = subprocess.run(["sh", "-c", step], env=env, capture_output=True, text=True)
    assert refused.returncode == 1 and "needs NUNCHAKU_WHEEL_SHA256" in refused.stderr
    assert not (tmp_path / "pip-args").exists()
    installed = subprocess.run(["sh", "-c", step], env={**env, "NUNCHAKU_WHEEL_SHA256": "ab" * 32},
                               capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    assert (tmp_path / "nunchaku.txt").read_text() == f"https://example.invalid/n.whl --hash=sha256:{'ab' * 32}\n"
    assert "--require-hashes" in (tmp_path / "pip-args").read_text()


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


# ---- issue 27, item 8: the build tools and the base image ---------------------------------------------------

def test_the_build_tools_come_from_the_lock_pinned_and_hashed():
    """With build isolation, `pip install .` fetched setuptools, wheel and packaging from PyPI, unpinned and
    unhashed. The lock now holds the build backend pyproject.toml names, and the project is built with it."""
    from packaging.requirements import Requirement

    pins = lock_pins()
    for requirement in map(Requirement, PYPROJECT["build-system"]["requires"]):
        version, hashes = pins[requirement.name.lower()]
        assert hashes and Version(version) in requirement.specifier, requirement


def test_the_project_builds_offline_from_the_locked_build_tools(tmp_path):
    """The Dockerfile's install step, run here: its pip options on the files its COPY lines copy, with this
    environment's setuptools and wheel (the lock's: tests/test_dependencies.py checks this environment matches the
    lock), into a folder instead of the image's site-packages. With no index it cannot fetch anything."""
    import subprocess
    import sys

    run = next(rest for kind, rest in instructions() if kind == "RUN" and "--no-build-isolation" in rest)
    options = shlex.split(run.split("&&")[0])[2:]  # after `pip install`
    assert options[-1] == "."
    source = tmp_path / "src"
    source.mkdir()
    for kind, rest in instructions():
        if kind == "COPY" and "lock/" not in rest:
            for name in [w for w in rest.split()[:-1] if not w.startswith("--")]:
                copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
                copy(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "install", *options[:-1], "--target", str(tmp_path / "site"),
                            "."], cwd=source, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    assert (tmp_path / "site" / "serve_app" / "__init__.py").exists()
    assert any((tmp_path / "site").glob("imageserve-*.dist-info"))


def test_the_base_image_is_pinned_by_digest_or_the_docs_say_how():
    """No public record of rayproject/ray:2.60.0-py311-cu128's digest could be found where this was written (it
    is not a Docker official image, so docker-library/repo-info has none), and a made-up digest would be worse
    than a tag. Until one is committed, the Dockerfile and docs/security.md say the image is pinned by tag and how
    to pin it."""
    image = build_args()["RAY_IMAGE"]
    if "@sha256:" in image:
        assert re.fullmatch(r"rayproject/ray:[\w.-]+@sha256:[0-9a-f]{64}", image)
        return
    how = f"docker buildx imagetools inspect {image}"
    assert how in DOCKERFILE
    security = (ROOT / "docs" / "security.md").read_text()
    assert how in security and "pinned by tag" in security
