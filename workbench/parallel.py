"""Independent cases run as Ray tasks: a local Ray runtime by default, or a cluster by address.

A study's cases are independent by construction (each seeds itself from its id), so they can
run anywhere. Each task rebuilds what the case needs in its worker process (the study's setup
for one model, loaded by spec, kept for the worker's later tasks), runs the case and writes its
record into the run store itself (an atomic write of one file named by the case id). So a case
lands in the store exactly once: a worker that dies mid-case wrote nothing, and Ray runs the
task again (`RETRIES`); a retry after a finished write rewrites the same file with the same
record. The driver only waits, counts and reports.

Ray is an optional dependency (`pip install 'interp-workbench[ray]'`); a one-process run
needs none of this.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.progress import progress_bar

log = logging.getLogger(__name__)

RETRIES = 3
"""Times Ray reruns a case whose worker died (a crash, a kill, a lost node)."""
MAX_WORKERS = 1024


def check_workers(workers: Any, address: str | None = None) -> int:
    """A number of workers (>= 1); `address` (joining a cluster) needs Ray, so it needs workers > 1 too."""
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
        raise WorkbenchError(f"workers={workers!r}: expected an integer 1..{MAX_WORKERS} (1 runs in this process)")
    if address is not None and workers < 2:
        raise WorkbenchError("--ray-address joins a Ray cluster for parallel cases; give --workers 2 or more with it")
    return workers


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise WorkbenchError("parallel runs (--workers > 1) need Ray: pip install 'interp-workbench[ray]'") from None
    return ray


@contextlib.contextmanager
def ray_runtime(workers: int, address: str | None = None) -> Iterator[Any]:
    """Ray, initialized for this block: a local runtime with `workers` CPUs, or the cluster at `address`.

    Workers import the same packages as this process (its `sys.path` goes with them). A runtime
    this block started is shut down after it; one that was already running is left as it was.
    """
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report over the network
    env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1",
           "WORKBENCH_CACHE": os.environ.get("WORKBENCH_CACHE", "")}
    env = {k: v for k, v in env.items() if v}
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "runtime_env": {"env_vars": env},
                              "configure_logging": False}
    try:
        if address is None:
            ray.init(num_cpus=workers, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = "a local Ray runtime" if address is None else f"the Ray cluster at {address!r}"
        raise WorkbenchError(f"could not start {where}: {exc}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


# --- worker side ---------------------------------------------------------------------------------

_worker_states: dict[tuple[str, int], tuple[Any, Any]] = {}


def _state_for(study: Any, key: str, index: int, device: str) -> tuple[Any, Any]:
    """(suite model or None, setup state) of `study`'s model `index` in this worker, built once per worker."""
    if (key, index) not in _worker_states:
        _worker_states[(key, index)] = study.fresh_state(index, device)
    return _worker_states[(key, index)]


def _run_case(study: Any, key: str, root: str, case_id: str, index: int, seed: int, case_key: str,
              digest: str, device: str, threads: int | None) -> str:
    """One case in a Ray worker: run it and write its record into the store at `root`."""
    import torch

    from workbench.results import RunStore

    if threads is not None:
        torch.set_num_threads(threads)
    store = RunStore(root)
    model, state = _state_for(study, key, index, device)
    store.write_case(case_id, study.case_record(store, state, model, seed, case_key, digest))
    return case_id


# --- driver side ---------------------------------------------------------------------------------

def run_cases_on_ray(study: Any, store: Any, todo: Sequence[str], index: Mapping[str, tuple[int, int, str]],
                     digest: str, *, device: str, threads: int | None, done_before: int = 0, progress: bool = True,
                     ray: Any = None) -> None:
    """Run the cases `todo` of `study` as Ray tasks (Ray must be initialized: `ray_runtime`)."""
    ray = ray or _import_ray()
    if not ray.is_initialized():
        raise WorkbenchError("run_cases_on_ray needs a running Ray runtime (with workbench.parallel.ray_runtime(...))")
    from workbench.storage import sha256_json

    key = f"{type(study).__module__}.{type(study).__qualname__}:{sha256_json(study.config())}"
    task = ray.remote(max_retries=RETRIES, num_cpus=1)(_run_case)
    study_ref = ray.put(study)
    root = str(Path(store.root).resolve())
    pending = [task.remote(study_ref, key, root, cid, *index[cid], digest, device, threads) for cid in todo]
    total = done_before + len(todo)
    with progress_bar(total=total, initial=done_before, desc=study.name, enabled=progress) as bar:
        while pending:
            finished, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(finished)
            except Exception as exc:  # a case that raised, or whose worker died more than RETRIES times
                for ref in pending:
                    ray.cancel(ref, force=True)
                cause = getattr(exc, "cause", None) or exc
                raise WorkbenchError(f"study {study.name}: a case failed on a Ray worker: "
                                     f"{type(cause).__name__}: {cause}") from None
            bar.update(1)


def map_on_ray(fn: Any, calls: Sequence[Mapping[str, Any]], *, desc: str = "tasks", progress: bool = True,
               ray: Any = None) -> list[Any]:
    """`fn(**call)` for each call as Ray tasks (Ray must be initialized); results in the order of `calls`.

    For work that shares its state elsewhere (optuna workers on one RDB study): a worker that dies
    is rerun like a case, and the first task that raises stops the others.
    """
    ray = ray or _import_ray()
    if not ray.is_initialized():
        raise WorkbenchError("map_on_ray needs a running Ray runtime (with workbench.parallel.ray_runtime(...))")
    task = ray.remote(max_retries=RETRIES, num_cpus=1)(fn)
    refs = [task.remote(**call) for call in calls]
    order = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    pending = list(refs)
    with progress_bar(total=len(refs), desc=desc, enabled=progress) as bar:
        while pending:
            finished, pending = ray.wait(pending, num_returns=1)
            try:
                results[order[finished[0]]] = ray.get(finished[0])
            except Exception as exc:
                for ref in pending:
                    ray.cancel(ref, force=True)
                cause = getattr(exc, "cause", None) or exc
                raise WorkbenchError(f"{desc}: a task failed on a Ray worker: {type(cause).__name__}: {cause}") from None
            bar.update(1)
    return results
