"""Run imageserve on a private local Ray: ``imageserve run`` and the integration tests use this.

The Ray cluster is our own (a fresh ``RAY_TMPDIR``, ``address="local"``), so starting and
stopping it never touches anybody else's Ray processes. It is locked with Ray token auth and a token
only this user can read, because its GCS listens on the machine's address: without a token anyone who
can reach that port could run code in it.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from serve_app.domain.config import AppConfig
from serve_app.proxy_guard import PROXY_CALLBACK, PROXY_CALLBACK_ENV

logger = logging.getLogger(__name__)


# Set (to "1") when RAY_AUTH_MODE in this process's environment is ours, not the user's or a test's.
_GENERATED_AUTH_MARKER = "IMAGESERVE_GENERATED_RAY_AUTH"


def lock_private_ray(tmpdir: str) -> str | None:
    """Turn on Ray token auth for the cluster this process is about to start, with a fresh token in
    ``tmpdir/auth_token`` (mode 0600), and return that path.

    Ray's processes inherit this process's environment, so the GCS, raylets and workers all require
    the token. An explicit ``RAY_AUTH_MODE`` in the environment wins (the tests set ``disabled``; an
    operator may point ``RAY_AUTH_TOKEN_PATH`` at a token of their own); then this returns None.
    """
    if os.environ.get("RAY_AUTH_MODE") and os.environ.get(_GENERATED_AUTH_MARKER) != "1":
        return None
    path = os.path.join(tmpdir, "auth_token")
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as token_file:
        token_file.write(secrets.token_hex(32))
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": path, _GENERATED_AUTH_MARKER: "1"})
    os.environ.pop("RAY_AUTH_TOKEN", None)  # it would win over the file
    refresh_ray_auth_config()
    return path


def refresh_ray_auth_config() -> None:
    """Make this process's Ray see the RAY_AUTH_* environment as it is now.

    Ray reads the auth mode into its config when it loads and caches the token; a process that imported
    Ray before changing them would start a token-locked GCS it cannot talk to itself. Ray's own
    ``enable_token_auth_by_default`` refreshes the same two caches.
    """
    if "ray._raylet" in sys.modules:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def worker_env(offline: bool = True) -> dict[str, str]:
    """Environment of every replica process: the Hub only when the config allows it, quiet tokenizers."""
    return {"HF_HUB_OFFLINE": "1" if offline else "0", "TOKENIZERS_PARALLELISM": "false"}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for private clusters, test servers, Prometheus)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class PrivateRayCluster:
    """Base of every Ray cluster this project starts for itself (service, simulated fleet, autoscaler).

    One teardown order for all of them: Serve, then this driver's Ray connection, then whatever
    processes the cluster owns (``_stop_processes``), then its private ``RAY_TMPDIR``. A failing step
    does not keep the later ones from running.
    """

    tmpdir: str | None = None

    def start(self) -> PrivateRayCluster:
        raise NotImplementedError

    def _stop_processes(self) -> None:
        """Stop the processes this cluster started itself (after Ray is disconnected)."""

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            try:
                if ray.is_initialized():
                    serve.shutdown()
            except Exception:
                logger.warning("serve.shutdown failed; shutting Ray down anyway", exc_info=True)
            ray.shutdown()
            self._stop_processes()
        finally:
            if self.tmpdir:
                shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def deploy(config: AppConfig, loaders: dict[str, Any] | None = None, route_prefix: str | None = None,
           timeout_s: float = 300) -> None:
    """Deploy ``config``'s application on the Serve instance this driver is connected to, and wait
    until it is RUNNING (a failed deployment raises with Serve's reason)."""
    from ray import serve

    from serve_app.builder import build_app_from_config

    name = config.serving.app_name
    serve.run(build_app_from_config(config, loaders), name=name,
              route_prefix=route_prefix or config.serving.route_prefix, blocking=False)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(name)
        if app is not None and app.status == "RUNNING":
            return
        if app is not None and app.status == "DEPLOY_FAILED":
            raise RuntimeError(f"deployment failed: {app.message}")
        time.sleep(0.5)
    raise TimeoutError(f"{name} was not RUNNING after {timeout_s}s")


def wait_until_ready(readyz_url: str, timeout_s: float = 300) -> None:
    """Wait until ``readyz_url`` answers 200: every served variant has a running replica."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(readyz_url, timeout=10) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as err:
            last = f"{err.code}: {err.read().decode(errors='replace')[:500]}"
        except OSError as err:  # not listening yet
            last = str(err)
        time.sleep(0.5)
    raise TimeoutError(f"{readyz_url} was not ready after {timeout_s}s ({last})")


class LocalService(PrivateRayCluster):
    """A local Ray cluster with imageserve deployed on it; use as a context manager."""

    def __init__(self, config: AppConfig, host: str | None = None, port: int | None = None,
                 num_cpus: int | None = None, extra_http_options: dict[str, Any] | None = None,
                 log_to_driver: bool = True, metrics_report_interval_ms: int | None = None) -> None:
        self.config = config
        self.host = host or config.serving.host
        self.port = port if port is not None else config.serving.port
        self.num_cpus = num_cpus
        self.extra_http_options = extra_http_options or {}
        self.log_to_driver = log_to_driver
        self.metrics_report_interval_ms = metrics_report_interval_ms
        self.tmpdir: str | None = None
        self.auth_token_path: str | None = None
        self.gcs_address: str | None = None
        self.started = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 300, after_ray_init: Callable[[], None] | None = None,
              loaders: dict[str, Any] | None = None) -> LocalService:
        from ray import serve

        self.start_ray()
        if after_ray_init is not None:
            after_ray_init()
        http_options = {"host": self.host, "port": self.port, **self.extra_http_options}
        if self.config.serving.request_timeout_s:
            http_options["request_timeout_s"] = self.config.serving.request_timeout_s
        serve.start(http_options=http_options, proxy_location="HeadOnly")
        deploy(self.config, loaders, timeout_s=timeout_s)
        wait_until_ready(f"{self.url}{self.config.serving.route_prefix.rstrip('/')}/readyz", timeout_s)
        return self

    def start_ray(self) -> str:
        """Start the private, token-locked Ray cluster (no Serve yet); returns its GCS address."""
        import ray

        # Short path: Ray's unix sockets live under it and must stay under ~100 characters.
        self.tmpdir = tempfile.mkdtemp(prefix="isv-ray-", dir="/tmp")
        os.environ["RAY_TMPDIR"] = self.tmpdir
        self.auth_token_path = lock_private_ray(self.tmpdir)
        os.environ.setdefault("HF_HUB_OFFLINE", "1" if self.config.hf.offline else "0")
        # Serve's proxy, started by this cluster's raylet, inherits it: the proxy then refuses its own /-/routes,
        # which would tell anyone every application's route and name (serve_app/proxy_guard.py).
        os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
        context = ray.init(
            address="local",
            _temp_dir=self.tmpdir,
            num_cpus=self.num_cpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=self.log_to_driver,
            _system_config=(
                {"metrics_report_interval_ms": self.metrics_report_interval_ms}
                if self.metrics_report_interval_ms else None
            ),
            runtime_env={"env_vars": worker_env(os.environ["HF_HUB_OFFLINE"] == "1")},
        )
        self.started = True
        self.gcs_address = context.address_info["gcs_address"]
        return self.gcs_address

    def add_application(self, config: AppConfig, route_prefix: str, loaders: dict[str, Any] | None = None,
                        timeout_s: float = 300) -> None:
        """Deploy another imageserve application (its own config) on the same Serve instance."""
        deploy(config, loaders, route_prefix=route_prefix, timeout_s=timeout_s)

    def stop(self) -> None:
        if self.started:
            self.started = False
            super().stop()


_GENERATE_BODY = '{"model": "z-image-turbo", "prompt": "a lighthouse at dusk", "size": "256x256", "seed": 1}'
_SAVE_FIRST_IMAGE = ('import sys,json,base64; '
                     'open("out.png","wb").write(base64.b64decode(json.load(sys.stdin)["data"][0]["b64_json"]))')


def example_requests(url: str) -> str:
    return (
        f"imageserve is answering at {url}\n"
        f"  curl -s {url}/v1/models | python3 -m json.tool\n"
        f"  curl -s {url}/v1/images/generations -H 'Content-Type: application/json' \\\n"
        f"       -d '{_GENERATE_BODY}' \\\n"
        f"    | python3 -c '{_SAVE_FIRST_IMAGE}'\n"
        f"  curl -s {url}/v1/images/edits -F model=qwen-image-edit -F prompt='make it blue' -F image=@out.png \\\n"
        "       -F size=256x256\n"
        "Stop with Ctrl-C."
    )


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def interrupt_on_signals() -> dict[int, Any]:
    """Make SIGINT and SIGTERM raise KeyboardInterrupt; returns the previous handlers.

    Call it after ``ray.init``, which installs a SIGTERM handler that exits without cleanup.
    """
    return {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}


def run_foreground(config: AppConfig, loaders: dict[str, Any] | None = None) -> int:
    """Serve until SIGINT or SIGTERM (also during start-up), then shut Serve and Ray down cleanly.
    ``loaders``: variant id -> engine loader (``imageserve run --tiny``'s test doubles)."""
    service = LocalService(config)
    previous: dict[int, Any] = {}

    def take_signals() -> None:
        previous.update(interrupt_on_signals())

    try:
        service.start(after_ray_init=take_signals, loaders=loaders)
        if service.auth_token_path:
            print(f"Ray at {service.gcs_address} requires its token (RAY_AUTH_MODE=token "
                  f"RAY_AUTH_TOKEN_PATH={service.auth_token_path})", flush=True)
        print(example_requests(service.url), flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping imageserve ...", flush=True)
    finally:
        service.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("stopped; the private Ray cluster is shut down", flush=True)
    return 0
