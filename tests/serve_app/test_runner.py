"""The private Ray cluster `imageserve run` starts is locked with Ray token auth: a driver without the
token is refused, one with it attaches."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import pytest

from serve_app.runner import lock_private_ray, refresh_ray_auth_config

AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "IMAGESERVE_GENERATED_RAY_AUTH")


@pytest.fixture
def no_auth_env():
    """No RAY_AUTH_* variables during the test; afterwards the test session's own, and Ray's caches of them."""
    saved = {name: os.environ.pop(name) for name in AUTH_VARS if name in os.environ}
    yield
    for name in AUTH_VARS:
        os.environ.pop(name, None)
    os.environ.update(saved)
    refresh_ray_auth_config()


def test_a_fresh_token_only_this_user_can_read(no_auth_env, tmp_path):
    path = lock_private_ray(str(tmp_path))
    assert path == str(tmp_path / "auth_token")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(open(path).read()) == 64
    assert os.environ["RAY_AUTH_MODE"] == "token" and os.environ["RAY_AUTH_TOKEN_PATH"] == path

    # The next cluster this process starts (its own tmpdir) gets a new token, not the removed one.
    second = tmp_path / "second"
    second.mkdir()
    assert lock_private_ray(str(second)) == str(second / "auth_token")
    assert open(path).read() != open(second / "auth_token").read()


def test_an_explicit_auth_mode_wins(no_auth_env, tmp_path):
    os.environ["RAY_AUTH_MODE"] = "disabled"
    assert lock_private_ray(str(tmp_path)) is None
    assert os.environ["RAY_AUTH_MODE"] == "disabled" and not (tmp_path / "auth_token").exists()


HEAD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from serve_app.domain.config import parse_config
    from serve_app.embedded import embedded_config_data
    from serve_app.runner import LocalService

    service = LocalService(parse_config(embedded_config_data(Path(sys.argv[1])), "embedded"), num_cpus=1)
    try:
        print("READY", service.start_ray(), service.auth_token_path, flush=True)
        sys.stdin.read()  # until the test closes it
    finally:
        service.stop()
""")
ATTACH = "import sys, ray; ray.init(address=sys.argv[1], log_to_driver=False); print('ATTACHED', flush=True)"


@pytest.mark.integration
def test_imageserve_runs_ray_behind_a_token(tiny_root, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    head = subprocess.Popen([sys.executable, "-c", HEAD, str(tiny_root)], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        words = head.stdout.readline().split()  # blocks until the cluster is up or the process ends
        assert words[:1] == ["READY"], f"the head did not start (exit {head.poll()})"
        gcs_address, token_path = words[1], words[2]
        client_env = dict(env, RAY_TMPDIR=str(tmp_path))

        def attach(**auth: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-c", ATTACH, gcs_address], env={**client_env, **auth},
                                  capture_output=True, text=True, timeout=300)

        refused = [attach(), attach(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)]
        for result in refused:
            assert result.returncode != 0 and "ATTACHED" not in result.stdout, result.stdout
        admitted = attach(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_path)
        assert admitted.returncode == 0 and "ATTACHED" in admitted.stdout, admitted.stderr[-2000:]
    finally:
        head.stdin.close()
        head.wait(120)
    assert not os.path.exists(token_path)  # removed with the cluster's tmpdir
