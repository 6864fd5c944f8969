"""The generated edge run for real: Debian's haproxy (`make test` unpacks it into .tools/, as it does
redis-server; the image runs HAProxy 3.2, whose timeouts, checks and error answers mean the same), with only its
listening addresses moved to free loopback ports, in front of the Serve address given."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cluster.configs import EdgeTimeouts, edge_haproxy_config
from serve_app.runner import free_port

ROOT = Path(__file__).resolve().parents[2]


def haproxy_binary() -> tuple[str, dict[str, str]]:
    """haproxy from .tools/ (IMAGESERVE_HAPROXY, with the libraries unpacked beside it), or from PATH."""
    configured = os.environ.get("IMAGESERVE_HAPROXY")
    for path in [*([Path(configured)] if configured else []), ROOT / ".tools/haproxy/usr/sbin/haproxy"]:
        if path.exists():
            return str(path), {"LD_LIBRARY_PATH": str(path.parents[1] / "lib" / "x86_64-linux-gnu")}
    found = shutil.which("haproxy")
    # A missing haproxy fails the edge's tests rather than skipping them: a skipped test proves nothing.
    assert found, ("haproxy not found: run `make test` (or `make unit`), which unpacks Debian's haproxy into "
                   ".tools/haproxy, or set IMAGESERVE_HAPROXY")
    return found, {}


def answers_200(port: int, path: str) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n\r\n".encode())
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


@contextmanager
def running_edge_for(serve_address: str, timeouts: EdgeTimeouts, start_deadline_s: float = 10) -> Iterator[int]:
    """The edge in front of ``serve_address`` (host:port); yields the port clients connect to."""
    binary, env = haproxy_binary()
    port, health = free_port(), free_port()
    config = edge_haproxy_config(timeouts).replace("bind :8080", f"bind 127.0.0.1:{port}").replace(
        "bind :8081", f"bind 127.0.0.1:{health}")
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"imageserve-edge-{port}.cfg"
    path.write_text(config)
    process = subprocess.Popen([binary, "-db", "-f", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, **env, "SERVE_ADDRESS": serve_address})
    try:
        deadline = time.monotonic() + start_deadline_s
        while not answers_200(health, "/healthz"):
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the edge did not start"
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)
        path.unlink()
