"""Jobs, their results index and their event logs, kept durable in SQLite (WAL) under the state dir.

Each job has an append-only log of events numbered 1, 2, 3, ...; a stream
replays the log after a sequence number and then follows it, across scheduler
restarts. Result events keep the spec and the file name only: image bytes live
in the result store, never here: the scheduler holds no image longer than it takes to store it.

Results are recorded by group commit: every result that arrived while the
last transaction ran goes into the next one, with its events, keyed by its
file name (a function of its spec), so an item that is retried, or redone after
a restart, finds its row and counts nothing twice; followers are woken only
after the commit, so no client sees a result that is not durable. The results
index is also the record of which work items are finished, so a resumed job
skips them.

A job's state changes through one door, JobRecord.change_state, which only the
engine calls; LEGAL_CHANGES says which changes exist.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

from renderfarm._wire import JobState
from renderfarm.actors.s3 import StoredImage
from renderfarm.spec import AnySpec, DecodedImageSpec, EditedImageSpec, ImageSpec, UpscaledImageSpec, spec_from_json
from renderfarm.v1 import farm_pb2 as pb

STATE_TO_PB = {
    JobState.QUEUED: pb.JOB_STATE_QUEUED,
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
    JobState.FAILED: pb.JOB_STATE_FAILED,
    JobState.CANCELLED: pb.JOB_STATE_CANCELLED,
}

# QUEUED until the first item is dispatched; every finished state is final.
LEGAL_CHANGES = {
    JobState.QUEUED: {JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED},
    JobState.RUNNING: {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED},
}

DATABASE = "jobs.sqlite3"
# Events a stream reads from the database at a time.
EVENTS_PER_READ = 256

# Named by {table}: a store from before owners is moved into a fresh one (see _add_owners).
JOBS_TABLE = """
CREATE TABLE IF NOT EXISTS {table} (
    id TEXT PRIMARY KEY,
    -- The user who submitted it; request ids are theirs alone.
    owner TEXT NOT NULL,
    request_id TEXT,
    request BLOB NOT NULL,
    state TEXT NOT NULL,
    total INTEGER NOT NULL,
    completed INTEGER NOT NULL,
    error TEXT NOT NULL,
    created_at REAL NOT NULL,
    cancel_requested INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    finished_at REAL,
    UNIQUE (owner, request_id)
);
"""
# Columns added after a store may have been written: (table, column, type).
ADDED_COLUMNS = (("jobs", "finished_at", "REAL"), ("results", "sha256", "TEXT"), ("results", "size", "INTEGER"))
JOBS_COLUMNS = "id, request_id, request, state, total, completed, error, created_at, cancel_requested, last_seq"

SCHEMA = (
    JOBS_TABLE.format(table="jobs")
    + """
CREATE TABLE IF NOT EXISTS results (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    -- The work item the result finishes: see item_key.
    item TEXT NOT NULL,
    -- Of a PNG a worker put into an object store (the scheduler never held its bytes).
    sha256 TEXT,
    size INTEGER,
    PRIMARY KEY (job_id, name)
);
-- Failed attempts of work items, so that a restarted scheduler does not grant them fresh ones.
CREATE TABLE IF NOT EXISTS attempts (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    item TEXT NOT NULL,
    failures INTEGER NOT NULL,
    PRIMARY KEY (job_id, item)
);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    seq INTEGER NOT NULL,
    event BLOB NOT NULL,
    PRIMARY KEY (job_id, seq)
);
"""
)


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One transaction, committed whole or rolled back. The connection is in autocommit mode, where
    `with db:` opens none, so each statement would commit (and sync the WAL) on its own."""
    db.execute("BEGIN")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def result_to_pb(spec: AnySpec, name: str, stored: StoredImage | None = None) -> pb.ImageResult:
    """A result event's body; `stored`: what the worker recorded of a PNG it put into an object store."""
    digest = dict(sha256=stored.sha256, size=stored.size) if stored else {}
    if isinstance(spec, DecodedImageSpec):
        return pb.ImageResult(decoded=pb.DecodedImageSpec(**vars(spec)), name=name, **digest)
    if isinstance(spec, EditedImageSpec):
        return pb.ImageResult(edited=pb.EditedImageSpec(**vars(spec) | {"mask_sha256": spec.mask_sha256 or ""}), name=name, **digest)
    if isinstance(spec, UpscaledImageSpec):
        fields = vars(spec) | {"source": None if spec.source is None else _image_spec_to_pb(spec.source)}
        return pb.ImageResult(upscaled=pb.UpscaledImageSpec(**fields), name=name, **digest)
    return pb.ImageResult(spec=_image_spec_to_pb(spec), name=name, **digest)


def _image_spec_to_pb(spec: ImageSpec) -> pb.ImageSpec:
    return pb.ImageSpec(**vars(spec) | {"loras": [pb.Lora(**vars(lora)) for lora in spec.loras or ()]})


def item_key(spec: AnySpec) -> str:
    """A result's work item: its own spec, or for a sweep image upscaled in the farm, the sweep image's.

    A chained result's name hashes the rendered source image, which a resumed job cannot know
    before rendering it again; the source spec names the item without that.
    """
    source = getattr(spec, "source", None)
    return (source or spec).file_name


def _summary(request: pb.SubmitJobRequest) -> pb.SubmitJobRequest:
    """The request without its inputs, which can be megabytes that a status call does not need."""
    summary = pb.SubmitJobRequest()
    summary.CopyFrom(request)
    kind = summary.WhichOneof("kind")
    if kind == "decode":
        summary.decode.ClearField("latents_npy")
    elif kind in ("upscale", "img2img"):
        getattr(summary, kind).ClearField("images")
    elif kind == "inpaint":
        summary.inpaint.ClearField("image")
        summary.inpaint.ClearField("mask")
    return summary


class JobRecord:
    """One job: its state in memory, mirrored to the database on every change."""

    def __init__(self, db: sqlite3.Connection, row: sqlite3.Row):
        self._db = db
        self.id: str = row["id"]
        self.owner: str = row["owner"]
        self.summary = _summary(pb.SubmitJobRequest.FromString(row["request"]))
        self.total: int = row["total"]
        self.created_at: float = row["created_at"]
        self.state = JobState(row["state"])
        self.completed: int = row["completed"]
        self.error: str = row["error"]
        self.cancel_requested = bool(row["cancel_requested"])
        # When it ended; None while it runs (and for jobs that ended before stores kept it).
        self.finished_at: float | None = row["finished_at"]
        self._last_seq: int = row["last_seq"]
        # Item keys of the recorded results, and failed attempts per item, read once, when first asked.
        self._done_items: set[str] | None = None
        self._failures: dict[str, int] | None = None
        self.appended = asyncio.Event()

    def request(self) -> pb.SubmitJobRequest:
        """The full request, inputs included, as submitted: what a resumed job is planned from."""
        (data,) = self._db.execute("SELECT request FROM jobs WHERE id = ?", (self.id,)).fetchone()
        return pb.SubmitJobRequest.FromString(data)

    def _append(self, **kind) -> None:
        """Adds one event; call inside a transaction that also saves the job's row."""
        self._last_seq += 1
        event = pb.JobEvent(seq=self._last_seq, job_id=self.id, **kind)
        self._db.execute(
            "INSERT INTO events (job_id, seq, event) VALUES (?, ?, ?)",
            (self.id, self._last_seq, event.SerializeToString()),
        )

    def _save(self) -> None:
        self._db.execute(
            "UPDATE jobs SET state = ?, completed = ?, error = ?, cancel_requested = ?, last_seq = ?, finished_at = ?"
            " WHERE id = ?",
            (self.state.value, self.completed, self.error, int(self.cancel_requested), self._last_seq,
             self.finished_at, self.id),  # fmt: skip
        )

    def wake_followers(self) -> None:
        # Wake every follower, then arm a fresh event for the next append.
        self.appended.set()
        self.appended = asyncio.Event()

    @property
    def priority(self) -> int:
        return self.summary.priority

    @property
    def preview_every(self) -> int:
        return self.summary.preview_every

    def change_state(self, state: JobState, error: str = "") -> None:
        """The one door for state changes (the engine's); a finished job's state is final."""
        if state not in LEGAL_CHANGES.get(self.state, ()):
            raise ValueError(f"job {self.id} cannot go from {self.state.value} to {state.value}")
        with _transaction(self._db):
            self.state, self.error = state, error
            if state.finished:
                self.finished_at = time.time()
            self._append(state=STATE_TO_PB[state], error=error)
            self._save()
        self.wake_followers()

    def request_cancel(self) -> None:
        with _transaction(self._db):
            self.cancel_requested = True
            self._save()

    def is_done(self, spec: AnySpec) -> bool:
        """Whether the work item of `spec` (a planned spec; see item_key) has its result."""
        return item_key(spec) in self._done()

    def _done(self) -> set[str]:
        if self._done_items is None:
            rows = self._db.execute("SELECT item FROM results WHERE job_id = ?", (self.id,))
            self._done_items = {item for (item,) in rows.fetchall()}
        return self._done_items

    def failures(self, spec: AnySpec) -> int:
        """Failed attempts of the work item of `spec` so far, across scheduler restarts."""
        if self._failures is None:
            rows = self._db.execute("SELECT item, failures FROM attempts WHERE job_id = ?", (self.id,))
            self._failures = dict(rows.fetchall())
        return self._failures.get(spec.file_name, 0)

    def count_failure(self, spec: AnySpec) -> int:
        """Records one more failed attempt of `spec`'s work item; returns the failures so far."""
        failures = self.failures(spec) + 1
        with _transaction(self._db):
            self._db.execute(
                "INSERT OR REPLACE INTO attempts (job_id, item, failures) VALUES (?, ?, ?)",
                (self.id, spec.file_name, failures),
            )
        self._failures[spec.file_name] = failures
        return failures

    def _record(self, spec: AnySpec, name: str, stored: StoredImage | None) -> bool:
        """Adds one result and its event; call inside a transaction. False if it was already there."""
        inserted = self._db.execute(
            "INSERT OR IGNORE INTO results (job_id, name, spec, item, sha256, size) VALUES (?, ?, ?, ?, ?, ?)",
            (self.id, name, spec.to_json(), item_key(spec), stored and stored.sha256, stored and stored.size),
        ).rowcount
        if inserted:
            self.completed += 1
            self._append(result=result_to_pb(spec, name, stored))
            self._done().add(item_key(spec))
        return bool(inserted)

    def _reload(self) -> None:
        """Forgets in-memory counts that a rolled-back transaction made; reads them again from the row."""
        row = self._db.execute("SELECT completed, last_seq FROM jobs WHERE id = ?", (self.id,)).fetchone()
        self.completed, self._last_seq = row["completed"], row["last_seq"]
        self._done_items = None

    def _record_progress(self) -> None:
        self._append(progress=pb.Progress(completed=self.completed, total=self.total))
        self._save()

    def results(self) -> Iterator[tuple[str, AnySpec]]:
        """(file name, spec) of every recorded result, in the order they were recorded."""
        rows = self._db.execute("SELECT name, spec FROM results WHERE job_id = ? ORDER BY rowid", (self.id,))
        for name, spec in rows.fetchall():
            yield name, spec_from_json(spec)

    def to_pb(self) -> pb.Job:
        job = pb.Job(
            id=self.id,
            state=STATE_TO_PB[self.state],
            total=self.total,
            completed=self.completed,
            error=self.error,
            created_at=self.created_at,
            priority=self.priority,
            owner=self.owner,
            preview_every=self.preview_every,
        )
        kind = self.summary.WhichOneof("kind")
        getattr(job, kind).CopyFrom(getattr(self.summary, kind))
        return job

    def events_after(self, seq: int) -> list[pb.JobEvent]:
        rows = self._db.execute(
            "SELECT event FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (self.id, seq, EVENTS_PER_READ),
        )
        return [pb.JobEvent.FromString(data) for (data,) in rows.fetchall()]


class JobStore:
    """The jobs of this farm, in STATE_DIR/jobs.sqlite3; a new store on the same directory sees them all."""

    def __init__(self, state_dir: Path):
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        path = Path(state_dir) / DATABASE
        # Used only from the scheduler's event loop thread; statements take microseconds.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self._open()
        except sqlite3.DatabaseError as error:
            self._db.close()
            # A ValueError, so the CLI says it in one line; nothing is written to the file, which stays as it was.
            raise ValueError(
                f"the job store {path} cannot be read ({error}): it is truncated or is not a renderfarm job store. "
                "It is left as it is: restore it from a backup, or move it (with its -wal file) away to start empty"
            ) from None

    def _open(self) -> None:
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode = WAL")
        # In WAL mode, NORMAL loses nothing when the process dies; only an OS crash can drop the last commits.
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._add_owners()
        self._db.executescript(SCHEMA)
        self._add_columns()
        rows = self._db.execute("SELECT * FROM jobs ORDER BY created_at, rowid").fetchall()
        self._jobs = {row["id"]: JobRecord(self._db, row) for row in rows}
        self._stopping = False

    def _add_owners(self) -> None:
        """A store written before jobs had owners: its jobs move into a table with the owner column
        (SQLite cannot change a UNIQUE constraint in place), owned by no one, so only admins see them."""
        columns = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if not columns or "owner" in columns:
            return
        with _transaction(self._db):
            self._db.execute(JOBS_TABLE.format(table="jobs_with_owners"))
            self._db.execute(
                f"INSERT INTO jobs_with_owners (owner, {JOBS_COLUMNS}) SELECT '', {JOBS_COLUMNS} FROM jobs"
            )
            self._db.execute("DROP TABLE jobs")
            self._db.execute("ALTER TABLE jobs_with_owners RENAME TO jobs")

    def _add_columns(self) -> None:
        """Nullable columns newer than a store: SQLite adds those in place."""
        for table, column, kind in ADDED_COLUMNS:
            if column not in {row["name"] for row in self._db.execute(f"PRAGMA table_info({table})")}:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def close(self) -> None:
        self._db.close()

    def create(self, request: pb.SubmitJobRequest, total: int, *, owner: str) -> JobRecord:
        job_id = uuid.uuid4().hex[:16]
        with _transaction(self._db):
            self._db.execute(
                f"INSERT INTO jobs (owner, {JOBS_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, 0, '', ?, 0, 0)",
                (
                    owner,
                    job_id,
                    request.request_id or None,
                    request.SerializeToString(),
                    JobState.QUEUED.value,
                    total,
                    time.time(),
                ),  # fmt: skip
            )
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            job = JobRecord(self._db, row)
            job._append(state=STATE_TO_PB[JobState.QUEUED])
            job._save()
        self._jobs[job.id] = job
        return job

    def add_results(self, results: list[tuple[JobRecord, AnySpec, str, StoredImage | None]]) -> list:
        """Records (job, spec, file name, stored or None) results in one transaction, each once; returns
        those that were new. Each job that got results gets one progress event after them; followers wake
        after the commit.
        """
        new, touched = [], {result[0].id: result[0] for result in results}
        try:
            with _transaction(self._db):
                for job, spec, name, stored in results:
                    if job._record(spec, name, stored):
                        new.append((job, spec, name, stored))
                for job in {result[0].id: result[0] for result in new}.values():
                    job._record_progress()
        except BaseException:
            # Rolled back: what the records counted in memory did not happen.
            for job in touched.values():
                job._reload()
            raise
        touched = {result[0].id: result[0] for result in new}
        for job in touched.values():
            job.wake_followers()
        return new

    def by_request_id(self, owner: str, request_id: str) -> JobRecord | None:
        """The owner's job of that request id: request ids are each user's own."""
        row = self._db.execute("SELECT id FROM jobs WHERE owner = ? AND request_id = ?", (owner, request_id)).fetchone()
        return self._jobs[row["id"]] if row else None

    def get(self, job_id: str) -> JobRecord | None:
        return self._jobs.get(job_id)

    def all(self) -> list[JobRecord]:
        return list(self._jobs.values())

    def delete(self, job: JobRecord) -> None:
        """Forgets a finished job: its row, results index, attempts and event log, in one transaction."""
        if not job.state.finished:
            raise ValueError(f"job {job.id} is {job.state.value}: only a finished job can be deleted")
        with _transaction(self._db):
            for table in ("events", "attempts", "results"):
                self._db.execute(f"DELETE FROM {table} WHERE job_id = ?", (job.id,))
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job.id,))
        del self._jobs[job.id]
        job.wake_followers()

    def finished_before(self, moment: float) -> list[JobRecord]:
        """Finished jobs that ended before `moment` (epoch seconds); one that ended before stores kept the
        time counts from its creation."""
        return [job for job in self._jobs.values()
                if job.state.finished and (job.finished_at or job.created_at) < moment]  # fmt: skip

    def owned_by(self, owner: str) -> list[JobRecord]:
        return [job for job in self._jobs.values() if job.owner == owner]

    def unfinished(self) -> list[JobRecord]:
        return [job for job in self._jobs.values() if not job.state.finished]

    async def follow(self, job: JobRecord, after_seq: int) -> AsyncIterator[list[pb.JobEvent] | None]:
        """The job's events after `after_seq`, then new ones as they come, until its final event; in runs
        of up to EVENTS_PER_READ, as they are read from the log.

        Yields None, and ends, if the scheduler stops first.
        """
        seq = max(0, after_seq)
        while True:
            appended = job.appended
            while events := job.events_after(seq):
                seq = events[-1].seq
                yield events
            if job.state.finished:
                return
            if self._stopping:
                yield None
                return
            await appended.wait()

    def stop_following(self) -> None:
        self._stopping = True
        for job in self._jobs.values():
            job.wake_followers()
