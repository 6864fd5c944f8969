"""Prometheus metrics, the Ray way: ``ray.serve.metrics`` exported on every node's metrics port.

Ray prefixes every name with ``ray_`` and adds ``application``, ``deployment`` and ``replica`` tags;
so ``imageserve_requests_total`` is scraped as ``ray_imageserve_requests_total``. Labels are task,
variant, gpu_class, pool, stage, status, reason and key_id: never prompts, request ids, seeds or keys.
``key_id`` is 8 hex digits of an HMAC of a configured key's sha256 under the server's key-id secret
(serve_app/api_keys.py), so it has at most one value per configured key and cannot be tested against a guessed
key without that secret. These series name every key's use: ``/metrics`` takes a metrics key, never an API key.

GPU memory series exist only where CUDA does; on a CPU replica they are absent, and
``imageserve_replica_info{device="cpu"}`` says why.
"""

from __future__ import annotations

import logging
import os
import threading

from serve_app.domain import errors
from serve_app.domain.catalog import GIB
from serve_app.domain.schemas import StageTimings

LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600]
STEP_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64]
STAGES = ("queue", "lora_load", "text_encode", "vae_encode", "denoise", "vae_decode", "total")
ERROR_REASONS = ("bad_input", "oom", "timeout", "cancelled", "backpressure", "rate_limited", "unavailable",
                 "internal")
NO_KEY = "none"  # the key_id label of requests without an API key (handle calls, an open endpoint)
MEMORY_PERIOD_S = 5.0

logger = logging.getLogger(__name__)


def host_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def shape_label(width: int, height: int, images: int) -> str:
    """A bounded label for a request shape: megapixels to one decimal and input images."""
    return f"{width * height / 2**20:.1f}MP,{images}img"


class ReplicaMetrics:
    """Metrics of one model replica: latency by stage, outcomes, memory."""

    def __init__(self, task: str, variant: str, gpu_class: str | None, pool: str | None, device: str,
                 sample_memory: bool = True) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.tags = {"task": task, "variant": variant, "gpu_class": gpu_class or "unknown", "pool": pool or "default"}
        keys = tuple(self.tags)
        self.duration = Histogram("imageserve_request_duration_seconds", "Seconds per request, by stage.",
                                  boundaries=LATENCY_BUCKETS, tag_keys=keys + ("stage",))
        self.step = Histogram("imageserve_denoise_step_seconds", "Seconds per denoising step.",
                              boundaries=STEP_BUCKETS, tag_keys=keys)
        self.requests = Counter("imageserve_requests_total", "Requests by outcome.", tag_keys=keys + ("status",))
        self.images = Counter("imageserve_images_total", "Images made.", tag_keys=keys)
        self.batch_images = Histogram("imageserve_batch_images", "Images per pipeline call.",
                                      boundaries=BATCH_BUCKETS, tag_keys=keys)
        self.load_seconds = Gauge("imageserve_model_load_seconds", "Seconds the pipeline took to load.", tag_keys=keys)
        self.rss = Gauge("imageserve_host_rss_bytes", "Resident host memory of the replica.", tag_keys=keys)
        self.info = Gauge("imageserve_replica_info", "1 per replica; device says whether GPU series exist.",
                          tag_keys=keys + ("device", "offload_mode"))
        self.planned_peak = Gauge("imageserve_vram_planned_peak_bytes", "Planner's peak VRAM estimate.",
                                  tag_keys=keys + ("shape",))
        self.measured_peak = Gauge("imageserve_vram_measured_peak_bytes", "Measured peak VRAM of the last request.",
                                   tag_keys=keys + ("shape",))
        self.gpu_memory = Gauge("imageserve_gpu_memory_bytes", "GPU memory: allocated, reserved, free, total.",
                                tag_keys=keys + ("kind",))
        self.partial_images = Counter("imageserve_partial_images_total", "Previews sent to streaming callers.",
                                      tag_keys=keys)
        self.preemptions = Counter("imageserve_batch_preemptions_total", "Batch lines stopped at a denoising step "
                                   "for an interactive request, and requeued.", tag_keys=keys)
        self.lora_uses = Counter("imageserve_lora_uses_total", "Per-request LoRA activations: hit (loaded already), "
                                 "load (into a free slot) or hotswap (replacing the least recently used).",
                                 tag_keys=keys + ("outcome",))
        self.device = device
        self._info_tags: dict[str, str] | None = None
        self._load_seconds: float | None = None
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        if sample_memory:
            self._sampler = threading.Thread(target=self._sample_memory, name="imageserve-memory", daemon=True)
            self._sampler.start()

    def model_loaded(self, seconds: float, offload_mode: str) -> None:
        self.load_seconds.set(seconds, tags=self.tags)
        self._load_seconds = seconds
        self._info_tags = {**self.tags, "device": self.device, "offload_mode": offload_mode}
        self.info.set(1, tags=self._info_tags)

    def observe(self, timings: StageTimings, queue_s: float, steps: int, images: int,
                denoised_images: int) -> None:
        """One finished request. ``denoised_images``: images whose denoising ``denoise_s`` covers
        (a whole batch shares one denoising time; ``n`` edit outputs add theirs up)."""
        self.duration.observe(queue_s, tags={**self.tags, "stage": "queue"})
        for stage in STAGES[1:]:
            if f"{stage}_s" in timings:
                self.duration.observe(timings[f"{stage}_s"], tags={**self.tags, "stage": stage})
        if steps and "denoise_s" in timings:
            self.step.observe(timings["denoise_s"] / steps / max(denoised_images, 1), tags=self.tags)
        self.requests.inc(tags={**self.tags, "status": "ok"})
        self.images.inc(images, tags=self.tags)

    def pipeline_call(self, images: int) -> None:
        self.batch_images.observe(images, tags=self.tags)

    def failed(self) -> None:
        self.requests.inc(tags={**self.tags, "status": "error"})

    def lora_used(self, outcome: str, count: int) -> None:
        self.lora_uses.inc(count, tags={**self.tags, "outcome": outcome})

    def partial_image(self) -> None:
        self.partial_images.inc(tags=self.tags)

    def preempted(self) -> None:
        self.preemptions.inc(tags=self.tags)

    def vram_peak(self, shape: str, planned_gib: float | None, measured_bytes: int | None) -> None:
        if planned_gib is not None:
            self.planned_peak.set(planned_gib * GIB, tags={**self.tags, "shape": shape})
        if measured_bytes is not None:
            self.measured_peak.set(measured_bytes, tags={**self.tags, "shape": shape})

    def sample_memory_once(self) -> None:
        """Set the host RSS and (on CUDA) the GPU memory gauges."""
        import torch

        self.rss.set(host_rss_bytes(), tags=self.tags)
        if self._info_tags is not None:
            # Set again with every sample: a gauge set once was seen missing from Ray's export later in a
            # long test session, while the sampled ones stayed.
            self.info.set(1, tags=self._info_tags)
            self.load_seconds.set(self._load_seconds, tags=self.tags)
        if self.device == "cuda" and torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            for kind, value in (("allocated", torch.cuda.memory_allocated()),
                                ("reserved", torch.cuda.memory_reserved()), ("free", free), ("total", total)):
                self.gpu_memory.set(value, tags={**self.tags, "kind": kind})

    def _sample_memory(self) -> None:
        failures = 0
        while True:
            try:
                self.sample_memory_once()
            except Exception:  # a failed reading (a busy or lost device) must not end the sampling
                failures += 1
                # The first failure with its traceback, then a line now and then: the gauges keep going.
                if failures == 1 or failures % 100 == 0:
                    logger.warning("memory sampling failed (%d times so far)", failures, exc_info=failures == 1)
            if self._stop.wait(MEMORY_PERIOD_S):
                return

    def close(self) -> None:
        """Stop the memory sampler and wait for it: a sampler left running records into Ray's metrics
        after Ray has shut down, which crashes the process (seen at the exit of a test run)."""
        self._stop.set()
        if self._sampler is not None and self._sampler is not threading.current_thread():
            self._sampler.join(timeout=MEMORY_PERIOD_S + 10)


SWAP_BUCKETS = [0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30]


class SwapMetrics:
    """Metrics of a swap replica: swaps between the variants sharing its GPU, their seconds and bytes, and
    which variant is on the GPU."""

    def __init__(self, group: str, gpu_class: str | None, pool: str | None) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.tags = {"group": group, "gpu_class": gpu_class or "unknown", "pool": pool or "default"}
        keys = tuple(self.tags)
        self.swaps = Counter("imageserve_swaps_total", "Swaps between the variants sharing a GPU.",
                             tag_keys=keys + ("from_variant", "to_variant"))
        self.seconds = Histogram("imageserve_swap_seconds", "Seconds per swap (parking the leaving variants and "
                                 "copying the incoming one's weights to the GPU).", boundaries=SWAP_BUCKETS,
                                 tag_keys=keys + ("to_variant",))
        self.bytes = Counter("imageserve_swap_bytes_total", "Weight bytes copied from host RAM to the GPU by swaps.",
                             tag_keys=keys + ("to_variant",))
        self.resident = Gauge("imageserve_resident_variant", "1 for the variant whose weights are on the GPU, 0 for "
                              "the parked ones.", tag_keys=keys + ("variant",))

    def swapped(self, from_variant: str | None, to_variant: str, seconds: float, moved_bytes: int,
                variants: tuple[str, ...]) -> None:
        self.swaps.inc(tags={**self.tags, "from_variant": from_variant or "none", "to_variant": to_variant})
        self.seconds.observe(seconds, tags={**self.tags, "to_variant": to_variant})
        if moved_bytes:
            self.bytes.inc(moved_bytes, tags={**self.tags, "to_variant": to_variant})
        self.on_gpu({to_variant}, variants)

    def on_gpu(self, resident: set[str] | frozenset[str], variants: tuple[str, ...]) -> None:
        for variant in variants:
            self.resident.set(1 if variant in resident else 0, tags={**self.tags, "variant": variant})


class RouterMetrics:
    """Metrics of the router: decisions by pool, retries, errors by reason, queue depth, replicas."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Gauge

        self.decisions = Counter("imageserve_router_decisions_total", "Requests sent, by variant and pool.",
                                 tag_keys=("task", "variant", "pool", "gpu_class"))
        self.retries = Counter("imageserve_router_retries_total", "Requests retried on another pool.",
                               tag_keys=("variant", "from_pool", "to_pool", "reason"))
        self.errors = Counter("imageserve_errors_total", "Failed requests by reason.",
                              tag_keys=("task", "variant", "reason"))
        self.queue = Gauge("imageserve_router_queue_depth", "Requests this router has outstanding, by pool.",
                           tag_keys=("variant", "pool"))
        self.replicas = Gauge("imageserve_pool_replicas", "Running replicas, by variant and pool.",
                              tag_keys=("variant", "pool", "gpu_class"))
        self.key_requests = Counter("imageserve_key_requests_total", "Requests by API key id and outcome.",
                                    tag_keys=("key_id", "task", "status"))
        self.key_cost = Counter("imageserve_key_cost_total", "Megapixel-steps served, by API key id.",
                                tag_keys=("key_id", "task"))
        self.streams = Counter("imageserve_streams_total", "Streamed requests by outcome (ok or an error reason).",
                               tag_keys=("task", "status"))
        self.batch_lines = Gauge("imageserve_batch_lines", "Batch lines queued and running, in every unfinished "
                                 "batch (the shared store's count: take max over router replicas).",
                                 tag_keys=("state",))
        self.batch_backlog_age = Gauge("imageserve_batch_backlog_age_seconds",
                                       "Age of the oldest unfinished batch line (max over router replicas).")
        self.batch_answers = Counter("imageserve_batch_answers_total", "Batch lines answered, completed or failed.",
                                     tag_keys=("outcome",))

    def batch_backlog(self, queued: int, running: int, age_s: float) -> None:
        self.batch_lines.set(queued, tags={"state": "queued"})
        self.batch_lines.set(running, tags={"state": "running"})
        self.batch_backlog_age.set(age_s)

    def batch_line(self, outcome: str) -> None:
        self.batch_answers.inc(tags={"outcome": outcome})

    def keyed(self, key_id: str | None, task: str, status: str, cost: float = 0.0) -> None:
        """One answered request of ``key_id``: ``status`` is ok or an error reason."""
        key = key_id or NO_KEY
        self.key_requests.inc(tags={"key_id": key, "task": task, "status": status})
        if cost:
            self.key_cost.inc(cost, tags={"key_id": key, "task": task})

    def error(self, task: str, variant: str | None, reason: str) -> None:
        self.errors.inc(tags={"task": task, "variant": variant or "unresolved", "reason": reason})


def replica_id() -> str | None:
    """This Serve replica's unique id; None outside a replica (unit tests, benchmarks)."""
    from ray import serve

    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica there is no context
        return None


def error_reason(err: BaseException) -> str:
    """The ``reason`` label of an error: the error's own (``ImageServeError.reason``)."""
    if isinstance(err, errors.ImageServeError):
        return err.reason
    if isinstance(err, TimeoutError):
        return "timeout"
    return "internal"


# Labels Ray adds to identify the exporting process; Serve's application/deployment/replica tags
# already tell series apart, and these camelCase names fail Prometheus' naming lint.
RAY_PROCESS_LABELS = frozenset({"Component", "NodeAddress", "SessionName", "Version", "WorkerId",
                                "otel_scope_name", "otel_scope_schema_url", "otel_scope_version"})


def imageserve_exposition(ray_text: str, prefix: str = "ray_imageserve_") -> str:
    """imageserve's families from a node's Ray metrics export, merged across processes and re-rendered
    with prometheus-client (each replica process exports its own copy of a family)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    merged: dict[str, Metric] = {}
    seen: set[tuple] = set()
    for family in text_string_to_metric_families(ray_text):
        if not family.name.startswith(prefix):
            continue
        target = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k not in RAY_PROCESS_LABELS}
            key = (sample.name, tuple(sorted(labels.items())))
            if key not in seen:
                seen.add(key)
                target.add_sample(sample.name, labels, sample.value)

    class _Merged:
        def collect(self):
            return list(merged.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry).decode()


def fetch_node_metrics(port: int) -> str:
    """This node's Ray metrics export (``metrics_export_port``) as imageserve's exposition."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return imageserve_exposition(response.read().decode())
