"""Where batches live: files, batches, their lines and results, and the webhook outbox, durable on disk.

The embedded store is SQLite in ``state_dir`` (WAL, so readers never wait on the runner) with file contents
beside it. Every router replica opens the same database: claims and results are single transactions, so two
replicas never run one line at once, and a line's result is recorded once whatever happens around it
(``record`` only moves a line from running to done). A replica that dies leaves its lines leased; once the
lease lapses another replica claims them again. All methods block: callers run them in a thread.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from deployments.batch_files import write_contents
from serve_app.domain.batches import BatchSettings, InputLine, new_id

if TYPE_CHECKING:
    from deployments.batch_store_redis import RedisBatchStore

# The two stores have the same operations (the tests run the runner over both).
BatchStore = Union["SqliteBatchStore", "RedisBatchStore"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, key_id TEXT, filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL, expires_at INTEGER);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, key_id TEXT, endpoint TEXT NOT NULL, model TEXT, input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL, status TEXT NOT NULL, created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL,
    in_progress_at INTEGER, finalizing_at INTEGER, completed_at INTEGER, failed_at INTEGER, expired_at INTEGER,
    cancelling_at INTEGER, cancelled_at INTEGER, output_file_id TEXT, error_file_id TEXT, errors TEXT,
    metadata TEXT, total INTEGER NOT NULL DEFAULT 0, completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0, lease_until REAL);
CREATE TABLE IF NOT EXISTS lines (
    batch_id TEXT NOT NULL, idx INTEGER NOT NULL, custom_id TEXT, body TEXT, status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, not_before REAL NOT NULL DEFAULT 0, owner TEXT, lease_until REAL,
    outcome TEXT, result TEXT, queued_at REAL NOT NULL, PRIMARY KEY (batch_id, idx));
CREATE INDEX IF NOT EXISTS lines_by_status ON lines (status, not_before);
CREATE TABLE IF NOT EXISTS webhooks (
    id TEXT PRIMARY KEY, url TEXT NOT NULL, body BLOB NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL, delivered_at REAL, last_error TEXT);
"""


class SqliteBatchStore:
    """The embedded store: ``<state_dir>/batches.sqlite3`` and ``<state_dir>/files/<file id>``."""

    def __init__(self, state_dir: str | os.PathLike) -> None:
        self.root = Path(state_dir)
        self.files_dir = self.root / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "batches.sqlite3"
        self._local = threading.local()
        self._db().executescript(SCHEMA)  # its own transaction; IF NOT EXISTS makes it safe from every replica

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (BEGIN IMMEDIATE): claims never interleave across replicas."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _one(self, sql: str, *args: Any) -> dict[str, Any] | None:
        row = self._db().execute(sql, args).fetchone()
        return dict(row) if row is not None else None

    # ---- files ------------------------------------------------------------------------------

    def create_file(self, key_id: str | None, filename: str, purpose: str, data: bytes,
                    expires_at: int | None) -> dict[str, Any]:
        row = write_contents(self.files_dir, data, key_id=key_id, filename=filename, purpose=purpose,
                             expires_at=expires_at)
        with self._write() as db:
            db.execute("INSERT INTO files VALUES (:id, :key_id, :filename, :purpose, :bytes, :created_at, :expires_at)",
                       row)
        return row

    def get_file(self, file_id: str, key_id: str | None) -> dict[str, Any] | None:
        return self._one("SELECT * FROM files WHERE id = ? AND key_id IS ?", file_id, key_id)

    def file_content(self, file_id: str) -> bytes:
        return (self.files_dir / file_id).read_bytes()

    def list_files(self, key_id: str | None, purpose: str | None, limit: int, after: str | None,
                   order: str) -> list[dict[str, Any]]:
        direction = "DESC" if order == "desc" else "ASC"
        sql = "SELECT * FROM files WHERE key_id IS ?"
        args: list[Any] = [key_id]
        if purpose:
            sql += " AND purpose = ?"
            args.append(purpose)
        if after and (anchor := self._one("SELECT rowid FROM files WHERE id = ?", after)):
            sql += f" AND rowid {'<' if direction == 'DESC' else '>'} ?"
            args.append(anchor["rowid"])
        # rowid is the order of creation (created_at counts whole seconds, and ids are random)
        sql += f" ORDER BY rowid {direction} LIMIT ?"
        return [dict(r) for r in self._db().execute(sql, [*args, limit])]

    def delete_file(self, file_id: str, key_id: str | None) -> bool:
        with self._write() as db:
            deleted = db.execute("DELETE FROM files WHERE id = ? AND key_id IS ?", (file_id, key_id)).rowcount
        if deleted:
            (self.files_dir / file_id).unlink(missing_ok=True)
        return bool(deleted)

    def expire_files(self, now: int) -> int:
        """Delete files past their ``expires_at``; how many."""
        with self._write() as db:
            ids = [r["id"] for r in db.execute("SELECT id FROM files WHERE expires_at IS NOT NULL AND expires_at <= ?",
                                               (now,))]
            db.execute("DELETE FROM files WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,))
        for file_id in ids:
            (self.files_dir / file_id).unlink(missing_ok=True)
        return len(ids)

    # ---- batches ----------------------------------------------------------------------------

    def create_batch(self, key_id: str | None, endpoint: str, input_file_id: str, completion_window: str,
                     window_s: int, metadata: dict[str, str] | None, max_active: int) -> dict[str, Any] | None:
        """A new batch, validating; None when the key already has ``max_active`` unfinished batches."""
        now = int(time.time())
        row = {"id": new_id("batch_"), "key_id": key_id, "endpoint": endpoint, "input_file_id": input_file_id,
               "completion_window": completion_window, "status": "validating", "created_at": now,
               "expires_at": now + window_s, "metadata": json.dumps(metadata) if metadata else None}
        with self._write() as db:
            active = db.execute("SELECT COUNT(*) FROM batches WHERE key_id IS ? AND status IN "
                                "('validating', 'in_progress', 'finalizing', 'cancelling')", (key_id,)).fetchone()[0]
            if active >= max_active:
                return None
            db.execute("INSERT INTO batches (id, key_id, endpoint, input_file_id, completion_window, status, "
                       "created_at, expires_at, metadata) VALUES (:id, :key_id, :endpoint, :input_file_id, "
                       ":completion_window, :status, :created_at, :expires_at, :metadata)", row)
        return self.get_batch(row["id"], key_id)

    def get_batch(self, batch_id: str, key_id: str | None) -> dict[str, Any] | None:
        return self._one("SELECT * FROM batches WHERE id = ? AND key_id IS ?", batch_id, key_id)

    def batch(self, batch_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM batches WHERE id = ?", batch_id)

    def list_batches(self, key_id: str | None, limit: int, after: str | None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM batches WHERE key_id IS ?", [key_id]
        if after and (anchor := self._one("SELECT rowid FROM batches WHERE id = ?", after)):
            sql += " AND rowid < ?"
            args.append(anchor["rowid"])
        return [dict(r) for r in self._db().execute(sql + " ORDER BY rowid DESC LIMIT ?", [*args, limit])]

    def cancel_batch(self, batch_id: str, key_id: str | None) -> dict[str, Any] | None:
        """Move an unfinished batch to cancelling (its queued lines will not run); the batch as it stands."""
        with self._write() as db:
            db.execute("UPDATE batches SET status = 'cancelling', cancelling_at = ? WHERE id = ? AND key_id IS ? "
                       "AND status IN ('validating', 'in_progress')", (int(time.time()), batch_id, key_id))
        return self.get_batch(batch_id, key_id)

    def claim_validation(self, owner_lease_s: float) -> dict[str, Any] | None:
        """A validating batch nobody is validating (or whose validator's lease lapsed), leased to the caller."""
        now = time.time()
        with self._write() as db:
            row = db.execute("SELECT * FROM batches WHERE status = 'validating' AND (lease_until IS NULL OR "
                             "lease_until < ?) ORDER BY created_at LIMIT 1", (now,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE batches SET lease_until = ? WHERE id = ?", (now + owner_lease_s, row["id"]))
        return dict(row)

    def start_batch(self, batch_id: str, lines: list[InputLine], bad: list[tuple[InputLine, str]],
                    model: str | None) -> None:
        """The validated batch in progress: its good lines queued, its bad lines answered (``bad``: each with its
        answer line, JSON) in the same transaction."""
        now = time.time()
        with self._write() as db:
            if db.execute("SELECT status FROM batches WHERE id = ?", (batch_id,)).fetchone()["status"] != "validating":
                return  # cancelled meanwhile, or another validator won
            db.executemany("INSERT INTO lines (batch_id, idx, custom_id, body, status, queued_at) "
                           "VALUES (?, ?, ?, ?, 'queued', ?)",
                           [(batch_id, ln.index, ln.custom_id, json.dumps(ln.body), now) for ln in lines])
            db.executemany("INSERT INTO lines (batch_id, idx, custom_id, status, outcome, result, queued_at) "
                           "VALUES (?, ?, ?, 'done', 'error', ?, ?)",
                           [(batch_id, ln.index, ln.custom_id, answer, now) for ln, answer in bad])
            db.execute("UPDATE batches SET status = 'in_progress', in_progress_at = ?, total = ?, failed = ?, "
                       "model = ?, lease_until = NULL WHERE id = ?",
                       (int(now), len(lines) + len(bad), len(bad), model, batch_id))

    def fail_batch(self, batch_id: str, code: str, message: str) -> bool:
        errors = json.dumps([{"code": code, "message": message, "line": None, "param": None}])
        with self._write() as db:
            return bool(db.execute("UPDATE batches SET status = 'failed', failed_at = ?, errors = ?, "
                                   "lease_until = NULL WHERE id = ? AND status = 'validating'",
                                   (int(time.time()), errors, batch_id)).rowcount)

    # ---- lines ------------------------------------------------------------------------------

    def claim_lines(self, owner: str, count: int, lease_s: float) -> list[dict[str, Any]]:
        """Up to ``count`` lines to run, oldest batch first: queued ones, and running ones whose lease lapsed (their
        router replica died). Each is leased to ``owner`` and its attempt counted."""
        now = time.time()
        with self._write() as db:
            rows = [dict(r) for r in db.execute(
                "SELECT l.batch_id, l.idx, l.custom_id, l.body, l.attempts, b.key_id, b.endpoint FROM lines l "
                "JOIN batches b ON b.id = l.batch_id WHERE b.status = 'in_progress' AND l.not_before <= ? AND "
                "(l.status = 'queued' OR (l.status = 'running' AND l.lease_until < ?)) "
                "ORDER BY b.created_at, l.idx LIMIT ?", (now, now, count))]
            db.executemany("UPDATE lines SET status = 'running', owner = ?, lease_until = ?, attempts = attempts + 1 "
                           "WHERE batch_id = ? AND idx = ?",
                           [(owner, now + lease_s, r["batch_id"], r["idx"]) for r in rows])
        return rows

    def renew(self, owner: str, lease_s: float) -> None:
        with self._write() as db:
            db.execute("UPDATE lines SET lease_until = ? WHERE owner = ? AND status = 'running'",
                       (time.time() + lease_s, owner))

    def record(self, batch_id: str, idx: int, ok: bool, result: str) -> bool:
        """A line's answer, recorded once: True when this call recorded it (the line was running), False when it
        was already done (a second runner of a line whose lease lapsed loses here)."""
        with self._write() as db:
            recorded = db.execute("UPDATE lines SET status = 'done', outcome = ?, result = ?, owner = NULL "
                                  "WHERE batch_id = ? AND idx = ? AND status = 'running'",
                                  ("ok" if ok else "error", result, batch_id, idx)).rowcount
            if recorded:
                db.execute(f"UPDATE batches SET {'completed' if ok else 'failed'} = "
                           f"{'completed' if ok else 'failed'} + 1 WHERE id = ?", (batch_id,))
        return bool(recorded)

    def requeue(self, batch_id: str, idx: int, delay_s: float) -> None:
        """A line that met a passing refusal (429, 503) waits ``delay_s`` and runs again."""
        with self._write() as db:
            db.execute("UPDATE lines SET status = 'queued', owner = NULL, not_before = ? WHERE batch_id = ? AND "
                       "idx = ? AND status = 'running'", (time.time() + delay_s, batch_id, idx))

    def line_counts(self) -> dict[str, Any]:
        """Lines queued and running in unfinished batches, and the oldest queued line's age (for metrics)."""
        counts = {"queued": 0, "running": 0}
        for row in self._db().execute("SELECT l.status, COUNT(*) AS n FROM lines l JOIN batches b ON b.id = "
                                      "l.batch_id WHERE b.status = 'in_progress' AND l.status != 'done' GROUP BY "
                                      "l.status"):
            counts[row["status"]] = row["n"]
        oldest = self._db().execute("SELECT MIN(queued_at) FROM lines l JOIN batches b ON b.id = l.batch_id WHERE "
                                    "b.status = 'in_progress' AND l.status != 'done'").fetchone()[0]
        counts["backlog_age_s"] = 0.0 if oldest is None else max(0.0, time.time() - oldest)
        return counts

    # ---- the end of a batch ----------------------------------------------------------------

    def due_to_finish(self, now: int) -> list[dict[str, Any]]:
        """Batches ready to end: in progress with every line done, cancelling with none running, and unfinished
        ones past their completion window."""
        return [dict(r) for r in self._db().execute(
            "SELECT * FROM batches b WHERE "
            "(b.status = 'in_progress' AND NOT EXISTS (SELECT 1 FROM lines l WHERE l.batch_id = b.id AND "
            "  l.status != 'done')) OR "
            "(b.status = 'cancelling' AND NOT EXISTS (SELECT 1 FROM lines l WHERE l.batch_id = b.id AND "
            "  l.status = 'running' AND l.lease_until >= ?)) OR "
            "(b.status IN ('in_progress', 'validating') AND b.expires_at <= ?) OR "
            "(b.status = 'finalizing' AND b.lease_until < ?)", (time.time(), now, time.time()))]

    def begin_finalizing(self, batch_id: str, from_status: str, lease_s: float) -> bool:
        """Take the batch's finalization (one replica wins); a cancelling batch keeps its status meanwhile."""
        now = time.time()
        with self._write() as db:
            row = db.execute("SELECT status, lease_until FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if row is None or row["status"] != from_status or (row["lease_until"] or 0) >= now:
                return False
            status = "finalizing" if from_status in ("in_progress", "finalizing") else from_status
            db.execute("UPDATE batches SET status = ?, finalizing_at = COALESCE(finalizing_at, ?), lease_until = ? "
                       "WHERE id = ?", (status, int(now) if status == "finalizing" else None, now + lease_s,
                                        batch_id))
        return True

    def unfinished_lines(self, batch_id: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self._db().execute(
            "SELECT idx, custom_id, status FROM lines WHERE batch_id = ? AND status != 'done'", (batch_id,))]

    def close_lines(self, batch_id: str, answers: dict[int, str]) -> None:
        """Lines a cancel or an expiry ended before they ran, recorded with their answers (error lines)."""
        with self._write() as db:
            for idx, answer in answers.items():
                if db.execute("UPDATE lines SET status = 'done', outcome = 'error', result = ? WHERE batch_id = ? "
                              "AND idx = ? AND status != 'done'", (answer, batch_id, idx)).rowcount:
                    db.execute("UPDATE batches SET failed = failed + 1 WHERE id = ?", (batch_id,))

    def results(self, batch_id: str, outcome: str) -> Iterator[str]:
        """The recorded answer lines of one outcome, in input order."""
        for row in self._db().execute("SELECT result FROM lines WHERE batch_id = ? AND status = 'done' AND "
                                      "outcome = ? ORDER BY idx", (batch_id, outcome)):
            yield row["result"]

    def end_batch(self, batch_id: str, status: str, output_file_id: str | None, error_file_id: str | None,
                  webhook: tuple[str, bytes] | None) -> None:
        """The batch's last move, with its files and (in the same transaction) its webhook in the outbox."""
        now = int(time.time())
        with self._write() as db:
            db.execute(f"UPDATE batches SET status = ?, {status}_at = ?, output_file_id = ?, error_file_id = ?, "
                       "lease_until = NULL WHERE id = ?", (status, now, output_file_id, error_file_id, batch_id))
            db.execute("DELETE FROM lines WHERE batch_id = ?", (batch_id,))  # the files hold the answers now
            if webhook is not None:
                db.execute("INSERT INTO webhooks (id, url, body, next_at) VALUES (?, ?, ?, ?)",
                           (new_id("msg_"), webhook[0], webhook[1], time.time()))

    # ---- the webhook outbox ----------------------------------------------------------------

    def due_webhooks(self, lease_s: float) -> list[dict[str, Any]]:
        """Deliveries due now, each leased for ``lease_s`` (one replica sends each try)."""
        now = time.time()
        with self._write() as db:
            rows = [dict(r) for r in db.execute("SELECT * FROM webhooks WHERE delivered_at IS NULL AND next_at <= ?",
                                                (now,))]
            db.executemany("UPDATE webhooks SET next_at = ? WHERE id = ?", [(now + lease_s, r["id"]) for r in rows])
        return rows

    def webhook_sent(self, webhook_id: str, delivered: bool, next_at: float | None, error: str | None) -> None:
        with self._write() as db:
            if delivered:
                db.execute("UPDATE webhooks SET delivered_at = ?, attempts = attempts + 1 WHERE id = ?",
                           (time.time(), webhook_id))
            elif next_at is None:  # out of attempts: kept, undelivered, with why
                db.execute("UPDATE webhooks SET attempts = attempts + 1, next_at = 1e18, last_error = ? WHERE id = ?",
                           (error, webhook_id))
            else:
                db.execute("UPDATE webhooks SET attempts = attempts + 1, next_at = ?, last_error = ? WHERE id = ?",
                           (next_at, error, webhook_id))

    def webhooks(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._db().execute("SELECT id, url, attempts, delivered_at, last_error FROM webhooks")]


def open_store(settings: BatchSettings, app_name: str) -> BatchStore:
    """The store ``settings`` name: Redis when ``redis_url`` is set (file contents still under ``state_dir``),
    else the embedded SQLite store in ``state_dir``. Both have the same operations."""
    if settings.redis_url:
        from deployments.batch_store_redis import RedisBatchStore

        return RedisBatchStore.connect(settings.redis_url, app_name, settings.state_dir,
                                       os.environ.get(settings.redis_password_env), settings.redis_ca_cert)
    return SqliteBatchStore(settings.state_dir)

