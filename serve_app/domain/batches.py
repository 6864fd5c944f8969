"""OpenAI's Batch API for images, in plain Python: the settings, the objects, the input lines, webhook signing.

A batch is a JSONL file uploaded through the Files API (``purpose="batch"``), one request per line:
``{"custom_id": ..., "method": "POST", "url": "/v1/images/generations", "body": {...}}``. The service runs each
line as the synchronous route would (the router's checks, the caller's per-key limits, its charge), at a lower
priority than interactive requests, and writes one answer line per request, keyed by ``custom_id``: answers
with status 200 to the output file, every other answer to the error file. A bad line never fails the batch.

Edits in JSONL follow OpenAI's JSON form of ``/v1/images/edits`` (openai-python's ``ImageInputReferenceParam``):
``"images": [{"image_url": "data:image/png;base64,..."}, {"file_id": "file-..."}]``. Remote ``http(s)`` URLs are
refused: a server that fetches what a caller names is a request forgery risk, and the fleet may have no egress.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

BATCH_ENDPOINTS = {"/v1/images/generations": "generate", "/v1/images/edits": "edit"}
COMPLETION_WINDOWS = {"24h": 24 * 3600}
BatchStatus = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                      "cancelled"]
TERMINAL = frozenset({"failed", "completed", "expired", "cancelled"})
# The webhook event of each terminal status (OpenAI's names).
WEBHOOK_EVENTS = {"completed": "batch.completed", "failed": "batch.failed", "cancelled": "batch.cancelled",
                  "expired": "batch.expired"}
FILE_PURPOSES = ("batch", "vision", "user_data")
# Status codes worth another try later rather than an answer now: overload, a per-key limit, a replica that is
# loading, lost or out of memory. Anything else (4xx) is the line's answer.
RETRYABLE_STATUS = frozenset({429, 503})


class BatchSettings(BaseModel):
    """``serving.batch``: the Files and Batches API, its store and its bounds (docs/batch.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=True, description="Serve /v1/files and /v1/batches.")
    state_dir: str | None = Field(
        default=None, description="Where the embedded store (SQLite) and file contents live; on a cluster, a volume "
                                  "every router replica mounts. Default: $IMAGESERVE_STATE_DIR, else "
                                  "~/.local/state/imageserve.")
    max_file_mb: float = Field(default=512.0, gt=0, description="Largest uploaded file (413 past it).")
    max_lines: int = Field(default=50_000, ge=1, description="Most requests in one batch's input file (OpenAI's).")
    max_line_kb: float = Field(default=40_000.0, gt=0,
                               description="Largest input line: an edit carries its images as data URLs.")
    max_active_batches_per_key: int = Field(default=100, ge=1,
                                            description="Batches a key may have unfinished at once (429 past it).")
    lines_in_flight: int = Field(
        default=2, ge=1, description="Batch lines each router replica keeps at model replicas at once. A replica runs "
                                     "them only while no interactive request waits, so this bounds what a batch "
                                     "holds, not what it takes from interactive traffic.")
    max_attempts: int = Field(default=5, ge=1, description="Tries of a line that fails with a 5xx before its "
                                                          "answer is that error (a 429 is retried until expiry).")
    file_expiry_days: float = Field(
        default=30.0, gt=0, description="Batch input, output and error files expire after this, as OpenAI's do (30 "
                                        "days); other files when their upload's expires_after says.")
    poll_interval_s: float = Field(default=1.0, gt=0, description="How often a router replica looks for work it "
                                                                  "was not told about (another replica's batch).")
    lease_s: float = Field(default=30.0, gt=0, description="A running line whose router stopped renewing its lease "
                                                          "this long runs again elsewhere.")
    redis_url: str | None = Field(
        default=None, description="A cluster's store: batch state in this Redis (rediss://host:6379/1), file contents "
                                  "under state_dir on a volume every router replica mounts; null: the embedded "
                                  "SQLite store in state_dir.")
    redis_password_env: str = Field(default="REDIS_PASSWORD", description="Env var holding the Redis password.")
    redis_ca_cert: str | None = Field(default=None, description="CA certificate that signed Redis's TLS certificate.")
    webhook_url: str | None = Field(default=None, description="Where batch.completed, .failed, .cancelled and "
                                                              ".expired are posted.")
    webhook_secret_env: str = Field(default="IMAGESERVE_WEBHOOK_SECRET",
                                    description="Env var holding the webhook secret (whsec_...), e.g. from a Secret.")
    webhook_max_attempts: int = Field(default=8, ge=1, description="Deliveries tried, backing off 1 s, 2 s, 4 s...")

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 1e6)

    @property
    def max_line_bytes(self) -> int:
        return int(self.max_line_kb * 1e3)


# ---- the API's bodies and answers, as openai-python's types define them (declared for the OpenAPI schema) ----

class BatchCreate(BaseModel):
    """``client.batches.create``'s body."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1, max_length=64, description="A file uploaded with purpose batch.")
    endpoint: Literal["/v1/images/generations", "/v1/images/edits"] = Field(
        description="The route every line of the file calls.")
    completion_window: Literal["24h"] = Field(description="Lines not run by then are answered batch_expired.")
    metadata: dict[str, str] | None = Field(
        default=None, max_length=16, description="Up to 16 pairs: keys up to 64 characters, values up to 512.")

    @field_validator("metadata")
    @classmethod
    def _bounded(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return check_metadata(value)


class FileObject(BaseModel):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"]
    expires_at: int | None
    status_details: None


class FileList(BaseModel):
    object: Literal["list"]
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"]
    deleted: bool


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchErrorItem(BaseModel):
    code: str
    message: str
    line: int | None
    param: str | None


class BatchErrors(BaseModel):
    object: Literal["list"]
    data: list[BatchErrorItem]


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"]
    endpoint: str
    model: str | None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    expires_at: int
    in_progress_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    errors: BatchErrors | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None


class BatchList(BaseModel):
    object: Literal["list"]
    data: list[BatchObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


def new_id(prefix: str) -> str:
    """An object id as OpenAI spells them: ``file-...``, ``batch_...``, ``batch_req_...``, ``evt_...``."""
    return f"{prefix}{secrets.token_hex(12)}"


@dataclass(frozen=True)
class InputLine:
    """One line of a batch's input file: its request, or why it cannot be one (``error``)."""

    index: int
    custom_id: str | None
    body: dict[str, Any] | None
    error: dict[str, str] | None = None


def parse_input_file(data: bytes, endpoint: str, settings: BatchSettings) -> tuple[list[InputLine], str | None]:
    """The lines of a batch input file, and why the whole file is refused (None when it is not).

    The file fails the batch only when no request can be read from it: empty, over the line bound, not UTF-8.
    A line that is not a JSON object, lacks a ``custom_id``, repeats one, names another method or URL, or is
    over ``max_line_kb`` becomes an error line: a bad line never fails the batch."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        return [], f"the input file is not UTF-8 ({err.reason} at byte {err.start})"
    raw_lines = [line for line in text.splitlines() if line.strip()]
    if not raw_lines:
        return [], "the input file holds no requests"
    if len(raw_lines) > settings.max_lines:
        return [], f"the input file holds {len(raw_lines)} requests; a batch takes at most {settings.max_lines}"
    lines: list[InputLine] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_lines):
        lines.append(_parse_line(index, raw, endpoint, settings, seen))
    return lines, None


def _parse_line(index: int, raw: str, endpoint: str, settings: BatchSettings, seen: set[str]) -> InputLine:
    def bad(code: str, message: str, custom_id: str | None = None) -> InputLine:
        return InputLine(index, custom_id, None, {"code": code, "message": f"line {index + 1}: {message}"})

    if len(raw.encode()) > settings.max_line_bytes:
        return bad("line_too_large", f"{len(raw.encode())} bytes, over the {settings.max_line_bytes} a line may hold")
    try:
        line = json.loads(raw)
    except ValueError as err:
        return bad("invalid_json", f"not JSON ({err})")
    if not isinstance(line, dict):
        return bad("invalid_json", "not a JSON object")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > 512:
        return bad("missing_custom_id", "custom_id must be a string of 1 to 512 characters")
    if custom_id in seen:
        return bad("duplicate_custom_id", f"custom_id {custom_id!r} is used by an earlier line", custom_id)
    seen.add(custom_id)
    if line.get("method", "POST") != "POST":
        return bad("invalid_method", f"method must be POST, not {line.get('method')!r}", custom_id)
    if line.get("url") != endpoint:
        return bad("mismatched_url", f"url {line.get('url')!r} is not this batch's endpoint {endpoint}", custom_id)
    body = line.get("body")
    if not isinstance(body, dict):
        return bad("invalid_body", "body must be a JSON object", custom_id)
    return InputLine(index, custom_id, body)


def data_url_bytes(url: str) -> bytes:
    """The bytes of a base64 ``data:`` URL; ValueError for anything else (remote URLs are not fetched)."""
    if not url.startswith("data:"):
        raise ValueError("image_url must be a base64 data URL (data:image/png;base64,...); this service fetches "
                         "no remote URLs: upload the image with files.create and give its file_id")
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise ValueError("image_url must be base64-encoded (data:<type>;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as err:
        raise ValueError(f"image_url is not valid base64 ({err})") from None


# ---- objects, as openai-python's types define them ---------------------------------------------------

def file_object(row: dict[str, Any]) -> dict[str, Any]:
    """An ``openai.types.FileObject``."""
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed",
            "expires_at": row["expires_at"], "status_details": None}


BATCH_TIMESTAMPS = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
                    "cancelled_at")


def batch_object(row: dict[str, Any]) -> dict[str, Any]:
    """An ``openai.types.Batch``."""
    errors = json.loads(row["errors"]) if row.get("errors") else None
    return {
        "id": row["id"], "object": "batch", "endpoint": row["endpoint"], "model": row.get("model"),
        "input_file_id": row["input_file_id"], "completion_window": row["completion_window"],
        "status": row["status"], "output_file_id": row.get("output_file_id"),
        "error_file_id": row.get("error_file_id"), "created_at": row["created_at"], "expires_at": row["expires_at"],
        **{stamp: row.get(stamp) for stamp in BATCH_TIMESTAMPS},
        "errors": {"object": "list", "data": errors} if errors else None,
        "request_counts": {"total": row["total"], "completed": row["completed"], "failed": row["failed"]},
        "metadata": json.loads(row["metadata"]) if row.get("metadata") else None,
    }


def answer_line(custom_id: str | None, status_code: int | None, body: dict[str, Any] | None,
                error: dict[str, str] | None = None) -> dict[str, Any]:
    """One line of an output or error file: the route's answer (``response``), or why there was none (``error``)."""
    response = None if status_code is None else {"status_code": status_code, "request_id": new_id("req_"),
                                                  "body": body}
    return {"id": new_id("batch_req_"), "custom_id": custom_id, "response": response, "error": error}


def check_metadata(metadata: Any) -> dict[str, str] | None:
    """OpenAI's metadata bounds: at most 16 pairs, keys up to 64 characters, string values up to 512."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or len(metadata) > 16:
        raise ValueError("metadata must be an object of at most 16 key-value pairs")
    for key, value in metadata.items():
        if not isinstance(value, str) or len(key) > 64 or len(value) > 512:
            raise ValueError("metadata keys are strings up to 64 characters, values strings up to 512")
    return metadata


# ---- webhooks: the Standard Webhooks scheme OpenAI signs with ----------------------------------------

def webhook_event(event_type: str, batch_id: str) -> dict[str, Any]:
    """An event as openai-python's ``Batch*WebhookEvent`` types read it."""
    return {"id": new_id("evt_"), "object": "event", "type": event_type, "created_at": int(time.time()),
            "data": {"id": batch_id}}


def webhook_secret_bytes(secret: str) -> bytes:
    """The HMAC key of a secret: ``whsec_`` + base64, as OpenAI's dashboard shows it, or the raw string."""
    key = base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_") else secret.encode()
    if not key:
        raise ValueError("the webhook secret is empty")
    return key


def sign_webhook(secret: str, webhook_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers of one delivery: HMAC-SHA256 over ``id.timestamp.body``, base64, as ``v1,<signature>``."""
    mac = hmac.new(webhook_secret_bytes(secret), f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return {"webhook-id": webhook_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": "v1," + base64.b64encode(mac.digest()).decode(), "content-type": "application/json"}


def webhook_backoff_s(attempt: int) -> float:
    """Seconds before delivery ``attempt + 1`` (1-based ``attempt``): 1, 2, 4, ... up to an hour."""
    return float(min(2 ** (attempt - 1), 3600))


def replicas_wanted(current: int, interactive: float, background: float, target_per_replica: float,
                    max_replicas: int, backlog_share: float = 0.0) -> float:
    """Replicas a model deployment wants, from the interactive requests and the batch lines it holds.

    Interactive requests scale it as Serve's default policy scales all requests: ``interactive /
    target_per_replica``. Batch lines use idle time and add no replica, except that a deployment running one
    keeps at least one replica (a pool that scales to zero does not drop the line it runs). With
    ``backlog_share`` above 0, batch lines count as demand too, up to that share of ``max_replicas`` (at least
    one).
    """
    if current == 0:
        return 0.0 if interactive + background <= 0 else 1.0
    wanted = interactive / target_per_replica
    if background > 0:
        wanted = max(wanted, 1.0)
        if backlog_share > 0:
            cap = max(1, int(backlog_share * max_replicas))
            wanted = max(wanted, min(float(cap), (interactive + background) / target_per_replica))
    return wanted
