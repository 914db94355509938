"""Background jobs: one at a time per model, with progress, cancellation and a durable state.

Each job is a run folder (`workbench.results.RunStore`) under `WORKSPACE/jobs/<id>/`:
`config.json` (what was asked), `prediction.json` (edits: frozen before anything runs),
`state.json` (status, progress, message, times) and, when it finished, `summary.json` (the
result). All writes are atomic. A server that starts finds jobs left `queued` or `running`
by a server that died and marks them `interrupted`, so nothing is lost silently.

Cancellation is cooperative: a job's `ctx.progress(...)` raises `Cancelled` once cancel was
asked, until the job declares the point of no return (`ctx.commit()`, e.g. an edit applied).
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from workbench.errors import UnknownModelError, WorkbenchError
from workbench.results import RunStore
from workbench.storage import atomic_write_json
from workbench_app.workspace import ConflictError, read_json

log = logging.getLogger(__name__)

STATE_JSON = "state.json"
ACTIVE = ("queued", "running")
FINISHED = ("done", "failed", "cancelled", "interrupted")
_ID = re.compile(r"^[0-9]{13}-[0-9a-f]{6}$")


class Cancelled(Exception):
    """Raised inside a job by `ctx.progress` after a cancel request."""


@dataclass
class JobState:
    """What a page needs to follow a job; `version` grows with every change (server-sent events poll it)."""

    id: str
    kind: str
    model: str
    status: str = "queued"
    progress: float = 0.0
    message: str = "queued"
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    cancel_requested: bool = False
    cancellable: bool = True
    prediction_sha256: str | None = None
    version: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class JobContext:
    """Handed to a job's function: progress reports, cancellation checks, the run folder."""

    def __init__(self, runner: JobRunner, state: JobState, store: RunStore) -> None:
        self._runner = runner
        self.state = state
        self.store = store
        self._cancel = threading.Event()

    def progress(self, fraction: float, message: str) -> None:
        """Report progress; raises `Cancelled` when cancel was asked and the job can still stop."""
        if self._cancel.is_set() and self.state.cancellable:
            raise Cancelled()
        self._runner._update(self.state, progress=max(0.0, min(1.0, float(fraction))), message=message)

    def commit(self, message: str) -> None:
        """From here on the job finishes even if cancel is asked (its effect is already in place)."""
        if self._cancel.is_set() and self.state.cancellable:
            raise Cancelled()
        self._runner._update(self.state, cancellable=False, message=message)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set() and self.state.cancellable


JobFn = Callable[[JobContext], Mapping[str, Any]]


class JobRunner:
    """Starts jobs on threads, one per model at a time, and keeps their state on disk."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._states: dict[str, JobState] = {}
        self._contexts: dict[str, JobContext] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._active: dict[str, str] = {}  # model key -> job id
        self._stopping = False
        self.interrupted = self._mark_interrupted()

    # --- on start -----------------------------------------------------------------------

    def _mark_interrupted(self) -> list[str]:
        """Jobs a dead server left queued or running become `interrupted` (with when and why)."""
        found = []
        for d in sorted(self.root.iterdir()):
            if not _ID.match(d.name):
                continue
            state = read_json(d / STATE_JSON, None)
            if isinstance(state, dict) and state.get("status") in ACTIVE:
                state.update(status="interrupted", finished=time.time(), cancellable=False,
                             error="the server stopped while this job ran; it did not finish (start it again)",
                             message="interrupted", version=int(state.get("version", 0)) + 1)
                atomic_write_json(d / STATE_JSON, state)
                found.append(d.name)
        if found:
            log.warning("marked %d job(s) interrupted: %s", len(found), ", ".join(found))
        return found

    # --- submit, cancel -----------------------------------------------------------------

    def busy(self, model: str) -> JobState | None:
        """The job running on `model`, if any."""
        with self._lock:
            job_id = self._active.get(model)
            return self._states[job_id] if job_id is not None else None

    def check_free(self, model: str, spec: str) -> None:
        job = self.busy(model)
        if job is not None:
            raise ConflictError(f"{_article(job.kind)} {job.kind} job ({job.id}) is running on {spec}; wait for it to finish or cancel "
                                "it, then try again")

    def submit(self, model: str, spec: str, kind: str, config: Mapping[str, Any], fn: JobFn, *,
               prediction: Any = None) -> JobState:
        """Start `fn` on a thread; refused (409) while another job runs on the same model."""
        job_id = f"{int(time.time() * 1000):013d}-{secrets.token_hex(3)}"
        state = JobState(job_id, kind, model)
        store = RunStore(self.root / job_id)
        with self._lock:
            if model in self._active:
                other = self._states[self._active[model]]
                raise ConflictError(f"{_article(other.kind)} {other.kind} job ({other.id}) is running on {spec}; wait for it to finish or "
                                    "cancel it, then try again")
            self._active[model] = job_id
            self._states[job_id] = state
        try:
            store.write_config({"kind": kind, "model": model, "spec": spec, **dict(config)})
            if prediction is not None:
                state.prediction_sha256 = store.write_prediction(prediction)
            self._save(state)
            ctx = JobContext(self, state, store)
            thread = threading.Thread(target=self._run, args=(ctx, fn), name=f"job-{job_id}", daemon=True)
            with self._lock:
                self._contexts[job_id] = ctx
                self._threads[job_id] = thread
            thread.start()
        except BaseException:
            with self._lock:
                self._active.pop(model, None)
            raise
        return state

    def cancel(self, job_id: str) -> JobState:
        state = self.get(job_id)
        with self._lock:
            ctx = self._contexts.get(job_id)
        if ctx is None or state.status in FINISHED:
            raise ConflictError(f"job {job_id} is {state.status}; only a queued or running job can be cancelled")
        if not state.cancellable:
            raise ConflictError(f"job {job_id} is past its point of no return ({state.message}); let it finish, then "
                                "undo its edit")
        ctx._cancel.set()
        self._update(state, cancel_requested=True, message="cancelling")
        return state

    # --- the thread -----------------------------------------------------------------------

    def _run(self, ctx: JobContext, fn: JobFn) -> None:
        state = ctx.state
        self._update(state, status="running", started=time.time(), message="started")
        try:
            result = dict(fn(ctx))
            ctx.store.write_summary(result)
            self._update(state, status="done", progress=1.0, finished=time.time(), cancellable=False,
                         message=str(result.get("message", "done")))
        except Cancelled:
            if self._stopping:  # not the user's choice: the server is going down
                self._update(state, status="interrupted", finished=time.time(), cancellable=False,
                             error="the server stopped while this job ran; it did not finish (start it again)",
                             message="interrupted")
            else:
                self._update(state, status="cancelled", finished=time.time(), cancellable=False, message="cancelled")
        except WorkbenchError as exc:
            message = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            self._update(state, status="failed", finished=time.time(), cancellable=False, error=message,
                         message="failed")
        except Exception as exc:  # a bug must end the job visibly, not kill the server
            log.exception("job %s failed", state.id)
            self._update(state, status="failed", finished=time.time(), cancellable=False,
                         error=f"internal error: {type(exc).__name__}: {exc}", message="failed")
        finally:
            with self._lock:
                if self._active.get(state.model) == state.id:
                    del self._active[state.model]
                self._contexts.pop(state.id, None)

    def _update(self, state: JobState, **changes: Any) -> None:
        with self._lock:
            for k, v in changes.items():
                setattr(state, k, v)
            state.version += 1
        self._save(state)

    def _save(self, state: JobState) -> None:
        atomic_write_json(self.root / state.id / STATE_JSON, state.to_json())

    # --- reading ----------------------------------------------------------------------------

    def get(self, job_id: str) -> JobState:
        """A job's state: in memory while this server knows it, else from its folder."""
        if not isinstance(job_id, str) or not _ID.match(job_id):
            raise UnknownModelError(f"unknown job {job_id!r}; job ids look like 1765152000000-a1b2c3")
        with self._lock:
            state = self._states.get(job_id)
        if state is not None:
            return state
        data = read_json(self.root / job_id / STATE_JSON, None)
        if not isinstance(data, dict):
            raise UnknownModelError(f"unknown job {job_id!r}; GET /api/jobs lists them")
        known = {f for f in JobState.__dataclass_fields__}
        return JobState(**{k: v for k, v in data.items() if k in known})

    def record(self, job_id: str) -> dict[str, Any]:
        """State, config, prediction and (when done) result of a job."""
        state = self.get(job_id)
        store = RunStore(self.root / job_id)
        out: dict[str, Any] = {"state": state.to_json(), "config": read_json(store.root / "config.json", None),
                               "prediction": read_json(store.root / "prediction.json", None), "result": None}
        if state.status == "done":
            out["result"] = read_json(store.root / "summary.json", None)
        return out

    def list(self, *, model: str | None = None, kind: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Newest first."""
        out = []
        for d in sorted(self.root.iterdir(), reverse=True):
            if not _ID.match(d.name):
                continue
            try:
                state = self.get(d.name)
            except WorkbenchError:
                continue
            if (model is None or state.model == model) and (kind is None or state.kind == kind):
                out.append(state.to_json())
            if len(out) >= limit:
                break
        return out

    def wait(self, job_id: str, timeout: float = 60.0) -> JobState:
        """Block until the job ends (tests and scripts)."""
        with self._lock:
            thread = self._threads.get(job_id)
        if thread is not None:
            thread.join(timeout)
        return self.get(job_id)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask every running job to stop (they end `interrupted`) and wait a little for them."""
        self._stopping = True
        with self._lock:
            contexts = list(self._contexts.values())
            threads = list(self._threads.values())
        for ctx in contexts:
            ctx._cancel.set()
        deadline = time.time() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.time()))


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"
