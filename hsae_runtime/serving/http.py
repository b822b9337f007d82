"""The HTTP/JSON API (``serve --http-port``): FastAPI routes over the same gRPC servicer.

=======================  ==========================================================
route                    does
=======================  ==========================================================
``GET /v1/info``         ``Info``
``POST /v1/encode``      ``Encode`` (text, token ids or activations -> sparse code)
``POST /v1/encode/raw``  ``Encode`` of raw activation bytes (:mod:`.http_raw`)
``POST /v1/decode``      ``Decode`` (code -> reconstructions)
``POST /v1/generate``    ``Generate``; ``"stream": true`` answers server-sent events
``GET /healthz``         200 while the process runs (no token needed)
``GET /readyz``          200 while it takes work, 503 while draining (no token needed)
``/features/...``        the static folder of ``serve --features DIR``, if given
=======================  ==========================================================

Why FastAPI: pydantic models give validation and the OpenAPI document
(``docs/openapi.json``, checked by the tests) from one definition, and Starlette streams
server-sent events. Every route converts its JSON body to the proto request
(:mod:`.http_models`) and calls the servicer's method undecorated - the same parsing,
tokenising, batching and limits as gRPC, in the same process and batcher - then answers the
proto response as JSON. Errors go through the one table in :mod:`.errors`
(:func:`~hsae_runtime.serving.errors.http_status_for`): bad input 400, no or wrong token 401,
body or response too large 413, queue or stream limit 429, shutting down 503. The same bearer
token as gRPC is required (``Authorization: Bearer <token>``) except on the probes. A body is
refused (413) past the server's message size, before it is parsed.

Handlers are plain functions: Starlette runs them on its thread pool, where they block on the
batcher as gRPC handler threads do. A streamed generation runs its steps on that pool too,
and a client that disconnects cancels the call, which frees its place in the batch.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hsae_runtime.errors import InputError
from hsae_runtime.serving import http_models as m
from hsae_runtime.serving import http_raw
from hsae_runtime.serving.errors import AuthError, OversizeError, http_status_for
from hsae_runtime.serving.limits import ServingLimits
from hsae_runtime.serving.metrics import ServerMetrics

log = logging.getLogger(__name__)

API_TITLE = "hsae-runtime"
API_VERSION = "v1"
_END = object()


class CallContext:
    """What a servicer method needs from a gRPC context, for a call that came over HTTP."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[[], None]] = []
        self._cancelled = threading.Event()

    def time_remaining(self) -> float | None:
        return None

    def is_active(self) -> bool:
        return not self._cancelled.is_set()

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self._callbacks.append(callback)
        return True

    def cancel(self) -> None:
        """The client went away: run the callbacks (the batcher drops the work)."""
        if not self._cancelled.is_set():
            self._cancelled.set()
            for callback in self._callbacks:
                callback()

    def peer(self) -> str:
        return "http"

    def invocation_metadata(self) -> tuple:
        return ()

    def abort(self, code: Any, details: str) -> None:
        raise AssertionError("HTTP calls run the servicer's undecorated methods")


def _undecorated(servicer: Any, name: str) -> Callable[..., Any]:
    """The servicer method without its gRPC status wrapper (errors reach the HTTP table)."""
    method = getattr(type(servicer), name)
    inner = getattr(method, "__wrapped__", method)
    return lambda request, context: inner(servicer, request, context)


def error_response(err: BaseException) -> JSONResponse:
    status, code, message = http_status_for(err)
    return JSONResponse({"code": code, "message": message}, status_code=status)


class BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes (413) before anything parses them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._refuse(int(length), scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise OversizeError(self._message(seen))
            return message

        await self.app(scope, counted, send)

    def _message(self, size: int) -> str:
        return (
            f"the request body has {size} bytes, over the server's {self.limit}-byte message "
            "limit; send fewer rows, or tensors as base64 `data`"
        )

    async def _refuse(self, size: int, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(OversizeError(self._message(size)))(scope, receive, send)


def create_app(
    servicer: Any | None,
    *,
    token: str | None = None,
    metrics: ServerMetrics | None = None,
    max_body_bytes: int = ServingLimits.max_message_bytes,
    features_dir: Path | None = None,
    ready: Callable[[], bool] | None = None,
) -> FastAPI:
    """The app for ``servicer`` (``None`` builds the routes only, e.g. for the OpenAPI document).

    ``ready`` says whether the server takes work (default: the servicer's gate is not
    draining); ``features_dir`` is served under ``/features``.
    """
    app = FastAPI(
        title=API_TITLE,
        version=API_VERSION,
        description="HTTP/JSON API of the hsae-runtime SAE server (same contract as hsae.v1).",
    )
    bearer = HTTPBearer(auto_error=False, description="The server's token (serve --token-file).")
    expected = f"Bearer {token}".encode() if token else None

    def authorise(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if expected is None:
            return
        got = f"{credentials.scheme} {credentials.credentials}" if credentials else ""
        if not hmac.compare_digest(got.encode(), expected):
            raise AuthError("missing or wrong token: send header 'Authorization: Bearer <token>'")

    def run(route: str, work: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            if servicer is None:
                raise InputError("this app has no servicer (built for its OpenAPI document)")
            result: Any = work()
            status = 200
        except Exception as err:  # noqa: BLE001 - mapped by the one table
            result = error_response(err)
            status = result.status_code
        if metrics is not None:
            metrics.observe_request(route, str(status), time.perf_counter() - start)
        return result

    @app.exception_handler(AuthError)
    async def _auth_failed(request: Request, err: AuthError) -> JSONResponse:
        if metrics is not None:
            metrics.observe_request(f"{request.method} {request.url.path}", "401", 0.0)
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"invalid request body at {where or 'the top'}: {first.get('msg', err)}"
        if metrics is not None:
            metrics.observe_request(f"{request.method} {request.url.path}", "400", 0.0)
        return error_response(InputError(message, hint="see docs/openapi.json"))

    errors: dict[int | str, dict[str, Any]] = {
        400: {"model": m.ErrorJSON},
        401: {"model": m.ErrorJSON},
    }
    auth = [Depends(authorise)]

    @app.get(
        "/v1/info",
        response_model=m.InfoResponseJSON,
        responses=errors,
        dependencies=auth,
        response_model_exclude_none=True,
    )
    def info() -> Any:
        def work() -> Any:
            answer = _undecorated(servicer, "Info")(m.pb.InfoRequest(), CallContext())
            return m.info_from_pb(answer)

        return run("GET /v1/info", work)

    @app.post(
        "/v1/encode",
        response_model=m.EncodeResponseJSON,
        responses=errors,
        dependencies=auth,
        response_model_exclude_none=True,
    )
    def encode(body: m.EncodeRequestJSON) -> Any:
        def work() -> Any:
            answer = _undecorated(servicer, "Encode")(m.encode_request_to_pb(body), CallContext())
            return m.encode_response_from_pb(answer, body.binary)

        return run("POST /v1/encode", work)

    @app.post(
        "/v1/decode",
        response_model=m.DecodeResponseJSON,
        responses=errors,
        dependencies=auth,
        response_model_exclude_none=True,
    )
    def decode(body: m.DecodeRequestJSON) -> Any:
        def work() -> Any:
            answer = _undecorated(servicer, "Decode")(m.decode_request_to_pb(body), CallContext())
            return m.decode_response_from_pb(answer, body.binary)

        return run("POST /v1/decode", work)

    http_raw.add_route(
        app, lambda req: _undecorated(servicer, "Encode")(req, CallContext()), run, auth, errors
    )

    sse = {"text/event-stream": {"schema": {"type": "string"}}}
    generate_responses: dict[int | str, dict[str, Any]] = {
        200: {"content": sse, "description": "GenerateResultJSON, or one event per token"},
        **errors,
    }

    @app.post(
        "/v1/generate",
        response_model=m.GenerateResultJSON,
        responses=generate_responses,
        dependencies=auth,
        response_model_exclude_none=True,
    )
    async def generate(body: m.GenerateRequestJSON) -> Any:
        route = "POST /v1/generate"
        if servicer is None:
            return run(route, lambda: None)
        context = CallContext()
        try:
            request = m.generate_request_to_pb(body)
            steps = _undecorated(servicer, "Generate")(request, context)
            first = await run_in_threadpool(next, steps, _END)  # errors before the first token
        except Exception as err:  # noqa: BLE001 - mapped by the one table
            context.cancel()
            failure = err
            return run(route, lambda: http_raw.reraise(failure))
        if not body.stream:
            return await run_in_threadpool(run, route, lambda: _collect(first, steps, body))
        return StreamingResponse(
            _events(first, steps, body, context, metrics), media_type="text/event-stream"
        )

    @app.get("/healthz", include_in_schema=True)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": m.ErrorJSON}})
    def readyz() -> Any:
        is_ready = ready if ready is not None else _gate_open(servicer)
        if is_ready():
            return {"status": "ready"}
        return JSONResponse({"code": "UNAVAILABLE", "message": "draining"}, status_code=503)

    if features_dir is not None:
        from fastapi.staticfiles import StaticFiles

        app.mount("/features", StaticFiles(directory=features_dir, html=True), name="features")
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    return app


def _gate_open(servicer: Any | None) -> Callable[[], bool]:
    gate = getattr(servicer, "gate", None)
    return lambda: servicer is not None and not getattr(gate, "draining", False)


def _collect(first: Any, steps: Iterator[Any], body: m.GenerateRequestJSON) -> dict[str, Any]:
    out = [] if first is _END else [m.generate_response_from_pb(first, body.binary)]
    out += [m.generate_response_from_pb(step, body.binary) for step in steps]
    return {"steps": out}


async def _events(
    first: Any,
    steps: Iterator[Any],
    body: m.GenerateRequestJSON,
    context: CallContext,
    metrics: ServerMetrics | None,
) -> AsyncIterator[str]:
    """Server-sent events: ``data: <GenerateResponseJSON>`` per token; a failure after the
    first token ends the stream with ``event: error`` and an ``ErrorJSON``."""
    start, status = time.perf_counter(), "200"
    try:
        step = first
        while step is not _END:
            yield f"data: {json.dumps(m.generate_response_from_pb(step, body.binary))}\n\n"
            step = await run_in_threadpool(next, steps, _END)
    except Exception as err:  # noqa: BLE001 - reported in-stream, mapped by the one table
        status_code, code, message = http_status_for(err)
        status = str(status_code)
        yield f"event: error\ndata: {json.dumps({'code': code, 'message': message})}\n\n"
    finally:
        context.cancel()  # a no-op after the last token; frees the slot if the client left
        if metrics is not None:
            metrics.observe_request("POST /v1/generate", status, time.perf_counter() - start)


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document of the routes (what ``docs/openapi.json`` holds)."""
    return create_app(None).openapi()


def main() -> None:
    """``python -m hsae_runtime.serving.http > docs/openapi.json`` (``make openapi``)."""
    import sys

    sys.stdout.write(json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
