"""The human study's web app: the annotation page and its API.

Keeping the study sound over HTTP: annotators sign in with a participant token issued by the
study owner (``personafuse annotate tokens``), so an identity cannot be typed in by someone else;
each participant holds at most one open pair, so ``/api/next`` cannot lock pairs away from others;
``/api/summary`` (systems and running votes) needs the owner key; and writes accept JSON bodies only.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

# Module level, not inside create_annotation_app: FastAPI resolves the (postponed) annotations of
# the route functions from this module's globals.
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from personafuse.evaluation.annotation.results import pair_outcomes
from personafuse.evaluation.annotation.store import AnnotationError, AnnotationStore
from personafuse.serving.schemas import BadRequest, check_tree, parse_json

MAX_BODY_BYTES = 64 * 1024


class Refused(Exception):
    """An HTTP error of the annotation app (401, 413, 415, ...), answered in its JSON error shape."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _bearer(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else ""


def _participant(store: AnnotationStore, request: Request) -> str:
    token = _bearer(request)
    who = store.participant(token) if token else None
    if who is None:
        raise Refused(401, "sign in with the participant token the study owner gave you" if not token else "unknown participant token")
    return who


async def _json_body(request: Request) -> dict[str, Any]:
    """A JSON object body. Only ``application/json``: an HTML form or a text/plain post from another
    site (which a browser sends without asking) is refused."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise Refused(415, "send the judgement as JSON (Content-Type: application/json)")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise Refused(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        body = parse_json(raw)
        check_tree(body)
    except BadRequest as e:
        raise AnnotationError(e.message) from None
    if not isinstance(body, dict):
        raise AnnotationError("the request body must be a JSON object")
    return body


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message}}, status_code=status)


def create_annotation_app(store: AnnotationStore, owner_key: str | None = None) -> FastAPI:
    """The annotation page and its API. ``owner_key`` guards ``/api/summary``; without one a
    random key is made (``app.state.owner_key``; ``personafuse annotate serve`` prints it)."""
    if owner_key is not None and not owner_key.strip():
        raise ValueError("owner_key is empty: give a key, or leave it out to have one made")
    static = Path(__file__).parents[1] / "static"  # evaluation/static
    app = FastAPI(title="PersonaFuse human evaluation")
    app.state.owner_key = owner_key = owner_key or secrets.token_urlsafe(24)

    @app.exception_handler(AnnotationError)
    async def _bad(_request: Request, exc: AnnotationError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(Refused)
    async def _refused(_request: Request, exc: Refused) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(_request: Request, _exc: Exception) -> JSONResponse:
        return _error(500, "internal error (the details are in the server log)")  # the log has the traceback

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(static / "annotate.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        if name not in ("annotate.js", "annotate.css"):
            raise Refused(404, "no such file")
        return FileResponse(static / name)

    @app.get("/api/next")
    def next_pair(request: Request) -> dict[str, Any]:
        who = _participant(store, request)
        return {"participant": who, "pair": store.next_pair(who), "progress": store.progress(who)}

    @app.post("/api/judgements")
    async def judge(request: Request) -> dict[str, Any]:
        who = _participant(store, request)
        body = await _json_body(request)
        # The identity is the token's; an "annotator" key (the old page sent one) is ignored.
        store.record(who, body.get("pair_id"), body)  # type: ignore[arg-type]
        return {"participant": who, "pair": store.next_pair(who), "progress": store.progress(who)}

    @app.get("/api/summary")
    def summary(request: Request) -> dict[str, Any]:
        if not secrets.compare_digest(_bearer(request).encode(), owner_key.encode()):
            raise Refused(401, "the summary needs the owner key: send 'Authorization: Bearer <owner key>'")
        return {"pairs": store.count_pairs(), "annotators_per_pair": store.annotators_per_pair,
                "judgements": len(store.judgements()), "outcomes": pair_outcomes(store)}

    return app
