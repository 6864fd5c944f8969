"""Run imageserve on a private local Ray: ``imageserve run`` and the integration tests use this.

The Ray cluster is our own (a fresh ``RAY_TMPDIR``, ``address="local"``), so starting and
stopping it never touches anybody else's Ray processes. It is locked with Ray token auth and a token
only this user can read, because its GCS listens on the machine's address: without a token anyone who
can reach that port could run code in it.
"""

from __future__ import annotations

import logging
import os
import re
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


# torchao warns at import, in every process that imports diffusers, that its C++ extensions were built for another
# torch. Only the fp8 variants use torchao; where none is served the line says nothing about what runs.
TORCHAO_EXTENSIONS_NOTICE = "Skipping import of cpp extensions"
# Set (to "1") in the replicas' environment when no served variant uses torchao (quiet_worker_logs reads it).
QUIET_TORCHAO_ENV = "IMAGESERVE_QUIET_TORCHAO"
# Serve logs this whenever serve.run follows serve.start, as deploy() always does on the clusters started here:
# serve.run has no HTTP options to drop, so on a fresh cluster the notice is wrong.
SERVE_RECONNECT_NOTICE = "Connecting to existing Serve app"
# Ray system config of the clusters started here: serve.shutdown() ends with the controller killing itself while the
# driver's graceful_shutdown call is still open, and Ray then prints that the call "failed ... will be retried" on
# every clean stop.
QUIET_SHUTDOWN_SYSTEM_CONFIG = {"enable_output_error_log_if_still_retry": False}
SLOW_STARTUP_ENV = "RAY_SERVE_SLOW_STARTUP_WARNING_S"
PROBE_ACCESS_LINE = re.compile(r"\b(GET|HEAD) \S*/(readyz|healthz) \d{3} ")


class _DropRecords(logging.Filter):
    """A logging filter that drops the records ``unwanted`` says yes to; ``key`` keeps it to one per logger."""

    def __init__(self, key: str, unwanted: Callable[[logging.LogRecord], bool]) -> None:
        super().__init__()
        self.key = key
        self.unwanted = unwanted

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.unwanted(record)


def _drop(logger_name: str, key: str, unwanted: Callable[[logging.LogRecord], bool]) -> None:
    target = logging.getLogger(logger_name)
    if not any(getattr(f, "key", None) == key for f in target.filters):
        target.addFilter(_DropRecords(key, unwanted))


def quiet_torchao_notice() -> None:
    """Drop torchao's import-time notice about its C++ extensions (call before torchao is imported)."""
    _drop("torchao", "imageserve-torchao-notice", lambda r: r.getMessage().startswith(TORCHAO_EXTENSIONS_NOTICE))


def quiet_serve_reconnect_notice() -> None:
    _drop("ray.serve", "imageserve-reconnect-notice", lambda r: r.getMessage().startswith(SERVE_RECONNECT_NOTICE))


def _serve_noise(record: logging.LogRecord) -> bool:
    """A replica's Serve record that ``imageserve run`` leaves out: an access line of the readiness or liveness
    probe (the start-up poll alone made a dozen), or Serve's own INFO; requests' access lines stay."""
    if getattr(record, "serve_access_log", False):
        return bool(PROBE_ACCESS_LINE.search(record.getMessage()))
    return record.levelno < logging.WARNING


def quiet_worker_logs() -> None:
    """Ray's ``worker_process_setup_hook`` of the clusters ``imageserve run`` starts: each replica leaves out
    ``_serve_noise``, and torchao's import notice where no served variant uses torchao."""
    _drop("ray.serve", "imageserve-replica-noise", _serve_noise)
    if os.environ.get(QUIET_TORCHAO_ENV) == "1":
        quiet_torchao_notice()


def uses_torchao(config: AppConfig) -> bool:
    catalog = config.build_catalog()
    return any(catalog.variant(v).precision == "fp8" for v in config.models_to_load())


# Ports this process has handed out: each is picked once, so two servers started together never share one.
_handed_out: set[int] = set()
# Above Ray's worker ports (its --min-worker-port/--max-worker-port defaults, 10002-19999).
_FIRST_FREE_PORT = 20000


def _ephemeral_ports_start() -> int:
    """The first port the kernel hands out for ``bind(port 0)`` (Linux: net.ipv4.ip_local_port_range)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            return int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default, and what IANA reserves for dynamic ports from 49152 is above it


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for private clusters, test servers, Prometheus), chosen
    below the kernel's ephemeral range. A port taken with ``bind(port 0)`` and released is the kernel's to
    give again, and Ray's raylet, agents and workers all bind port 0 while a cluster starts: one took the
    HTTP port a test had just picked that way, and Serve's proxy could not bind it. A random port between
    Ray's worker ports and the ephemeral range, bound once here to see that it is free, is not one the
    kernel hands out."""
    import random
    import socket

    last = _ephemeral_ports_start() - 1
    for _ in range(200) if last > _FIRST_FREE_PORT else ():
        port = random.randint(_FIRST_FREE_PORT, last)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as sock:  # no room below the ephemeral range: the kernel's pick
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


class DeployFailed(RuntimeError):
    """An application did not start; ``reason`` is one line: the failed deployment and its error's last line."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def failure_reason(app_name: str) -> str:
    """One line for why ``app_name`` failed to deploy: each failed deployment and the last line of its error
    (Serve's messages carry the replica's whole traceback, whose last line names the exception)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return f"application {app_name} is gone"
    failed = [(name, d.message) for name, d in app.deployments.items() if d.status in ("DEPLOY_FAILED", "UNHEALTHY")]
    if not failed:
        return _last_line(app.message) or f"application {app_name} is {app.status}"
    return "; ".join(f"{name} did not start: {_last_line(message)}" for name, message in failed)


def _last_line(message: str) -> str:
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    if not lines:
        return ""
    # "serve_app.engines.protocol.IncompatibleHardwareError: ..." -> "IncompatibleHardwareError: ..."
    return re.sub(r"^(?:[A-Za-z_][\w]*\.)+(?=[A-Za-z_]\w*(?:Error|Exception)\b)", "", lines[-1])


def deploy(config: AppConfig, loaders: dict[str, Any] | None = None, route_prefix: str | None = None,
           timeout_s: float = 300) -> None:
    """Deploy ``config``'s application on the Serve instance this driver is connected to, and wait
    until it is RUNNING (a failed deployment raises ``DeployFailed`` with Serve's reason)."""
    from ray import serve

    from serve_app.builder import build_app_from_config

    quiet_serve_reconnect_notice()
    name = config.serving.app_name
    try:
        serve.run(build_app_from_config(config, loaders), name=name,
                  route_prefix=route_prefix or config.serving.route_prefix, blocking=False)
    except RuntimeError as err:  # serve.run waits for RUNNING, and its error names the deployments, not why
        raise DeployFailed(f"deployment failed: {err}", failure_reason(name)) from err
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(name)
        if app is not None and app.status == "RUNNING":
            return
        if app is not None and app.status == "DEPLOY_FAILED":
            raise DeployFailed(f"deployment failed: {app.message}", failure_reason(name))
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
                 log_to_driver: bool = True, metrics_report_interval_ms: int | None = None,
                 quiet: bool = False) -> None:
        """``quiet``: Serve's controller and proxy log warnings and errors only, and the replicas' access lines of
        /readyz and /healthz and library import notices are left out (``quiet_worker_logs``)."""
        self.config = config
        self.quiet = quiet
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
        self.start_timeout_s = 300.0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 300, after_ray_init: Callable[[], None] | None = None,
              loaders: dict[str, Any] | None = None) -> LocalService:
        from ray import serve

        if self.quiet:  # this driver's own Serve notices ("Started Serve", "... is ready at"): the caller says it
            logging.getLogger("ray.serve").setLevel(logging.WARNING)
        self.start_timeout_s = timeout_s
        self.start_ray()
        if after_ray_init is not None:
            after_ray_init()
        http_options = {"host": self.host, "port": self.port, **self.extra_http_options}
        if self.config.serving.request_timeout_s:
            http_options["request_timeout_s"] = self.config.serving.request_timeout_s
        serve.start(http_options=http_options, proxy_location="HeadOnly",
                    logging_config={"log_level": "WARNING"} if self.quiet else None)
        deploy(self.config, loaders, timeout_s=timeout_s)
        wait_until_ready(f"{self.url}{self.config.serving.route_prefix.rstrip('/')}/readyz", timeout_s)
        return self

    def start_ray(self) -> str:
        """Start the private, token-locked Ray cluster (no Serve yet); returns its GCS address."""
        # Short path: Ray's unix sockets live under it and must stay under ~100 characters.
        self.tmpdir = tempfile.mkdtemp(prefix="isv-ray-", dir="/tmp")
        os.environ["RAY_TMPDIR"] = self.tmpdir
        self.auth_token_path = lock_private_ray(self.tmpdir)
        os.environ.setdefault("HF_HUB_OFFLINE", "1" if self.config.hf.offline else "0")
        # Serve's proxy, started by this cluster's raylet, inherits it: the proxy then refuses its own /-/routes,
        # which would tell anyone every application's route and name (serve_app/proxy_guard.py).
        os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
        system_config: dict[str, Any] = dict(QUIET_SHUTDOWN_SYSTEM_CONFIG)
        if self.metrics_report_interval_ms:
            system_config["metrics_report_interval_ms"] = self.metrics_report_interval_ms
        runtime_env: dict[str, Any] = {"env_vars": worker_env(os.environ["HF_HUB_OFFLINE"] == "1")}
        if self.quiet:
            runtime_env["worker_process_setup_hook"] = f"{__name__}.quiet_worker_logs"
            if not uses_torchao(self.config):
                runtime_env["env_vars"][QUIET_TORCHAO_ENV] = "1"
        # Serve's controller warns every 30 s of a replica still starting (Ray 2.60 deployment_state.py,
        # SLOW_STARTUP_WARNING_S), which on a CPU start of the embedded default's four replicas, or while 20B weights
        # load from disk, says only what this runner says by waiting for /readyz. Quiet, it warns once a replica has
        # taken longer than the start is given. The raylet, and so the controller, take the environment of ray.init.
        previous = os.environ.get(SLOW_STARTUP_ENV)
        if self.quiet:
            os.environ[SLOW_STARTUP_ENV] = str(int(self.start_timeout_s))
        try:
            context = self._init_ray(system_config, runtime_env)
        finally:
            if previous is None:
                os.environ.pop(SLOW_STARTUP_ENV, None)
            else:
                os.environ[SLOW_STARTUP_ENV] = previous
        self.started = True
        self.gcs_address = context.address_info["gcs_address"]
        return self.gcs_address

    def _init_ray(self, system_config: dict[str, Any], runtime_env: dict[str, Any]):
        import ray

        return ray.init(
            address="local",
            _temp_dir=self.tmpdir,
            num_cpus=self.num_cpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=self.log_to_driver,
            _system_config=system_config,
            runtime_env=runtime_env,
        )

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


def example_requests(url: str, keyed: bool = False) -> str:
    """What ``imageserve run`` prints once it answers: requests to try; with ``keyed``, carrying a key."""
    key = ' -H "Authorization: Bearer $IMAGESERVE_KEY"' if keyed else ""
    lines = [f"imageserve is answering at {url}"]
    if keyed:
        lines.append("  (the /v1 routes need one of the configured API keys: export IMAGESERVE_KEY=<key> first)")
    lines += [
        f"  curl -s {url}/v1/models{key} | python3 -m json.tool",
        f"  curl -s {url}/v1/images/generations{key} -H 'Content-Type: application/json' \\",
        f"       -d '{_GENERATE_BODY}' \\",
        f"    | python3 -c '{_SAVE_FIRST_IMAGE}'",
        f"  curl -s {url}/v1/images/edits{key} -F model=qwen-image-edit -F prompt='make it blue' -F image=@out.png \\",
        "       -F size=256x256",
        f"Or open {url}/ui in a browser: the console (docs/console.md).",
        "Stop with Ctrl-C.",
    ]
    return "\n".join(lines)


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def interrupt_on_signals() -> dict[int, Any]:
    """Make SIGINT and SIGTERM raise KeyboardInterrupt; returns the previous handlers.

    Call it after ``ray.init``, which installs a SIGTERM handler that exits without cleanup.
    """
    return {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}


def run_foreground(config: AppConfig, loaders: dict[str, Any] | None = None, keyed: bool = False,
                   verbose: bool = False) -> int:
    """Serve until SIGINT or SIGTERM (also during start-up), then shut Serve and Ray down cleanly.
    ``loaders``: variant id -> engine loader (``imageserve run --tiny``'s test doubles); ``keyed``: the config
    asks for API keys (the example requests carry one); ``verbose``: Serve's own INFO logs and every access line."""
    service = LocalService(config, quiet=not verbose)
    previous: dict[int, Any] = {}

    def take_signals() -> None:
        previous.update(interrupt_on_signals())

    code = 0
    try:
        service.start(after_ray_init=take_signals, loaders=loaders)
        if service.auth_token_path:
            print(f"Ray at {service.gcs_address} requires its token (RAY_AUTH_MODE=token "
                  f"RAY_AUTH_TOKEN_PATH={service.auth_token_path})", flush=True)
        print(example_requests(service.url, keyed), flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping imageserve ...", flush=True)
    except DeployFailed as err:
        print(f"imageserve run: {err.reason}", file=sys.stderr, flush=True)
        code = 1
    except TimeoutError as err:
        print(f"imageserve run: {err}: a replica is still loading or has no node to run on; `imageserve run "
              "--verbose` shows what Serve is doing", file=sys.stderr, flush=True)
        code = 1
    finally:
        service.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("stopped; the private Ray cluster is shut down", flush=True)
    return code
