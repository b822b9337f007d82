"""``POST /v1/encode/raw``: activation rows as the raw request body, no JSON and no base64.

For large inputs (many rows of ``d_in`` floats) the JSON route spends its time printing,
parsing and base64-coding the tensor; here the body *is* the tensor:

* request: ``Content-Type: application/octet-stream``, the body the little-endian bytes of
  the activations, row-major; ``shape`` (repeated query parameter, e.g.
  ``?shape=64&shape=640``), ``dtype`` (the proto's name, default ``DTYPE_FLOAT32``),
  ``budgets`` (repeated), ``return_reconstructions``, ``return_fvu``, ``output_dtype`` and
  ``request_id`` are query parameters named as the proto's fields;
* response: the ``EncodeResponseJSON`` with its tensors as base64 ``data``, or, with
  ``Accept: application/octet-stream``, the raw bytes of the code - ``values [N, k]`` then
  ``indices [N, k]`` (int32), little-endian - with ``X-HSAE-Shape: N,k`` and
  ``X-HSAE-Values-Dtype`` (the proto name of the values' type) headers. The raw form carries
  the code only: asking it for reconstructions or FVU is a 400.

The body becomes an ``hsae.v1.EncodeRequest`` and goes through the servicer's ``Encode`` like
every other route: the same checks (shape against ``d_in``, byte count against the shape, NaN,
budgets), the same auth, size limit, batcher and error table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from hsae_runtime.errors import InputError
from hsae_runtime.serving import http_models as m
from hsae_runtime.serving.errors import OversizeError

ROUTE = "/v1/encode/raw"
OCTETS = "application/octet-stream"
SHAPE_HEADER = "X-HSAE-Shape"
VALUES_DTYPE_HEADER = "X-HSAE-Values-Dtype"

_BINARY = {"schema": {"type": "string", "format": "binary"}}


def raw_request_to_pb(
    body: bytes,
    shape: list[int],
    dtype: str,
    budgets: list[int],
    *,
    return_reconstructions: bool = False,
    return_fvu: bool = False,
    output_dtype: str = "DTYPE_UNSPECIFIED",
    request_id: str = "",
) -> Any:
    """The raw body and query parameters -> ``hsae.v1.EncodeRequest`` (activations)."""
    if not shape:
        raise InputError(
            "a raw encode request needs its `shape`", hint="e.g. ?shape=64&shape=<d_in>"
        )
    if any(d < 0 for d in shape):
        raise InputError(f"`shape` {shape} has a negative dimension")
    req = m.pb.EncodeRequest(
        budgets=budgets,
        return_reconstructions=return_reconstructions,
        return_fvu=return_fvu,
        output_dtype=m.pb.DType.Value(output_dtype),
        request_id=request_id,
    )
    req.activations.CopyFrom(m.pb.Tensor(data=body, shape=shape, dtype=m.pb.DType.Value(dtype)))
    return req


def raw_code_response(msg: Any) -> Response:
    """``hsae.v1.EncodeResponse`` (the code only) -> the bytes of ``values`` then ``indices``."""
    shape = list(msg.values.shape)  # [N, k]
    headers = {
        SHAPE_HEADER: ",".join(str(d) for d in shape),
        VALUES_DTYPE_HEADER: m.pb.DType.Name(msg.values.dtype),
    }
    return Response(content=msg.values.data + msg.indices.data, media_type=OCTETS, headers=headers)


def add_route(
    app: FastAPI,
    encode: Callable[[Any], Any],
    call: Callable[[str, Callable[[], Any]], Any],
    dependencies: list[Any],
    errors: dict[int | str, dict[str, Any]],
) -> None:
    """Register ``POST /v1/encode/raw`` on ``app``.

    ``encode(request_pb) -> response_pb`` runs the servicer's Encode; ``call(route, work)``
    runs ``work`` and maps its errors through the one table (and counts the request).
    """

    @app.post(
        ROUTE,
        response_model=m.EncodeResponseJSON,
        responses={200: {"content": {OCTETS: _BINARY}}, **errors},
        dependencies=dependencies,
        response_model_exclude_none=True,
        openapi_extra={"requestBody": {"required": True, "content": {OCTETS: _BINARY}}},
        summary="Encode raw activation bytes",
        description=(
            "The body is the little-endian bytes of the activations (row-major, `shape` and "
            "`dtype` in the query). Answers the code as JSON with base64 tensors, or with "
            "`Accept: application/octet-stream` as raw bytes: values [N, k] then indices "
            f"[N, k] (int32), shape in `{SHAPE_HEADER}`, the values' type in "
            f"`{VALUES_DTYPE_HEADER}`."
        ),
    )
    async def encode_raw(
        request: Request,
        shape: list[int] = Query(..., description="Dimensions, e.g. [N, d_in]."),
        dtype: m.WireDType = Query("DTYPE_FLOAT32", description="Element type of the body."),
        budgets: list[int] = Query([], description="Budgets, as in EncodeRequest."),
        return_reconstructions: bool = False,
        return_fvu: bool = False,
        output_dtype: m.WireDType = "DTYPE_UNSPECIFIED",
        request_id: str = "",
    ) -> Any:
        try:
            body = await request.body()
        except OversizeError as err:  # a chunked body past the limit (BodyLimit counts it)
            failure = err
            return call(f"POST {ROUTE}", lambda: reraise(failure))
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        raw_answer = OCTETS in request.headers.get("accept", "")

        def work() -> Any:
            if content_type != OCTETS:
                raise InputError(
                    f"{ROUTE} takes `Content-Type: {OCTETS}`, got {content_type or 'none'!r}",
                    hint="send JSON to /v1/encode instead",
                )
            req = raw_request_to_pb(
                body,
                shape,
                dtype,
                budgets,
                return_reconstructions=return_reconstructions,
                return_fvu=return_fvu,
                output_dtype=output_dtype,
                request_id=request_id,
            )
            if raw_answer and (return_reconstructions or return_fvu):
                raise InputError(
                    "a raw (application/octet-stream) answer carries the code only",
                    hint="ask for reconstructions or FVU with `Accept: application/json`",
                )
            answer = encode(req)
            if raw_answer:
                return raw_code_response(answer)
            return m.encode_response_from_pb(answer, True)

        return await run_in_threadpool(call, f"POST {ROUTE}", work)


def reraise(err: BaseException) -> Any:
    """Raise ``err`` again: a failure caught outside ``call`` goes through it (and so through
    the one error table) as ``call(route, lambda: reraise(err))``."""
    raise err
