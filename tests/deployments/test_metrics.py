"""Replica metrics without Ray: the memory sampler outlives a failed reading."""

import pytest

import deployments.metrics as metrics_module
from deployments.metrics import ReplicaMetrics, error_reason, imageserve_exposition
from serve_app.domain.errors import (
    BadImageError,
    LoraNotFoundError,
    NotReadyError,
    OverloadedError,
    RateLimitedError,
    ReplicaOutOfMemoryError,
    UnsupportedValueError,
)


class StopAfter:
    """Stands in for the sampler's stop event: ``wait`` answers False ``rounds - 1`` times, then True."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds

    def wait(self, timeout: float) -> bool:
        self.rounds -= 1
        return self.rounds <= 0

    def set(self) -> None:
        self.rounds = 0


def test_the_memory_sampler_survives_a_failed_reading(monkeypatch):
    metrics = ReplicaMetrics("generate", "z-image-turbo", "cpu", None, "cpu", sample_memory=False)
    readings = []

    def rss_failing_once() -> int:
        readings.append(1)
        if len(readings) == 1:
            raise OSError("/proc/self/statm: no such file (a reading that fails once)")
        return 123_000_000

    monkeypatch.setattr(metrics_module, "host_rss_bytes", rss_failing_once)
    metrics._stop = StopAfter(3)
    metrics._sample_memory()  # returns only when told to stop; a failure does not end it
    assert len(readings) == 3


@pytest.mark.parametrize("error, reason", [
    (BadImageError("x"), "bad_input"), (OverloadedError("x"), "backpressure"),
    (ReplicaOutOfMemoryError("x"), "oom"), (TimeoutError(), "timeout"), (RuntimeError(), "internal"),
    # A value these models cannot honour, and a LoRA off the list, are the caller's: they were "internal" while the
    # reasons were an isinstance ladder that left them out.
    (UnsupportedValueError("x"), "bad_input"), (LoraNotFoundError("x"), "bad_input"),
    (NotReadyError("x"), "unavailable"), (RateLimitedError("x"), "rate_limited"),
])
def test_error_reasons(error, reason):
    assert error_reason(error) == reason


def test_every_error_kind_says_its_reason():
    import inspect

    from serve_app.domain import errors

    kinds = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.ImageServeError)]
    assert len(kinds) > 10
    assert {kind.reason for kind in kinds} <= {"bad_input", "oom", "cancelled", "backpressure", "rate_limited",
                                               "unavailable", "internal"}


def test_the_exposition_merges_processes_and_drops_rays_process_labels():
    text = (
        '# TYPE ray_imageserve_images_total counter\n'
        'ray_imageserve_images_total{WorkerId="a",variant="v"} 2.0\n'
        '# TYPE ray_imageserve_images_total counter\n'
        'ray_imageserve_images_total{WorkerId="b",variant="w"} 3.0\n'
        '# TYPE ray_serve_other gauge\nray_serve_other 1.0\n'
    )
    out = imageserve_exposition(text)
    assert 'ray_imageserve_images_total{variant="v"} 2.0' in out and 'variant="w"' in out
    assert "WorkerId" not in out and "ray_serve_other" not in out and out.count("# TYPE") == 1


def test_closing_stops_the_memory_sampler():
    metrics = ReplicaMetrics("generate", "z-image-turbo", "cpu", None, "cpu")
    assert metrics._sampler.is_alive()
    metrics.close()
    assert not metrics._sampler.is_alive()

