"""`workbench serve`: the find -> predict -> edit -> measure loop as a local web app.

    api        the FastAPI application: routes, error mapping (`create_app`)
    security   who may talk to the server (loopback, token), body size, paths inside the workspace
    workspace  the workspace folder: open models, their stack of edits (deltas on disk), exports
    jobs       background jobs (trace, edit, units, study) with progress, cancellation and a durable state
    editing    the knowledge-editing loop: answers, traces, frozen predictions, edits, verdicts
    units      a ShapesNet trojan's units ranked and ablated, beside random units; applied as an edit
    studies    stored `workbench reproduce` runs to browse, and a study started as a job
    static/    the page: plain HTML, CSS and JavaScript, shipped in the package (works offline)
"""

from __future__ import annotations

from workbench_app.api import AppConfig, create_app

__all__ = ["AppConfig", "create_app"]
