"""File contents of the Batch API: bytes under a folder that every router replica mounts, whichever store holds
the files' rows (``deployments.batch_store``, ``deployments.batch_store_redis``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from serve_app.domain.batches import new_id


def write_contents(files_dir: Path, data: bytes, **fields: Any) -> dict[str, Any]:
    """A new file's row (``fields`` and its id, size and creation time), its bytes written under ``files_dir`` and
    renamed into place before any store records the row: no row ever names a partial file. Both stores keep file
    contents this way, on the volume every router replica mounts."""
    file_id = new_id("file-")
    partial = files_dir / f".{file_id}.partial"
    partial.write_bytes(data)
    partial.rename(files_dir / file_id)
    return {"id": file_id, **fields, "bytes": len(data), "created_at": int(time.time())}
