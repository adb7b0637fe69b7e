"""Durable log intake: accepted records are committed to ``log_records`` before anyone says 200.

A bounded in-memory queue sits in front of one writer thread. Each request hands its records over
as one ticket and waits for that ticket's commit; the writer takes whole tickets, up to
``batch_records`` records, into one transaction (group commit: many concurrent requests share a
transaction, so a slow disk costs one fsync per batch, not per request). A request is never split
across transactions, so a retried request cannot leave half of itself behind.

Backpressure instead of unbounded memory: a full queue refuses new tickets (``QueueFull`` -> 429),
a failing store fails every waiting ticket and refuses new ones until it answers again
(``StoreUnavailable`` -> 503). A request that gives up waiting withdraws its ticket; if the writer
already holds it, the transaction is rolled back and redone without it, so a 503 means "not
stored" and the sender's retry does not duplicate it. Only a ticket whose commit is already under
way is waited for to the end.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.exc import SQLAlchemyError

from aiops_plugin.config import LogIntakeConfig
from aiops_plugin.exporter import Exporter
from aiops_plugin.store import Store
from aiops_plugin.store.models import LogRecordRow
from aiops_plugin.store.repo import StoreError

log = logging.getLogger(__name__)

_TABLE = LogRecordRow.__table__
#: Rows deleted per retention transaction, so the writer is never locked out for long.
RETENTION_CHUNK_ROWS = 10_000
#: Retry-After for a full queue: the writer drains a batch in well under a second when healthy.
QUEUE_FULL_RETRY_AFTER_S = 1
#: First and largest pause of the writer after a failed transaction before it pings the store.
_FIRST_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 10.0

_QUEUED, _WRITING, _COMMITTING, _DONE, _CANCELLED = range(5)


@dataclass(frozen=True)
class IntakeRecord:
    """One accepted log record, as it will be stored (``log_records`` without id / template)."""

    received_at: datetime
    observed_at: datetime
    entity_group: str
    entity_key: str
    severity_number: int
    severity_text: str
    body: str

    def row(self) -> dict[str, Any]:
        return {
            "received_at": self.received_at,
            "observed_at": self.observed_at,
            "entity_group": self.entity_group,
            "entity_key": self.entity_key,
            "severity_number": self.severity_number,
            "severity_text": self.severity_text,
            "body": self.body,
        }


class IntakeRefused(Exception):
    """Records not stored; the sender should retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(IntakeRefused):
    """The queue cannot take the request's records now (the store falls behind)."""


class StoreUnavailable(IntakeRefused):
    """The store failed, did not commit in time, or the intake is shutting down."""


class _Ticket:
    """The records of one request and the outcome its handler waits for."""

    __slots__ = ("records", "state", "error", "done")

    def __init__(self, records: list[IntakeRecord]) -> None:
        self.records = records
        self.state = _QUEUED
        self.error: str | None = None  # why the writer refused it
        self.done = threading.Event()


class _BatchChanged(Exception):
    """A waiting request withdrew its ticket mid-transaction: roll back, write the rest."""


class LogIntake:
    """The bounded queue and its writer thread; starts writing on construction.

    ``submit`` blocks (call it from a worker thread, never the event loop) until the records are
    committed or refused. ``aiops_source_up{source="logs"}`` is 1 while the writer can write.
    """

    def __init__(self, store: Store, config: LogIntakeConfig, exporter: Exporter) -> None:
        self.store = store
        self.config = config
        self.exporter = exporter
        self._condition = threading.Condition()
        self._queue: deque[_Ticket] = deque()
        self._pending_records = 0  # queued or held by the writer
        self._closing = False
        self._failure: str | None = None  # why the store is refused, while it is
        self._retry_at = 0.0  # monotonic time of the writer's next ping while failing
        self._up = exporter.source_up.labels(source="logs")
        self._up.set(1)
        self._thread = threading.Thread(target=self._run_writer, name="log-intake", daemon=True)
        self._thread.start()

    @property
    def pending_records(self) -> int:
        """Records queued or being written (not yet committed or refused)."""
        with self._condition:
            return self._pending_records

    def submit(self, records: Sequence[IntakeRecord]) -> None:
        """Return once ``records`` are committed; raise ``QueueFull`` or ``StoreUnavailable``.

        A request is admitted whole or not at all; an empty queue admits any size, so a request
        larger than ``queue_records`` is slow rather than refused forever.
        """
        if not records:
            return
        ticket = _Ticket(list(records))
        count = len(ticket.records)
        with self._condition:
            if self._closing:
                raise StoreUnavailable("the log intake is shutting down", retry_after=5)
            if self._failure is not None:
                raise StoreUnavailable(self._failure, retry_after=self._seconds_to_retry())
            if self._pending_records and self._pending_records + count > self.config.queue_records:
                raise QueueFull(
                    f"the intake queue holds {self._pending_records} records "
                    f"(logs.intake.queue_records={self.config.queue_records}); the store falls "
                    "behind",
                    retry_after=QUEUE_FULL_RETRY_AFTER_S,
                )
            self._queue.append(ticket)
            self._pending_records += count
            self._condition.notify_all()
        timeout = self.config.commit_timeout
        if not ticket.done.wait(timeout):
            with self._condition:
                if ticket.state == _QUEUED:
                    self._queue.remove(ticket)
                    self._pending_records -= count
                    ticket.state = _CANCELLED
                elif ticket.state == _WRITING:
                    ticket.state = _CANCELLED  # the writer drops it before committing
                withdrawn = ticket.state == _CANCELLED
            if withdrawn:
                raise StoreUnavailable(
                    f"the store did not commit within logs.intake.commit_timeout={timeout:g}s",
                    retry_after=1,
                )
            if not ticket.done.wait(timeout):
                raise StoreUnavailable(
                    "the store's commit is taking too long; its outcome is unknown", retry_after=1
                )
        if ticket.error is not None:
            raise StoreUnavailable(ticket.error, retry_after=1)

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new records, write everything queued, stop the writer (a clean shutdown)."""
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error(
                "log intake writer still busy after %.0f s; queued records may be lost", timeout
            )
        self._up.set(0)

    def enforce_retention(self, now: datetime) -> int:
        """Delete records received before ``now - retention``, then the oldest beyond
        ``max_rows``; returns rows deleted. Chunked transactions keep the writer going."""
        cutoff = now - timedelta(seconds=self.config.retention)
        deleted = self._delete_chunks(_TABLE.c.received_at < cutoff)
        try:
            with self.store.engine.connect() as connection:
                boundary = connection.scalar(
                    select(_TABLE.c.id)
                    .order_by(_TABLE.c.id.desc())
                    .offset(self.config.max_rows)
                    .limit(1)
                )
        except SQLAlchemyError as exc:
            raise self._store_error("finding the log row-count boundary", exc) from exc
        if boundary is not None:
            deleted += self._delete_chunks(_TABLE.c.id <= boundary)
        if deleted:
            log.info("log retention deleted %d record(s)", deleted)
        return deleted

    # ---------------------------------------------------------------- writer
    def _run_writer(self) -> None:
        while True:
            with self._condition:
                while not self._queue and not self._closing:
                    self._condition.wait()
                if not self._queue:
                    return
                batch = self._take_batch()
            self._write(batch)

    def _take_batch(self) -> list[_Ticket]:
        """Whole tickets up to ``batch_records`` records (at least one ticket). Holds the lock."""
        batch: list[_Ticket] = []
        size = 0
        while self._queue:
            count = len(self._queue[0].records)
            if batch and size + count > self.config.batch_records:
                break
            ticket = self._queue.popleft()
            ticket.state = _WRITING
            batch.append(ticket)
            size += count
        return batch

    def _write(self, batch: list[_Ticket]) -> None:
        live = batch
        try:
            while live:
                try:
                    with self.store.engine.begin() as connection:
                        connection.execute(
                            insert(_TABLE), [record.row() for t in live for record in t.records]
                        )
                        remaining = self._seal(live)
                        if len(remaining) != len(live):
                            live = remaining
                            raise _BatchChanged
                    break
                except _BatchChanged:
                    continue
        except SQLAlchemyError as exc:
            self._fail(live, self._store_error("writing log records", exc))
            return
        except Exception:  # the writer must outlive a bug; its tickets must still be answered
            log.exception("log intake writer failed on a batch of %d request(s)", len(live))
            self._finish(live, "internal error writing the records")
            return
        self._finish(live, None)
        self.exporter.logs_received.inc(sum(len(t.records) for t in live))

    def _seal(self, batch: list[_Ticket]) -> list[_Ticket]:
        """The tickets still wanted. When none was withdrawn they are marked committing, so
        their handlers wait for the outcome; else the caller redoes the transaction without
        the withdrawn ones, which are forgotten here."""
        with self._condition:
            live = [t for t in batch if t.state != _CANCELLED]
            if len(live) == len(batch):
                for ticket in live:
                    ticket.state = _COMMITTING
            else:
                self._pending_records -= sum(len(t.records) for t in batch if t.state == _CANCELLED)
        return live

    def _finish(self, tickets: list[_Ticket], error: str | None) -> None:
        with self._condition:
            for ticket in tickets:
                if ticket.state != _CANCELLED:
                    ticket.error = error
                    ticket.state = _DONE
                    ticket.done.set()
                self._pending_records -= len(ticket.records)

    def _fail(self, batch: list[_Ticket], error: StoreError) -> None:
        """Refuse the batch and everything queued behind it, then wait for the store."""
        log.error("%s; refusing logs until the store answers again", error)
        message = f"the store is failing: {error}"
        with self._condition:
            queued = list(self._queue)
            self._queue.clear()
            self._failure = message
        self._up.set(0)
        self._finish(batch + queued, message)
        self._wait_for_store()

    def _wait_for_store(self) -> None:
        """Ping with exponential backoff until the store answers or the intake closes."""
        delay = _FIRST_BACKOFF_S
        while True:
            with self._condition:
                self._retry_at = time.monotonic() + delay
                if self._condition.wait_for(lambda: self._closing, timeout=delay):
                    return
            if self.store.ping():
                with self._condition:
                    self._failure = None
                self._up.set(1)
                log.info("the store answers again; accepting logs")
                return
            delay = min(2 * delay, _MAX_BACKOFF_S)

    def _seconds_to_retry(self) -> int:
        return max(1, round(self._retry_at - time.monotonic()))

    def _delete_chunks(self, condition: Any) -> int:
        deleted = 0
        while True:
            chunk = select(_TABLE.c.id).where(condition).order_by(_TABLE.c.id)
            try:
                with self.store.engine.begin() as connection:
                    result = connection.execute(
                        delete(_TABLE).where(
                            _TABLE.c.id.in_(chunk.limit(RETENTION_CHUNK_ROWS).scalar_subquery())
                        )
                    )
            except SQLAlchemyError as exc:
                raise self._store_error("deleting old log records", exc) from exc
            deleted += result.rowcount
            if result.rowcount < RETENTION_CHUNK_ROWS:
                return deleted

    def _store_error(self, action: str, exc: SQLAlchemyError) -> StoreError:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__]
        message = reason[0]
        if self.store.url.password:
            message = message.replace(str(self.store.url.password), "***")
        return StoreError(f"{action} failed on {self.store.display_url}: {message}")
