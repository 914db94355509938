"""The FastAPI application: routes, the page, and errors as one-line JSON messages.

    GET    /                              the page (static files ship in the package)
    GET    /api/health                    version, workspace, whether a token is needed
    GET    /api/models                    what can be opened: trained zoo models, folders, open models
    POST   /api/models                    open {"spec": "zoo:factgpt"} or {"folder": "models/x"}
    GET    /api/models/{key}              architecture, sites, accuracy, fingerprints, the stack of edits
    GET    /api/models/{key}/example      a fact of the model's world as a request (?seed=N)
    POST   /api/models/{key}/answers      top answers; with subject and target the checked request
    POST   /api/models/{key}/trace        start a causal trace job (202)
    POST   /api/models/{key}/edits        freeze and hash a prediction, start an edit job (202)
    GET    /api/models/{key}/edits        the stack
    DELETE /api/models/{key}/edits/{id}   undo the top edit, bit-exactly
    GET    /api/models/{key}/edits/{id}/delta   one delta as a safetensors file
    POST   /api/models/{key}/export       write the stack's deltas into a new workspace folder
    POST   /api/models/{key}/save         write the edited model (save_pretrained) into a new workspace folder
    GET    /api/models/{key}/units        ShapesNet: its trojans, the sites and ranking methods offered
    POST   /api/models/{key}/units        rank and ablate a trojan's units beside random units, as a job (202)
    POST   /api/models/{key}/units/{id}/apply   put that job's ablation on the stack of edits
    GET    /api/studies                   the studies that can be started (as `workbench reproduce` names them)
    POST   /api/studies                   start {"study": "4", "quick": true, "out": "runs/x"} as a study job (202)
    GET    /api/runs                      stored reproduce runs inside the workspace, newest first
    GET    /api/run?path=runs/x           one run: its studies and predictions with verdicts
                                          (&verdict=held&method=...&source=...&basis=...&study=... filter them)
    GET    /api/run/file?path=runs/x&name=report.html   a file the run wrote (report, figure, CSV, JSON)
    GET    /api/jobs                      jobs, newest first (?model=KEY&kind=trace|edit|units|study)
    GET    /api/jobs/{id}                 state, config, prediction, result
    GET    /api/jobs/{id}/events          server-sent events: state changes until the job ends
    POST   /api/jobs/{id}/cancel          ask a job to stop

User mistakes (`WorkbenchError`) answer 400 (404 for an unknown model, job or edit, 409 when
a job runs or the stack's order forbids it) with `{"error": "<the CLI's one-line message>"}`.
Study jobs run one at a time per workspace (a second is refused with 409 while one runs).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from workbench.errors import UnknownModelError, WorkbenchError
from workbench.storage import json_text
from workbench_app import editing, studies, units
from workbench_app.jobs import FINISHED, JobRunner
from workbench_app.security import MAX_BODY_BYTES, GuardMiddleware
from workbench_app.workspace import ConflictError, Workspace

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
EVENT_POLL_S = 0.1


@dataclass(frozen=True)
class AppConfig:
    """How a server runs: its workspace, token (None: loopback clients only), device and limits."""

    workspace: Path
    token: str | None = None
    device: str = "cpu"
    cache: str | None = None
    max_body: int = MAX_BODY_BYTES
    torch_threads: int | None = None
    studies: tuple[str, ...] = ()  # `module:Class` case studies this server also offers (they import code)


def one_line(exc: BaseException) -> str:
    """The message as the CLI prints it: lines joined with ' | '."""
    return " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _status(exc: WorkbenchError) -> int:
    if isinstance(exc, ConflictError):
        return 409
    if isinstance(exc, UnknownModelError):
        return 404
    return 400


class JSONText(JSONResponse):
    """Strict JSON (NaN as null), as the CLI's --json writes it."""

    def render(self, content: Any) -> bytes:
        return json_text(content).encode("utf-8")


async def _body(request: Request) -> dict[str, Any]:
    """The JSON object of a request, with one-line messages for bodies that are not one."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WorkbenchError(f"malformed JSON in the request body ({exc}); send one JSON object") from None
    if not isinstance(data, dict):
        raise WorkbenchError(f"the request body is a JSON {type(data).__name__}; send one JSON object")
    return data


def create_app(config: AppConfig) -> FastAPI:
    """The app over one workspace; the workspace is locked while the app runs (its lifespan)."""
    workspace = Workspace(config.workspace, device=config.device, cache=config.cache)
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if config.torch_threads is not None:
            import torch

            torch.set_num_threads(config.torch_threads)
        workspace.acquire()
        state["jobs"] = JobRunner(workspace.root / "jobs")
        try:
            yield
        finally:
            state["jobs"].shutdown()
            workspace.release()

    app = FastAPI(title="interpretability workbench", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.workspace = workspace
    app.state.config = config
    app.state.runtime = state

    def jobs() -> JobRunner:
        return state["jobs"]

    @app.exception_handler(WorkbenchError)
    async def _workbench_error(request: Request, exc: WorkbenchError) -> JSONResponse:
        return JSONText({"error": one_line(exc)}, status_code=_status(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return JSONText({"error": f"{where or 'request'}: {first.get('msg', 'invalid')}"}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            message = f"no such page or endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return JSONText({"error": message}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONText({"error": f"internal error: {type(exc).__name__}: {one_line(exc)}"}, status_code=500)

    # --- page -----------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/health")
    async def health() -> JSONResponse:
        return JSONText({"ok": True, "workspace": str(workspace.root), "token_required": config.token is not None,
                         "interrupted_at_start": jobs().interrupted})

    # --- models ---------------------------------------------------------------------------

    @app.get("/api/models")
    def list_models() -> JSONResponse:
        return JSONText(workspace.choices())

    @app.post("/api/models")
    async def open_model(request: Request) -> JSONResponse:
        body = await _body(request)
        spec, folder = body.get("spec"), body.get("folder")
        for name, value in (("spec", spec), ("folder", folder)):
            if value is not None and not isinstance(value, str):
                raise WorkbenchError(f"{name} must be text, e.g. \"zoo:factgpt\"")
        model = await asyncio.to_thread(workspace.open, spec=spec, folder=folder)
        return JSONText(await asyncio.to_thread(model.describe))

    @app.get("/api/models/{key}")
    def model_info(key: str) -> JSONResponse:
        model = workspace.get(key)
        out = model.describe()
        busy = jobs().busy(key)
        out["busy"] = busy.to_json() if busy is not None else None
        return JSONText(out)

    @app.get("/api/models/{key}/example")
    def example(key: str, seed: int = 0) -> JSONResponse:
        if not 0 <= seed <= 2**31 - 1:
            raise WorkbenchError(f"seed {seed}: expected an integer 0..{2**31 - 1}")
        model = workspace.get(key)
        jobs().check_free(key, model.spec)
        return JSONText(editing.example(model, seed))

    @app.post("/api/models/{key}/answers")
    async def answers(key: str, request: Request) -> JSONResponse:
        body = await _body(request)
        model = await asyncio.to_thread(workspace.get, key)
        jobs().check_free(key, model.spec)
        return JSONText(await asyncio.to_thread(editing.answers, model, body))

    async def model_job(key: str, request: Request, kind: str, parse: Any, run: Any) -> JSONResponse:
        """Start a `kind` job on an open model (202): the body parsed into its options, refused while the model is busy."""
        body = await _body(request)
        model = await asyncio.to_thread(workspace.get, key)
        jobs().check_free(key, model.spec)
        options = await asyncio.to_thread(parse, model, body)
        job = jobs().submit(key, model.spec, kind, options, lambda ctx: run(model, options, ctx))
        return JSONText({"job": job.to_json()}, status_code=202)

    @app.post("/api/models/{key}/trace", status_code=202)
    async def trace(key: str, request: Request) -> JSONResponse:
        return await model_job(key, request, "trace", editing.trace_request, editing.run_trace)

    @app.post("/api/models/{key}/edits", status_code=202)
    async def edit(key: str, request: Request) -> JSONResponse:
        body = await _body(request)
        model = await asyncio.to_thread(workspace.get, key)
        jobs().check_free(key, model.spec)
        prediction, rw = await asyncio.to_thread(editing.edit_request, model, body)
        job = jobs().submit(key, model.spec, "edit", {"request": prediction["edit"], "rewrite": prediction["rewrite"]},
                            lambda ctx: editing.run_edit(model, prediction, rw, ctx), prediction=prediction)
        return JSONText({"job": job.to_json(), "prediction": prediction, "prediction_sha256": job.prediction_sha256},
                        status_code=202)

    @app.get("/api/models/{key}/edits")
    def stack(key: str) -> JSONResponse:
        model = workspace.get(key)
        return JSONText({"stack": model.stack(), "fingerprint": model.fingerprint(),
                         "original_fingerprint": model.original_fingerprint})

    @app.delete("/api/models/{key}/edits/{edit_id}")
    def undo(key: str, edit_id: str) -> JSONResponse:
        model = workspace.get(key)
        jobs().check_free(key, model.spec)
        return JSONText(model.undo(edit_id))

    @app.get("/api/models/{key}/edits/{edit_id}/delta")
    def delta_file(key: str, edit_id: str) -> Response:
        model = workspace.get(key)
        entry = next((e for e in model.stack() if e["id"] == edit_id), None)
        if entry is None:
            raise UnknownModelError(f"edit {edit_id!r} is not in the stack of {model.spec}")
        return FileResponse(model.delta_path(entry), media_type="application/octet-stream",
                            filename=f"{edit_id}.safetensors")

    @app.post("/api/models/{key}/export")
    async def export(key: str, request: Request) -> JSONResponse:
        body = await _body(request)
        model = await asyncio.to_thread(workspace.get, key)
        folder = body.get("folder")
        if not isinstance(folder, str):
            raise WorkbenchError("folder is missing: give a new folder inside the workspace, e.g. exports/my-edits")
        return JSONText(await asyncio.to_thread(model.export, folder))

    @app.post("/api/models/{key}/save")
    async def save(key: str, request: Request) -> JSONResponse:
        body = await _body(request)
        model = await asyncio.to_thread(workspace.get, key)
        jobs().check_free(key, model.spec)
        folder = body.get("folder")
        if not isinstance(folder, str):
            raise WorkbenchError("folder is missing: give a new folder inside the workspace, e.g. models/edited")
        return JSONText(await asyncio.to_thread(model.save_model, folder))

    # --- units -----------------------------------------------------------------------------

    @app.get("/api/models/{key}/units")
    def units_options(key: str) -> JSONResponse:
        model = workspace.get(key)
        return JSONText(units.options(model))

    @app.post("/api/models/{key}/units", status_code=202)
    async def units_job(key: str, request: Request) -> JSONResponse:
        return await model_job(key, request, "units", units.units_request, units.run_units)

    @app.post("/api/models/{key}/units/{job_id}/apply")
    async def units_apply(key: str, job_id: str) -> JSONResponse:
        model = await asyncio.to_thread(workspace.get, key)
        jobs().check_free(key, model.spec)
        record = jobs().record(job_id)
        return JSONText(await asyncio.to_thread(units.apply, model, record, jobs().root / job_id))

    # --- studies ---------------------------------------------------------------------------

    catalogue: dict[str, Any] = {}

    @app.get("/api/studies")
    def list_studies() -> JSONResponse:
        if "rows" not in catalogue:  # imports every study module once per app
            catalogue["rows"] = studies.catalogue(config.studies)
        busy = jobs().busy(studies.STUDY_JOBS)
        return JSONText({"studies": catalogue["rows"], "runs_folder": studies.RUNS,
                         "busy": busy.to_json() if busy is not None else None})

    @app.post("/api/studies", status_code=202)
    async def start_study(request: Request) -> JSONResponse:
        body = await _body(request)
        jobs().check_free(studies.STUDY_JOBS, "this workspace")
        study, out, options = await asyncio.to_thread(studies.study_request, workspace.root, body, config.studies)
        job = jobs().submit(studies.STUDY_JOBS, "this workspace", "study", options,
                            lambda ctx: studies.run_study(study, out, workspace.root, ctx, device=config.device))
        return JSONText({"job": job.to_json(), "out": options["out"]}, status_code=202)

    def _writing() -> str | None:
        """The run folder the running study job writes, if one runs."""
        busy = jobs().busy(studies.STUDY_JOBS)
        if busy is None:
            return None
        cfg = jobs().record(busy.id).get("config") or {}
        return cfg.get("out")

    @app.get("/api/runs")
    def list_runs() -> JSONResponse:
        writing = _writing()
        runs = studies.list_runs(workspace.root)
        for r in runs:
            r["running"] = r["path"] == writing
        return JSONText({"runs": runs})

    @app.get("/api/run")
    def view_run(request: Request, path: str | None = None) -> JSONResponse:
        folder = studies.run_folder(workspace.root, path)
        filters = studies.check_filters(request.query_params)
        out = studies.view_run(workspace.root, folder, filters)
        out["running"] = out["path"] == _writing()
        return JSONText(out)

    @app.get("/api/run/file")
    def run_file(path: str | None = None, name: str | None = None) -> Response:
        folder = studies.run_folder(workspace.root, path)
        file, media = studies.run_file(workspace.root, folder, name)
        # a report opens as a page of its own origin-less sandbox: it can show, not script this app
        headers = {"Content-Security-Policy": "sandbox", "X-Content-Type-Options": "nosniff",
                   "Cache-Control": "no-store"}
        return FileResponse(file, media_type=media, headers=headers)

    # --- jobs ------------------------------------------------------------------------------

    @app.get("/api/jobs")
    def list_jobs(model: str | None = None, kind: str | None = None, limit: int = 50) -> JSONResponse:
        if kind is not None and kind not in ("trace", "edit", "units", "study"):
            raise WorkbenchError(f"kind {kind!r}: expected trace, edit, units or study")
        if not 1 <= limit <= 500:
            raise WorkbenchError(f"limit {limit}: expected 1..500")
        return JSONText({"jobs": jobs().list(model=model, kind=kind, limit=limit)})

    @app.get("/api/jobs/{job_id}")
    def job(job_id: str) -> JSONResponse:
        return JSONText(jobs().record(job_id))

    @app.post("/api/jobs/{job_id}/cancel")
    def cancel(job_id: str) -> JSONResponse:
        return JSONText({"job": jobs().cancel(job_id).to_json()})

    @app.get("/api/jobs/{job_id}/events")
    async def events(job_id: str, request: Request) -> StreamingResponse:
        jobs().get(job_id)  # 404 before the stream starts

        async def stream() -> AsyncIterator[str]:
            seen = -1
            while True:
                current = jobs().get(job_id)
                if current.version != seen:
                    seen = current.version
                    yield f"event: state\ndata: {json_text(current.to_json())}\n\n"
                if current.status in FINISHED:
                    yield f"event: end\ndata: {json_text({'status': current.status})}\n\n"
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(EVENT_POLL_S)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    app.add_middleware(GuardMiddleware, token=config.token, max_body=config.max_body)
    return app
