"""The Redis of GCS fault tolerance, run with the arguments cluster/deploy/redis.yaml gives it: a real
redis-server (Debian's, which `make test` unpacks into .tools/) on loopback, with a CA and a server
certificate made here. It speaks TLS only and answers nothing before AUTH; Ray's GCS, pointed at it the
way the generated RayService points the head at it (rediss://, RAY_REDIS_CA_CERT, the password), writes
its tables there.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from serve_app.runner import free_port
from tests.cluster.redis_support import PASSWORD, command

pytestmark = pytest.mark.integration


def test_redis_answers_only_over_tls_and_only_after_auth(redis_server):
    with socket.create_connection(("127.0.0.1", redis_server.port), timeout=30) as plain:
        plain.sendall(b"PING\r\n")
        try:
            answer = plain.recv(4096)
        except ConnectionResetError:
            answer = b""
    assert b"PONG" not in answer  # plain text gets a failed handshake, never an answer

    with redis_server.tls_socket() as sock:
        assert command(sock, "PING").startswith(b"-NOAUTH")
        assert command(sock, "AUTH", "a-guess").startswith(b"-WRONGPASS")
        assert command(sock, "AUTH", PASSWORD) == b"+OK"
        assert command(sock, "PING") == b"+PONG"


def test_rays_gcs_keeps_its_tables_in_the_tls_redis(redis_server):
    tmpdir = tempfile.mkdtemp(prefix="isv-redis-", dir="/tmp")
    env = dict(os.environ, RAY_TMPDIR=tmpdir, RAY_AUTH_MODE="disabled",
               RAY_REDIS_ADDRESS=f"rediss://127.0.0.1:{redis_server.port}", RAY_REDIS_CA_CERT=str(redis_server.ca_cert))
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    log = Path(tmpdir) / "head.log"
    head = subprocess.Popen([ray_cli, "start", "--head", f"--port={free_port()}", "--num-cpus=1", "--num-gpus=0",
                             "--include-dashboard=false", "--disable-usage-stats", "--redis-password", PASSWORD,
                             "--block"], env=env, start_new_session=True, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        with redis_server.tls_socket() as sock:
            assert command(sock, "AUTH", PASSWORD) == b"+OK"
            while command(sock, "DBSIZE") == b":0":
                assert head.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(1)
            assert int(command(sock, "DBSIZE")[1:]) > 0
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
            try:
                head.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait(10)
        shutil.rmtree(tmpdir, ignore_errors=True)
