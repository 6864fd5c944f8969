"""Bearer keys: where the router gets them, and how it checks them without holding them.

Sources, all optional and added together:

- ``IMAGESERVE_API_KEYS`` in the router's environment, comma-separated (a Kubernetes Secret as env);
- ``serving.api_keys_file``: one key per line, ``#`` comments; re-read when it changes, so keys rotate
  without a redeploy (a Secret mounted as a file);
- ``serving.api_key_sha256``: sha256 digests of keys, safe to write in a config;
- ``serving.api_keys``: keys inline in the config, for local runs. They are hashed when the app is
  built, so only digests reach Ray's init args, checkpoints and status; model replicas get nothing.

A source that is configured but holds no key (an empty file, ``IMAGESERVE_API_KEYS=" , "``) refuses
everything rather than leaving the API open. With no source at all the API is open, and says so in
the log. A caller is known by its key's id, the first 8 hex digits of its digest: a bounded label
for logs and metrics that never shows the key.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from pathlib import Path

from serve_app.domain.specs import key_digest

logger = logging.getLogger(__name__)

API_KEYS_ENV = "IMAGESERVE_API_KEYS"
RELOAD_S = 5.0  # how often at most the key file's modification time is checked


def key_id(digest: str) -> str:
    return digest[:8]


def _parse_keys(text: str, separator: str | None) -> list[str]:
    lines = text.split(separator) if separator else text.splitlines()
    return [k.strip() for k in lines if k.strip() and not k.strip().startswith("#")]


class KeyRing:
    """The digests of every accepted key, from the config, the environment and the key file."""

    def __init__(self, digests: tuple[str, ...] = (), keys_file: str | None = None, reload_s: float = RELOAD_S,
                 environ: dict[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        from_env = environ.get(API_KEYS_ENV)
        self._fixed = frozenset(digests) | {key_digest(k) for k in _parse_keys(from_env or "", ",")}
        self.configured = bool(digests) or bool(from_env and from_env.strip()) or keys_file is not None
        if from_env is not None and from_env.strip() and not _parse_keys(from_env, ","):
            logger.error("%s is set but holds no key: every request will be refused", API_KEYS_ENV)
        self._file = Path(keys_file) if keys_file else None
        self._reload_s = reload_s
        self._lock = threading.Lock()
        self._file_digests: frozenset[str] = frozenset()
        self._file_stamp: tuple[int, int] | None = None
        self._checked_at = float("-inf")
        self._reload()
        if not self.configured:
            logger.warning("no API keys configured: every route is open to anyone who can reach it")

    def _reload(self) -> None:
        if self._file is None:
            return
        try:
            stat = self._file.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp != self._file_stamp:
                keys = _parse_keys(self._file.read_text(), None)
                self._file_digests = frozenset(key_digest(k) for k in keys)
                self._file_stamp = stamp
                if not keys:
                    logger.error("the API key file %s holds no key: every request will be refused", self._file)
        except OSError as err:  # a file being replaced, or gone: keep the last keys read, and say so
            logger.error("cannot read the API key file %s (%s); keeping the keys read before", self._file, err)

    def digests(self) -> frozenset[str]:
        now = time.monotonic()
        if self._file is not None and now - self._checked_at >= self._reload_s:
            with self._lock:
                self._checked_at = now
                self._reload()
        return self._fixed | self._file_digests

    def check(self, token: bytes) -> str | None:
        """The key id of ``token`` when it is an accepted key, else None. Every digest is compared (no early
        exit), in constant time, so timing says nothing about which key nearly matched."""
        offered = key_digest(token).encode()
        matched = None
        for digest in sorted(self.digests()):
            if hmac.compare_digest(offered, digest.encode()):
                matched = digest
        return key_id(matched) if matched else None


def refuse_open_non_loopback(keys: KeyRing, host: str, public: bool) -> None:
    """Refuse to serve without keys on an address others can reach, unless the config says it is public."""
    if keys.configured or public or is_loopback(host):
        return
    raise PermissionError(
        f"refusing to serve on {host} with no API keys: anyone who can reach it could use the GPUs. Set "
        f"{API_KEYS_ENV} or serving.api_keys_file (docs/security.md), bind 127.0.0.1, or set serving.public: "
        "true if the endpoint is meant for anyone")


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def config_key_ring(config) -> KeyRing:
    """The keys ``config`` (an AppConfig) gives the router, read here (the CLI's check before start-up)."""
    serving = config.serving
    return KeyRing((*map(key_digest, serving.api_keys), *serving.api_key_sha256), serving.api_keys_file)
