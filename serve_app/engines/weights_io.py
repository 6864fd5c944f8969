"""Reading weights off the disk at the disk's own rate.

``from_pretrained`` maps safetensors files and reads a page only when a tensor first touches it (when the
pipeline moves to the GPU, or converts a dtype), in small read-ahead windows, tensor by tensor. ``prefetch``
reads the same files front to back in large blocks on a thread meanwhile, so those page faults find the
pages in memory: ``python -m bench.load`` measures both against a plain read of the files.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

BLOCK_BYTES = 16 << 20


def weight_files(folder: Path, skip: Sequence[str] = ()) -> list[Path]:
    """The safetensors files of a diffusers pipeline folder, components in ``skip`` left out."""
    return [path for path in sorted(folder.glob("*/*.safetensors")) if path.parent.name not in skip]


def read_through(paths: Sequence[Path], stop: threading.Event | None = None) -> int:
    """Read ``paths`` front to back in large blocks (into the page cache); returns the bytes read."""
    buffer = bytearray(BLOCK_BYTES)
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while (stop is None or not stop.is_set()) and (count := handle.readinto(buffer)):
                total += count
    return total


@contextmanager
def prefetch(paths: Sequence[Path]) -> Iterator[None]:
    """Read ``paths`` on a thread while the block loads them; the block's end waits for the thread (a load that
    failed stops it first)."""
    stop = threading.Event()
    done: dict[str, float] = {}

    def run() -> None:
        started = time.perf_counter()
        try:
            done["bytes"] = read_through(paths, stop)
        except OSError as err:  # the loader reports a missing or unreadable file itself
            logger.debug("prefetch stopped: %s", err)
        done["seconds"] = time.perf_counter() - started

    thread = threading.Thread(target=run, name="imageserve-prefetch", daemon=True)
    thread.start()
    try:
        yield
    except BaseException:
        stop.set()
        raise
    finally:
        thread.join()
    if done.get("bytes"):
        logger.info("prefetched %.2f GB in %.1fs", done["bytes"] / 1e9, done["seconds"])
