"""The private Ray cluster `imageserve run` starts is locked with Ray token auth: a driver without the
token is refused, one with it attaches."""

from __future__ import annotations

import os
import re
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


def test_free_ports_are_never_ones_the_kernel_hands_out_for_port_0_nor_handed_out_twice():
    """A raylet binding port 0 once took the HTTP port a test had just picked by binding port 0 itself, and Serve's
    proxy failed to start: free ports come from below the kernel's ephemeral range, each once."""
    import socket

    from serve_app.runner import _ephemeral_ports_start, free_port

    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(20000 <= port < _ephemeral_ports_start() for port in ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[-1]))  # and free


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


@pytest.fixture
def serve_and_torchao_loggers():
    """The two loggers quiet_worker_logs filters, restored afterwards (filters are process-wide)."""
    import logging

    loggers = [logging.getLogger("ray.serve"), logging.getLogger("torchao")]
    saved = [(lg, list(lg.filters), list(lg.handlers), lg.propagate, lg.level) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO)  # Serve's replica level: what is left out is the filter's doing
    yield loggers
    for lg, filters, handlers, propagate, level in saved:
        lg.filters[:], lg.handlers[:] = filters, handlers
        lg.propagate = propagate
        lg.setLevel(level)


def test_replicas_leave_out_the_probes_access_lines_serves_info_and_torchao_notice_not_requests(
        serve_and_torchao_loggers, monkeypatch):
    """`imageserve run` polls /readyz until it answers: a dozen access lines before the URL, in a slow start."""
    import logging

    from serve_app.runner import QUIET_TORCHAO_ENV, quiet_worker_logs

    monkeypatch.setenv(QUIET_TORCHAO_ENV, "1")
    quiet_worker_logs()
    quiet_worker_logs()  # a second call adds nothing
    serve_log, torchao_log = serve_and_torchao_loggers
    assert len(serve_log.filters) == len({id(f) for f in serve_log.filters})

    kept = []

    class Keep(logging.Handler):
        def emit(self, record):
            kept.append(record.getMessage())

    for lg in serve_and_torchao_loggers:
        lg.addHandler(Keep())
        lg.propagate = False
    access = {"serve_access_log": True}
    serve_log.info("GET /readyz 503 2.1ms", extra=access)
    serve_log.info("127.0.0.1:5000 GET /imageserve/healthz 200 0.4ms", extra=access)
    serve_log.info("POST /v1/images/generations 200 812.0ms", extra=access)
    serve_log.info("GET /v1/models 200 2.2ms", extra=access)
    serve_log.info("Started <ray.serve._private.router.SharedRouterLongPollClient object at 0x7f>.")
    serve_log.warning("a replica log line that mentions GET /readyz 503 ")  # not an access line
    torchao_log.warning("Skipping import of cpp extensions due to incompatible torch version 2.13.0+cpu")
    torchao_log.warning("Failed to load libtorchao_ops.so")
    assert kept == ["POST /v1/images/generations 200 812.0ms", "GET /v1/models 200 2.2ms",
                    "a replica log line that mentions GET /readyz 503 ", "Failed to load libtorchao_ops.so"]


def test_where_an_fp8_variant_is_served_torchao_keeps_its_notice():
    from serve_app.domain.config import parse_config
    from serve_app.runner import uses_torchao

    assert not uses_torchao(parse_config({"models": {"z-image-turbo": {}}}))
    assert uses_torchao(parse_config({"models": {"z-image-turbo-fp8": {}}}))


def test_a_failed_deployment_is_one_line_naming_it_and_the_error(monkeypatch, capsys):
    """Serve's own error names the deployment only; the reason sat in three controller tracebacks above it."""
    from types import SimpleNamespace

    from ray import serve

    from serve_app import runner
    from serve_app.domain.config import parse_config

    traceback = ("The deployment failed to start 3 times in a row. Error:\nTraceback (most recent call last):\n"
                 '  File "/work/main/serve_app/engines/base.py", line 120, in for_spec\n'
                 "serve_app.engines.protocol.IncompatibleHardwareError: z-image-turbo-svdq-int4-r128 is a nunchaku "
                 "4-bit variant and needs a CUDA GPU\n")
    status = SimpleNamespace(applications={"imageserve": SimpleNamespace(
        status="DEPLOY_FAILED", message="Failed to update the deployments ['swap-single-gpu'].",
        deployments={"router": SimpleNamespace(status="HEALTHY", message=""),
                     "swap-single-gpu": SimpleNamespace(status="DEPLOY_FAILED", message=traceback)})})
    monkeypatch.setattr(serve, "status", lambda: status)
    reason = runner.failure_reason("imageserve")
    assert reason == ("swap-single-gpu did not start: IncompatibleHardwareError: z-image-turbo-svdq-int4-r128 is a "
                      "nunchaku 4-bit variant and needs a CUDA GPU")

    def fail(self, **_):
        raise runner.DeployFailed("deployment failed: ...", reason)

    monkeypatch.setattr(runner.LocalService, "start", fail)
    monkeypatch.setattr(runner.LocalService, "stop", lambda self: None)
    assert runner.run_foreground(parse_config({})) == 1
    err = capsys.readouterr().err
    assert err == f"imageserve run: {reason}\n"


def test_the_example_requests_carry_a_key_where_the_config_asks_for_one():
    from serve_app.runner import example_requests

    open_endpoint = example_requests("http://127.0.0.1:8000")
    assert "Authorization" not in open_endpoint
    keyed = example_requests("http://127.0.0.1:8000", keyed=True)
    curls = [line for line in keyed.splitlines() if "curl" in line]
    assert len(curls) == 3 and all('-H "Authorization: Bearer $IMAGESERVE_KEY"' in line for line in curls)
    assert "export IMAGESERVE_KEY=<key>" in keyed


START_UP_NOISE = re.compile(r"GET /readyz|Skipping import of cpp extensions|will not be applied|retries remaining|"
                            r"\((ServeController|ProxyActor) pid=\d+\).* INFO ")


@pytest.mark.integration
def test_imageserve_run_starts_in_a_few_lines_and_stops_without_noise(tiny_root, tmp_path):
    """`imageserve run` against the embedded default: the lines before its URL fit on a screen (22 lines, 52 on a
    slower start, before), and neither start nor stop prints Serve's INFO logs, probe access lines, library notices
    or Ray's retry message for the controller's own shutdown. A request's access line still shows."""
    import signal
    import urllib.request

    from serve_app.runner import free_port

    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if k not in AUTH_VARS}, "IMAGESERVE_HOME": str(tmp_path)}
    server = subprocess.Popen([sys.executable, "-m", "serve_app.cli", "run", "--port", str(port), "--tiny-dir",
                               str(tiny_root)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        for line in server.stdout:  # until the URL
            lines.append(line.rstrip("\n"))
            if "imageserve is answering at" in line:
                break
        before_url = list(lines)
        assert before_url and "imageserve is answering at" in before_url[-1], "\n".join(lines)
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=60).read()
        for line in server.stdout:  # the router's lines arrive in order: its earlier probe lines would be above
            lines.append(line.rstrip("\n"))
            if "GET /v1/models 200" in line:
                break
        server.send_signal(signal.SIGINT)
        lines += [line.rstrip("\n") for line in server.stdout]
        assert server.wait(120) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    output = "\n".join(lines)
    assert len(before_url) <= 4, output
    assert not [line for line in lines if START_UP_NOISE.search(line)], output
    assert lines[-1] == "stopped; the private Ray cluster is shut down", output
