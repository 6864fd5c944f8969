"""Bearer keys: where the router gets them, and how it checks them without holding them.

Sources, all optional and added together:

- ``IMAGESERVE_API_KEYS`` in the router's environment, comma-separated (a Kubernetes Secret as env);
- ``serving.api_keys_file``: one key per line, ``#`` comments; re-read when it changes, so keys rotate
  without a redeploy (a Secret mounted as a file);
- ``serving.api_key_sha256``: sha256 digests of keys, safe to write in a config;
- ``serving.api_keys``: keys inline in the config, for local runs. They are hashed when the app is
  built, so only digests reach Ray's init args, checkpoints and status; model replicas get nothing.

A source that is configured but holds no key (an empty file, ``IMAGESERVE_API_KEYS=" , "``) refuses
everything rather than leaving the API open. A configured key file that cannot be read (deleted, turned
into a folder, unreadable) refuses everything too, until it can be read again: the last keys read are not
kept, since deleting the file may be how an operator revoked them. With no source at all the API is open,
and says so in the log.

Metrics keys (``IMAGESERVE_METRICS_KEYS``, ``serving.metrics_key_sha256``) are a second ring: they open
``/metrics`` and nothing else, and API keys do not open ``/metrics``.

A caller is known by its key's id: 8 hex digits of an HMAC-SHA256 of the key's digest under a server secret
(``key_id_secret``), a bounded label for logs, metrics and per-key limits. Without the secret, a leaked id
says nothing about the key: a guessable key cannot be tested offline against it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from pathlib import Path

from serve_app.domain.specs import key_digest

logger = logging.getLogger(__name__)

API_KEYS_ENV = "IMAGESERVE_API_KEYS"
METRICS_KEYS_ENV = "IMAGESERVE_METRICS_KEYS"
KEY_ID_SECRET_ENV = "IMAGESERVE_KEY_ID_SECRET"
# Where the cluster keeps the key-id secret it made itself (Ray's internal KV lives in the GCS, and so in its
# Redis under GCS fault tolerance): every router replica of every imageserve application reads the same one.
KEY_ID_SECRET_KV_NAMESPACE = "imageserve"
KEY_ID_SECRET_KV_KEY = b"key-id-secret"
MIN_KEY_ID_SECRET_CHARS = 32  # what `openssl rand -hex 16` prints: 128 bits, past any offline search
RELOAD_S = 5.0  # how often at most the key file's modification time is checked


def key_id(digest: str, secret: bytes) -> str:
    """The id of the key whose sha256 is ``digest``: 8 hex digits of HMAC-SHA256(secret, digest)."""
    return hmac.new(secret, digest.encode(), hashlib.sha256).hexdigest()[:8]


def key_id_secret(environ: dict[str, str] | None = None) -> bytes:
    """The secret key ids are made under, the same in every router replica so their logs and metrics agree.

    1. ``IMAGESERVE_KEY_ID_SECRET`` in the router's environment (a Kubernetes Secret as env): ids stay the same
       across clusters and rebuilds, and an operator holding it can name a key's id offline. At least 32
       characters; a shorter one refuses to start.
    2. Otherwise the cluster's own: 32 random bytes the first router replica stores in Ray's internal KV,
       read by every other one. Stable for the life of the cluster's GCS (across redeploys and router restarts).
    3. Outside Ray (unit tests, the CLI's pre-start checks): random for this process.
    """
    environ = os.environ if environ is None else environ
    configured = environ.get(KEY_ID_SECRET_ENV)
    if configured is not None:
        if len(configured.strip()) < MIN_KEY_ID_SECRET_CHARS:
            raise ValueError(f"{KEY_ID_SECRET_ENV} must hold at least {MIN_KEY_ID_SECRET_CHARS} characters (e.g. the "
                             "output of `openssl rand -hex 32`): a short secret can be searched for")
        return configured.strip().encode()
    import ray

    if not ray.is_initialized():
        return secrets.token_bytes(32)
    return cluster_key_id_secret()


def cluster_key_id_secret() -> bytes:
    """The cluster's key-id secret, made by whichever caller comes first: a put that never overwrites, then a read,
    so replicas starting together all end up with the winner's."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put

    _internal_kv_put(KEY_ID_SECRET_KV_KEY, secrets.token_hex(32).encode(), overwrite=False,
                     namespace=KEY_ID_SECRET_KV_NAMESPACE)
    return _internal_kv_get(KEY_ID_SECRET_KV_KEY, namespace=KEY_ID_SECRET_KV_NAMESPACE)


def _parse_keys(text: str, separator: str | None) -> list[str]:
    lines = text.split(separator) if separator else text.splitlines()
    return [k.strip() for k in lines if k.strip() and not k.strip().startswith("#")]


class KeyRing:
    """The digests of every accepted key, from the config, the environment and the key file.

    Args:
        id_secret: the secret key ids are made under (``key_id_secret``); random when not given, for rings whose
            ids nobody compares (the CLI's check before start-up).
        env_var: the environment variable of comma-separated keys this ring reads.
        warn_if_open: log a warning when no source is configured (the API ring: an open endpoint).
    """

    def __init__(self, digests: tuple[str, ...] = (), keys_file: str | None = None, reload_s: float = RELOAD_S,
                 environ: dict[str, str] | None = None, id_secret: bytes | None = None,
                 env_var: str = API_KEYS_ENV, warn_if_open: bool = True) -> None:
        environ = os.environ if environ is None else environ
        from_env = environ.get(env_var)
        self._id_secret = id_secret if id_secret is not None else secrets.token_bytes(32)
        self._fixed = frozenset(digests) | {key_digest(k) for k in _parse_keys(from_env or "", ",")}
        self.configured = bool(digests) or bool(from_env and from_env.strip()) or keys_file is not None
        if from_env is not None and from_env.strip() and not _parse_keys(from_env, ","):
            logger.error("%s is set but holds no key: every request will be refused", env_var)
        self._file = Path(keys_file) if keys_file else None
        self._reload_s = reload_s
        self._lock = threading.Lock()
        self._file_digests: frozenset[str] = frozenset()
        self._file_stamp: tuple[int, int] | None = None
        self._file_error: str | None = None  # why the key file cannot be read now; None while it can
        self._checked_at = float("-inf")
        self._reload()
        if not self.configured and warn_if_open:
            logger.warning("no API keys configured: every route is open to anyone who can reach it")

    def _reload(self) -> None:
        if self._file is None:
            return
        try:
            stat = self._file.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp == self._file_stamp:
                return
            keys = _parse_keys(self._file.read_text(), None)
        except (OSError, UnicodeDecodeError) as err:
            # Fail closed: a file that is gone may have been deleted to revoke its keys. Logged once per outage,
            # not once per request.
            if self._file_error is None:
                logger.error("cannot read the API key file %s (%s): every request is refused until it can be "
                             "read again", self._file, err)
            self._file_error = f"{type(err).__name__}: {getattr(err, 'strerror', None) or err}"
            self._file_digests = frozenset()
            self._file_stamp = None  # whatever comes back is read afresh
            return
        if self._file_error is not None:
            logger.warning("the API key file %s can be read again (%d key%s): requests are checked against it",
                           self._file, len(keys), "" if len(keys) == 1 else "s")
        self._file_error = None
        self._file_digests = frozenset(key_digest(k) for k in keys)
        self._file_stamp = stamp
        if not keys:
            logger.error("the API key file %s holds no key: every request will be refused", self._file)

    def _refresh(self) -> None:
        now = time.monotonic()
        if self._file is not None and now - self._checked_at >= self._reload_s:
            with self._lock:
                self._checked_at = now
                self._reload()

    def unavailable(self) -> str | None:
        """Why this ring cannot check keys now (its key file cannot be read), or None when it can."""
        self._refresh()
        return None if self._file_error is None else f"the API key file cannot be read ({self._file_error})"

    def digests(self) -> frozenset[str]:
        """Every accepted digest; none at all while a configured key file cannot be read."""
        self._refresh()
        if self._file_error is not None:
            return frozenset()
        return self._fixed | self._file_digests

    def check(self, token: bytes) -> str | None:
        """The key id of ``token`` when it is an accepted key, else None. Every digest is compared (no early
        exit), in constant time, so timing says nothing about which key nearly matched."""
        offered = key_digest(token).encode()
        matched = None
        for digest in sorted(self.digests()):
            if hmac.compare_digest(offered, digest.encode()):
                matched = digest
        return key_id(matched, self._id_secret) if matched else None


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
