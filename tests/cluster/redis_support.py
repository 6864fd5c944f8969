"""A real redis-server on loopback, run as the Redis of GCS fault tolerance runs it (cluster/deploy/redis.yaml's
arguments: TLS only, a password, an append-only file), with a CA and a server certificate made here. Debian's
redis-server, which `make test` unpacks into .tools/."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cluster.configs import redis_server_args
from serve_app.runner import free_port

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "s3cret-for-this-test-only"


def write_certificates(folder: Path) -> None:
    """ca.crt, and tls.crt/tls.key signed by it for 127.0.0.1 and localhost: what a cert-manager Secret holds."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))

    def certificate(subject: str, key, issuer: str, issuer_key, extensions) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(validity[0]).not_valid_after(validity[1]))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("imageserve test CA", ca_key, "imageserve test CA", ca_key,
                     [(x509.BasicConstraints(ca=True, path_length=None), True)])
    server = certificate("imageserve-redis", server_key, "imageserve test CA", ca_key, [
        (x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
         False)])
    pem = serialization.Encoding.PEM
    (folder / "ca.crt").write_bytes(ca.public_bytes(pem))
    (folder / "tls.crt").write_bytes(server.public_bytes(pem))
    (folder / "tls.key").write_bytes(server_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def redis_binary() -> tuple[str, dict[str, str]]:
    """redis-server from `make test`'s .tools/ (with the libraries unpacked beside it), or from PATH."""
    configured = os.environ.get("IMAGESERVE_REDIS")
    candidates = [Path(configured)] if configured else []
    for path in [*candidates, ROOT / ".tools/redis/usr/bin/redis-server"]:
        if path.exists():
            libraries = path.parents[1] / "lib" / "x86_64-linux-gnu"
            return str(path), {"LD_LIBRARY_PATH": str(libraries)}
    found = shutil.which("redis-server")
    assert found, "redis-server not found: run `make test`, which unpacks Debian's redis-server into .tools/"
    return found, {}


@dataclass
class RedisServer:
    port: int
    ca_cert: Path

    def tls_socket(self) -> ssl.SSLSocket:
        context = ssl.create_default_context(cafile=str(self.ca_cert))  # verifies the chain and 127.0.0.1
        return context.wrap_socket(socket.create_connection(("127.0.0.1", self.port), timeout=30),
                                   server_hostname="127.0.0.1")


def command(sock: socket.socket, *words: str) -> bytes:
    """One RESP command and the first line of its answer."""
    request = f"*{len(words)}\r\n" + "".join(f"${len(w.encode())}\r\n{w}\r\n" for w in words)
    sock.sendall(request.encode())
    answer = b""
    while not answer.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
    return answer.split(b"\r\n")[0]


@contextmanager
def running_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A TLS, password-protected redis-server on a free loopback port, stopped (by its process group) on exit."""
    tls_dir, data_dir = tmp_path / "tls", tmp_path / "data"
    tls_dir.mkdir()
    data_dir.mkdir()
    write_certificates(tls_dir)
    binary, env = redis_binary()
    port = free_port()
    args = [PASSWORD if a == "$(REDIS_PASSWORD)" else a for a in redis_server_args(str(tls_dir), port, str(data_dir))]
    process = subprocess.Popen([binary, *args, "--bind", "127.0.0.1"], env={**os.environ, **env},
                               start_new_session=True, stdout=open(tmp_path / "redis.log", "w"),
                               stderr=subprocess.STDOUT)
    server = RedisServer(port, tls_dir / "ca.crt")
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (tmp_path / "redis.log").read_text()
            try:
                with server.tls_socket():
                    break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "redis.log").read_text()
                time.sleep(0.2)
        yield server
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
