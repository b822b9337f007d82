"""The HTTP/JSON bodies (pydantic models) and their conversion to and from ``hsae.v1`` messages.

JSON bodies use the proto's field names (``text``, ``tokens``, ``budgets``,
``return_reconstructions``...), so a request reads the same over gRPC and HTTP, and every
route converts its body to the proto request and answers from the proto response: the HTTP
API runs exactly the gRPC servicer's validation, batching and limits.

Tensors (``activations``, the code's ``indices`` and ``values``, reconstructions, FVU) are a
:class:`TensorJSON`: ``shape`` and ``dtype`` (the proto's enum names) with the elements either
as ``array``, a flat row-major JSON list, or as ``data``, the raw little-endian bytes in base64
(the proto3 JSON form of ``bytes``, and much cheaper for large tensors). Requests may send
either; responses use ``array`` unless the request sets ``binary``.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from hsae_runtime.errors import InputError
from hsae_runtime.serving.stubs import load as load_stubs

pb, _ = load_stubs()

WireDType = Literal[
    "DTYPE_UNSPECIFIED", "DTYPE_FLOAT32", "DTYPE_FLOAT16", "DTYPE_BFLOAT16", "DTYPE_INT32"
]
_NUMPY = {"DTYPE_FLOAT32": np.float32, "DTYPE_FLOAT16": np.float16, "DTYPE_INT32": np.int32}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorJSON(_Body):
    """A dense array: ``shape``, ``dtype`` and the elements as ``array`` or base64 ``data``."""

    shape: list[int] = Field(description="Dimensions, outermost first.")
    dtype: WireDType = Field("DTYPE_FLOAT32", description="Element type (proto DType name).")
    array: list[float] | None = Field(None, description="Elements, flat, row-major.")
    data: str | None = Field(None, description="Raw little-endian bytes, base64.")

    @model_validator(mode="after")
    def _one_form(self) -> TensorJSON:
        if (self.array is None) == (self.data is None):
            raise ValueError("a tensor needs exactly one of `array` and `data`")
        return self


class TokenIdsJSON(_Body):
    """Token ids of one sequence (the server adds no BOS)."""

    ids: list[int]


class EncodeRequestJSON(_Body):
    """``hsae.v1.EncodeRequest``: exactly one of ``text``, ``tokens``, ``activations``."""

    text: str | None = None
    tokens: TokenIdsJSON | None = None
    activations: TensorJSON | None = None
    budgets: list[int] = Field(default_factory=list)
    return_reconstructions: bool = False
    return_fvu: bool = False
    include_special_tokens: bool = False
    output_dtype: WireDType = "DTYPE_UNSPECIFIED"
    request_id: str = ""
    binary: bool = Field(False, description="HTTP only: answer tensors as base64 `data`.")


class BudgetResultJSON(_Body):
    budget: int
    reconstruction: TensorJSON | None = None
    fvu: TensorJSON | None = None


class EncodeResponseJSON(_Body):
    """``hsae.v1.EncodeResponse``: the code once, at ``k``; per-budget results if asked."""

    token_ids: list[int] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    positions: list[int] = Field(default_factory=list)
    k: int
    indices: TensorJSON
    values: TensorJSON
    budgets: list[BudgetResultJSON] = Field(default_factory=list)
    request_id: str = ""


class DecodeRequestJSON(_Body):
    """``hsae.v1.DecodeRequest``: a code (``indices``, ``values`` ``[..., k]``) to decode."""

    indices: TensorJSON
    values: TensorJSON
    budgets: list[int] = Field(default_factory=list)
    output_dtype: WireDType = "DTYPE_UNSPECIFIED"
    binary: bool = Field(False, description="HTTP only: answer tensors as base64 `data`.")


class DecodeResponseJSON(_Body):
    reconstructions: list[BudgetResultJSON]


class InfoResponseJSON(_Body):
    """``hsae.v1.InfoResponse``."""

    lm_name: str
    hookpoint: str
    d_in: int
    d_sae: int
    k_max: int
    trained_budgets: list[int]
    dtype: str
    server_version: str
    has_lm: bool
    max_request_tokens: int
    max_message_bytes: int
    backend: str
    device: str


class ErrorJSON(_Body):
    """Any failed request: the gRPC status name it maps to and the message (with a hint)."""

    code: str
    message: str


# ----------------------------------------------------------------------------- JSON -> pb
def tensor_to_pb(t: TensorJSON, what: str) -> Any:
    """A request tensor -> ``hsae.v1.Tensor`` (the servicer checks shape, bytes and values)."""
    dtype = pb.DType.Value(t.dtype)
    if t.data is not None:
        try:
            raw = base64.b64decode(t.data, validate=True)
        except ValueError:
            raise InputError(f"{what}: `data` is not valid base64") from None
        return pb.Tensor(data=raw, shape=t.shape, dtype=dtype)
    assert t.array is not None
    if t.dtype == "DTYPE_BFLOAT16":
        words = torch.tensor(t.array, dtype=torch.bfloat16).view(torch.int16).numpy()
        return pb.Tensor(data=words.tobytes(), shape=t.shape, dtype=dtype)
    if t.dtype not in _NUMPY:
        raise InputError(f"{what}: dtype {t.dtype} is not accepted", hint="set `dtype`")
    with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values: checked later
        raw = np.asarray(t.array, dtype=np.float64).astype(_NUMPY[t.dtype]).tobytes()
    return pb.Tensor(data=raw, shape=t.shape, dtype=dtype)


def encode_request_to_pb(body: EncodeRequestJSON) -> Any:
    req = pb.EncodeRequest(
        budgets=body.budgets,
        return_reconstructions=body.return_reconstructions,
        return_fvu=body.return_fvu,
        include_special_tokens=body.include_special_tokens,
        output_dtype=pb.DType.Value(body.output_dtype),
        request_id=body.request_id,
    )
    given = [n for n in ("text", "tokens", "activations") if getattr(body, n) is not None]
    if len(given) != 1:
        raise InputError(
            f"an encode request needs exactly one input, got {given or 'none'}",
            hint="send one of `text`, `tokens` or `activations`",
        )
    if body.text is not None:
        req.text = body.text
    elif body.tokens is not None:
        req.tokens.ids.extend(body.tokens.ids)
    else:
        assert body.activations is not None
        req.activations.CopyFrom(tensor_to_pb(body.activations, "activations"))
    return req


def decode_request_to_pb(body: DecodeRequestJSON) -> Any:
    return pb.DecodeRequest(
        indices=tensor_to_pb(body.indices, "indices"),
        values=tensor_to_pb(body.values, "values"),
        budgets=body.budgets,
        output_dtype=pb.DType.Value(body.output_dtype),
    )


# ----------------------------------------------------------------------------- pb -> JSON
def tensor_from_pb(msg: Any, binary: bool) -> dict[str, Any]:
    """``hsae.v1.Tensor`` -> :class:`TensorJSON` fields (``data`` if ``binary``, else ``array``)."""
    name = pb.DType.Name(msg.dtype)
    out: dict[str, Any] = {"shape": list(msg.shape), "dtype": name}
    if binary:
        out["data"] = base64.b64encode(msg.data).decode("ascii")
    elif name == "DTYPE_BFLOAT16":
        words = np.frombuffer(msg.data, np.int16).copy()
        out["array"] = torch.from_numpy(words).view(torch.bfloat16).float().tolist()
    else:
        out["array"] = np.frombuffer(msg.data, _NUMPY[name]).tolist()
    return out


def _budget_results(items: Any, binary: bool) -> list[dict[str, Any]]:
    out = []
    for item in items:
        entry: dict[str, Any] = {"budget": item.budget}
        if item.HasField("reconstruction"):
            entry["reconstruction"] = tensor_from_pb(item.reconstruction, binary)
        if item.HasField("fvu"):
            entry["fvu"] = tensor_from_pb(item.fvu, binary)
        out.append(entry)
    return out


def encode_response_from_pb(msg: Any, binary: bool) -> dict[str, Any]:
    return {
        "token_ids": list(msg.token_ids),
        "tokens": list(msg.tokens),
        "positions": list(msg.positions),
        "k": msg.k,
        "indices": tensor_from_pb(msg.indices, binary),
        "values": tensor_from_pb(msg.values, binary),
        "budgets": _budget_results(msg.budgets, binary),
        "request_id": msg.request_id,
    }


def decode_response_from_pb(msg: Any, binary: bool) -> dict[str, Any]:
    return {"reconstructions": _budget_results(msg.reconstructions, binary)}


def info_from_pb(msg: Any) -> dict[str, Any]:
    return {name: getattr(msg, name) for name in InfoResponseJSON.model_fields} | {
        "trained_budgets": list(msg.trained_budgets)
    }


# ----------------------------------------------------------------------------- Generate
SteerOpName = Literal["STEER_OP_SET", "STEER_OP_SCALE", "STEER_OP_ABLATE"]


class InterventionJSON(_Body):
    """``hsae.v1.Intervention``: one change to one latent of the code at the budget."""

    latent: int
    op: SteerOpName = "STEER_OP_SET"
    value: float = 0.0
    condition: int | None = Field(None, description="Act only where this latent fires.")


class GenerateRequestJSON(_Body):
    """``hsae.v1.GenerateRequest``: a prompt (``text`` or ``tokens``) and how to continue it."""

    text: str | None = None
    tokens: TokenIdsJSON | None = None
    budget: int
    interventions: list[InterventionJSON] = Field(default_factory=list)
    reconstruction_only: bool = False
    max_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 0.0
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    top_logprobs: int = 0
    compare_unsteered: bool = False
    return_code: bool = False
    request_id: str = ""
    stream: bool = Field(False, description="HTTP only: answer as server-sent events.")
    binary: bool = Field(False, description="HTTP only: answer tensors as base64 `data`.")


class TokenLogprobJSON(_Body):
    token_id: int
    token: str
    logprob: float


class GenerateResponseJSON(_Body):
    """``hsae.v1.GenerateResponse``: one generated token (one server-sent event)."""

    index: int
    token_id: int
    token: str
    logprob: float
    top: list[TokenLogprobJSON] = Field(default_factory=list)
    unsteered_logprob: float | None = None
    top_unsteered: list[TokenLogprobJSON] = Field(default_factory=list)
    indices: TensorJSON | None = None
    values: TensorJSON | None = None
    finish_reason: str = ""
    text: str = ""
    request_id: str = ""


class GenerateResultJSON(_Body):
    """A whole generation (``stream`` false): every step, in order."""

    steps: list[GenerateResponseJSON]


def generate_request_to_pb(body: GenerateRequestJSON) -> Any:
    req = pb.GenerateRequest(
        budget=body.budget,
        reconstruction_only=body.reconstruction_only,
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop,
        top_logprobs=body.top_logprobs,
        compare_unsteered=body.compare_unsteered,
        return_code=body.return_code,
        request_id=body.request_id,
    )
    if (body.text is None) == (body.tokens is None):
        raise InputError(
            "a generate request needs exactly one prompt", hint="send `text` or `tokens`"
        )
    if body.text is not None:
        req.text = body.text
    elif body.tokens is not None:
        req.tokens.ids.extend(body.tokens.ids)
    if body.seed is not None:
        req.seed = body.seed
    for iv in body.interventions:
        item = req.interventions.add(latent=iv.latent, op=pb.SteerOp.Value(iv.op), value=iv.value)
        if iv.condition is not None:
            item.condition = iv.condition
    return req


def generate_response_from_pb(msg: Any, binary: bool) -> dict[str, Any]:
    def tops(items: Any) -> list[dict[str, Any]]:
        return [{"token_id": t.token_id, "token": t.token, "logprob": t.logprob} for t in items]

    out: dict[str, Any] = {
        "index": msg.index,
        "token_id": msg.token_id,
        "token": msg.token,
        "logprob": msg.logprob,
        "top": tops(msg.top),
        "top_unsteered": tops(msg.top_unsteered),
        "finish_reason": msg.finish_reason,
        "text": msg.text,
        "request_id": msg.request_id,
    }
    if msg.HasField("unsteered_logprob"):
        out["unsteered_logprob"] = msg.unsteered_logprob
    if msg.HasField("indices"):
        out["indices"] = tensor_from_pb(msg.indices, binary)
        out["values"] = tensor_from_pb(msg.values, binary)
    return out
