"""Protobuf <-> tensors, in one place: ``*_from_pb`` parse and validate, ``*_to_pb`` build.

Tensors cross the wire as raw little-endian bytes + shape + dtype (``hsae.v1.Tensor``). Parsing
copies the bytes once (``bytearray``) and views them as a numpy array (a tensor only for
bfloat16); building calls ``tobytes()`` once per array. Nothing here builds ``repeated float``
fields. The request path stays in numpy on purpose: see the GIL note in
:mod:`~hsae_runtime.serving.jobs`. This module only converts and validates: the job and result
types it fills live in ``jobs`` (no protobuf there).

Every check a client can fail lives here and raises :class:`~hsae_runtime.errors.InputError`
(-> INVALID_ARGUMENT), so all backends see only valid input: budgets in 1..k_max, activations
``[..., d_in]`` of a float dtype, finite, non-empty, at most ``max_request_tokens`` rows. The
``*_to_pb`` builders refuse results that are not finite in the requested dtype the same way
(:func:`result_to_pb`), so no ``inf`` or ``NaN`` goes on the wire.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from hsae_runtime.config import SAEConfig
from hsae_runtime.errors import InputError
from hsae_runtime.serving.jobs import EncodeOutput, HostArray, as_tensor
from hsae_runtime.serving.stubs import load as load_stubs

pb, _ = load_stubs()

# wire dtype enum -> torch dtype
_TORCH = {
    pb.DTYPE_FLOAT32: torch.float32,
    pb.DTYPE_FLOAT16: torch.float16,
    pb.DTYPE_BFLOAT16: torch.bfloat16,
    pb.DTYPE_INT32: torch.int32,
}
_WIRE = {v: k for k, v in _TORCH.items()}
# numpy views are used where numpy has the dtype: its small-array checks cost far less than
# torch's, which matters at thousands of single-row requests per second.
_NUMPY = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_FLOAT16: np.float16, pb.DTYPE_INT32: np.int32}
FLOAT_INPUTS = (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16)
MAX_RANK = 8
"""Most dimensions a wire tensor may have."""
MAX_ELEMENTS = 2**31
"""Most elements a wire tensor may describe (gRPC messages are < 2 GiB in any case)."""
CODE_VALUE_DTYPES = (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16)


def dtype_name(wire: int) -> str:
    return pb.DType.Name(wire) if wire in pb.DType.values() else f"<unknown {wire}>"


# ----------------------------------------------------------------------------- tensors
_NUMPY_WIRE = {np.dtype(v): k for k, v in _NUMPY.items()}
_ITEMSIZE = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_FLOAT16: 2, pb.DTYPE_BFLOAT16: 2, pb.DTYPE_INT32: 4}


def tensor_to_pb(t: HostArray, dtype: int | None = None) -> Any:
    """A numpy array or tensor (any device) -> ``hsae.v1.Tensor``, as wire ``dtype`` if given."""
    if isinstance(t, np.ndarray):
        np_dtype = _NUMPY.get(dtype) if dtype is not None else t.dtype
        if np_dtype is not None and np.dtype(np_dtype) in _NUMPY_WIRE:
            a = np.ascontiguousarray(t, dtype=np_dtype)
            return pb.Tensor(data=a.tobytes(), shape=list(a.shape), dtype=_NUMPY_WIRE[a.dtype])
        t = torch.from_numpy(t)  # bfloat16 output, or a dtype the wire only has via torch
    target = _TORCH[dtype] if dtype is not None else t.dtype
    t = t.detach().to(device="cpu", dtype=target).contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: ship the raw 16-bit words
        data = t.view(torch.int16).numpy().tobytes()
    else:
        data = t.numpy().tobytes()
    return pb.Tensor(data=data, shape=list(t.shape), dtype=_WIRE[t.dtype])


def result_to_pb(t: HostArray, dtype: int, what: str, hint: str) -> Any:
    """A computed result -> ``hsae.v1.Tensor`` of float ``dtype``, refusing non-finite values.

    Finite inputs can still give non-finite results (activations near float32's limit overflow
    the encoder's matmul; values past 65504 are inf in float16), and the contract promises
    finite outputs, so such a result raises :class:`InputError` naming ``what``. The check runs
    on the wire bytes with numpy, after the conversion to ``dtype``.
    """
    with np.errstate(over="ignore"):  # an overflowing cast is reported below, not warned
        msg = tensor_to_pb(t, dtype)
    if bool(np.isfinite(np.frombuffer(msg.data, _NUMPY[msg.dtype])).all()):
        return msg
    if msg.dtype == pb.DTYPE_FLOAT16 and all_finite(t):
        raise InputError(
            f"{what} are too large for float16 (|x| > 65504)",
            hint="ask for output_dtype DTYPE_FLOAT32",
        )
    raise InputError(f"{what} are not finite: the computation overflowed float32", hint=hint)


def array_from_pb(msg: Any, what: str, allowed: Sequence[int]) -> HostArray:
    """``hsae.v1.Tensor`` -> a writable host array, checking dtype, shape and byte length.

    numpy for float32 / float16 / int32, a CPU tensor for bfloat16 (numpy has no bfloat16).
    """
    if msg.dtype not in allowed:
        names = ", ".join(dtype_name(d) for d in allowed)
        raise InputError(f"{what}: dtype {dtype_name(msg.dtype)} is not accepted; use {names}")
    if len(msg.shape) > MAX_RANK:
        raise InputError(
            f"{what}: the shape has {len(msg.shape)} dimensions, more than {MAX_RANK}",
            hint="flatten the leading dimensions",
        )
    shape = [int(s) for s in msg.shape]
    if not shape:
        raise InputError(f"{what}: shape is missing")
    if any(s < 0 for s in shape):
        raise InputError(f"{what}: shape {shape} has a negative dimension")
    # A zero-size tensor passes the byte-length check whatever its other dimensions are, so
    # bound them too: numpy cannot even describe [2**62, 0, 64].
    if math.prod(s for s in shape if s) > MAX_ELEMENTS:
        raise InputError(
            f"{what}: shape {shape} is too large (its non-zero dimensions multiply to more than "
            f"{MAX_ELEMENTS} elements)",
            hint="send the tensor's real shape",
        )
    itemsize = _ITEMSIZE[msg.dtype]
    numel = math.prod(shape)
    if len(msg.data) != numel * itemsize:
        raise InputError(
            f"{what}: {len(msg.data)} bytes do not match shape {shape} of "
            f"{dtype_name(msg.dtype)} ({numel * itemsize} bytes expected)"
        )
    if msg.dtype in _NUMPY:  # bytearray: one writable copy that torch can later share
        return np.frombuffer(bytearray(msg.data), _NUMPY[msg.dtype]).reshape(shape)
    if numel == 0:
        return torch.empty(shape, dtype=_TORCH[msg.dtype])
    return torch.frombuffer(bytearray(msg.data), dtype=_TORCH[msg.dtype]).reshape(shape)


def tensor_from_pb(msg: Any, what: str, allowed: Sequence[int]) -> Tensor:
    """:func:`array_from_pb` as a CPU tensor (sharing the numpy array's memory)."""
    return as_tensor(array_from_pb(msg, what, allowed))


def all_finite(t: HostArray) -> bool:
    if isinstance(t, np.ndarray):
        return bool(np.isfinite(t).all())
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float16, torch.float64):
        return bool(np.isfinite(t.numpy()).all())
    return bool(torch.isfinite(t).all())


# ----------------------------------------------------------------------------- requests
@dataclass
class EncodeInput:
    """A parsed, validated Encode request (before tokenisation)."""

    kind: Literal["text", "tokens", "activations"]
    budgets: list[int]
    reconstructions: bool
    fvu: bool
    include_special: bool
    output_dtype: int
    request_id: str
    text: str | None = None
    token_ids: list[int] = field(default_factory=list)
    activations: HostArray | None = None
    """``[..., d_in]`` float: numpy (float32 / float16 on the wire) or a tensor (bfloat16)."""

    @property
    def k(self) -> int:
        return max(self.budgets)


def check_budgets(
    budgets: Sequence[int], k_max: int, what: str = "budgets", *, code_width: int | None = None
) -> list[int]:
    """A request's budgets, in request order: at least one, at most ``k_max`` of them, each in
    1..k_max, or in 1..``code_width`` for Decode (a budget takes a prefix of the code sent)."""
    if len(budgets) > k_max:
        raise InputError(
            f"{len(budgets)} {what}, more than the SAE's k_max={k_max}",
            hint=f"each budget is one of 1..{k_max}: drop duplicates",
        )
    out = [int(b) for b in budgets]
    limit = k_max if code_width is None else code_width
    if not out:
        raise InputError(f"{what} must not be empty", hint=f"ask for at least one of 1..{limit}")
    bad = [b for b in out if not 1 <= b <= limit]
    if not bad:
        return out
    if code_width is None:
        raise InputError(
            f"{what} {bad[:5]} out of range 1..k_max={k_max}",
            hint=f"this SAE keeps at most {k_max} latents per token",
        )
    raise InputError(
        f"{what} {bad[:5]} out of range 1..k={code_width}, the code's width",
        hint="a budget takes a prefix of the code: at most its k entries per row",
    )


def check_activations(x: HostArray, config: SAEConfig, max_rows: int) -> HostArray:
    if x.ndim == 0 or x.shape[-1] != config.d_in:
        raise InputError(
            f"activations must have shape [..., d_in={config.d_in}], got {list(x.shape)}",
            hint="send activations from the hookpoint the SAE was trained on",
        )
    rows = math.prod(x.shape[:-1])
    if rows == 0:
        raise InputError("activations are empty: need at least one row")
    if rows > max_rows:
        raise InputError(
            f"too many activation rows: {rows} > max_request_tokens={max_rows}",
            hint="split the input over several requests (or EncodeStream)",
        )
    if not all_finite(x):
        raise InputError("activations contain NaN or Inf")
    return x


def encode_request_from_pb(req: Any, config: SAEConfig, max_rows: int) -> EncodeInput:
    budgets = check_budgets(req.budgets, config.k_max)
    out_dtype = req.output_dtype or pb.DTYPE_FLOAT32
    if out_dtype not in CODE_VALUE_DTYPES:
        raise InputError(
            f"output_dtype {dtype_name(out_dtype)} is not accepted; use DTYPE_FLOAT32 or "
            "DTYPE_FLOAT16"
        )
    parsed = EncodeInput(
        kind="text",
        budgets=budgets,
        reconstructions=req.return_reconstructions,
        fvu=req.return_fvu,
        include_special=req.include_special_tokens,
        output_dtype=out_dtype,
        request_id=req.request_id,
    )
    match req.WhichOneof("input"):
        case "text":
            if not req.text.strip():
                raise InputError("text is empty")
            parsed.text = req.text
        case "tokens":
            parsed.kind = "tokens"
            n_ids = len(req.tokens.ids)  # counted before any list is built
            if not n_ids:
                raise InputError("token ids are empty")
            if n_ids > max_rows:
                raise InputError(
                    f"too many tokens: {n_ids} > max_request_tokens={max_rows}",
                    hint="split the input over several requests (or EncodeStream)",
                )
            parsed.token_ids = list(req.tokens.ids)
        case "activations":
            parsed.kind = "activations"
            x = array_from_pb(req.activations, "activations", FLOAT_INPUTS)
            parsed.activations = check_activations(x, config, max_rows)
        case None:
            raise InputError("the request has no input", hint="set text, tokens or activations")
        case other:
            raise InputError(f"unknown input field {other!r}")
    return parsed


_LARGE_INPUT_HINT = (
    "the activations are too large for this SAE (check they come from its hookpoint, unscaled)"
)


def encode_response_to_pb(parsed: EncodeInput, out: EncodeOutput) -> Any:
    """Build the response; activation inputs get their leading dims back."""
    lead = list(parsed.activations.shape[:-1]) if parsed.activations is not None else None
    k = parsed.k

    def shaped(t: HostArray, tail: list[int]) -> HostArray:
        return t.reshape(*lead, *tail) if lead is not None else t

    resp = pb.EncodeResponse(
        token_ids=out.token_ids,
        tokens=out.tokens,
        positions=out.positions,
        k=k,
        indices=tensor_to_pb(shaped(out.indices, [k]), pb.DTYPE_INT32),
        values=result_to_pb(
            shaped(out.values, [k]), parsed.output_dtype, "code values", _LARGE_INPUT_HINT
        ),
        request_id=parsed.request_id,
    )
    if parsed.reconstructions or parsed.fvu:
        d_in = out.reconstructions.shape[-1] if out.reconstructions is not None else 0
        for i, b in enumerate(parsed.budgets):
            item = resp.budgets.add(budget=b)
            if parsed.reconstructions:
                assert out.reconstructions is not None
                recon = shaped(out.reconstructions[i], [d_in])
                what = f"reconstructions at budget {b}"
                recon_pb = result_to_pb(recon, parsed.output_dtype, what, _LARGE_INPUT_HINT)
                item.reconstruction.CopyFrom(recon_pb)
            if parsed.fvu:
                assert out.fvu is not None
                fvu = result_to_pb(
                    shaped(out.fvu[i], []),
                    pb.DTYPE_FLOAT32,
                    f"FVU values at budget {b}",
                    f"{_LARGE_INPUT_HINT}: |x|^2 overflows float32",
                )
                item.fvu.CopyFrom(fvu)
    return resp


def response_bytes_estimate(parsed: EncodeInput, rows: int, d_in: int) -> int:
    """Upper-bound-ish size of the response, to refuse oversize answers before computing."""
    item = 2 if parsed.output_dtype == pb.DTYPE_FLOAT16 else 4
    size = rows * parsed.k * (4 + item) + rows * 24  # code + token ids/strings/positions
    if parsed.reconstructions:
        size += len(parsed.budgets) * rows * d_in * item
    if parsed.fvu:
        size += len(parsed.budgets) * rows * 4
    return size


# ----------------------------------------------------------------------------- decode
@dataclass
class DecodeInput:
    values: Tensor
    """``[N, k]`` (leading dims flattened)."""
    indices: Tensor
    """``[N, k]`` int64, -1 = skip."""
    lead: list[int]
    budgets: list[int]
    output_dtype: int


def decode_request_from_pb(req: Any, config: SAEConfig, max_rows: int) -> DecodeInput:
    indices = tensor_from_pb(req.indices, "indices", (pb.DTYPE_INT32,))
    values = tensor_from_pb(req.values, "values", CODE_VALUE_DTYPES)
    if indices.shape != values.shape:
        raise InputError(
            f"indices {list(indices.shape)} and values {list(values.shape)} must have one shape"
        )
    k = indices.shape[-1]
    if k == 0 or indices.numel() == 0:
        raise InputError("the code is empty: need at least one row and one latent")
    if k > config.k_max:
        raise InputError(
            f"the code has k={k} entries per row, more than the SAE's k_max={config.k_max}",
            hint="send codes as Encode returns them (at most k_max entries per row)",
        )
    rows = indices.numel() // k
    if rows > max_rows:
        raise InputError(f"too many code rows: {rows} > max_request_tokens={max_rows}")
    if int(indices.min()) < -1 or int(indices.max()) >= config.d_sae:
        raise InputError(f"indices must lie in 0..d_sae-1={config.d_sae - 1} (or -1 to skip)")
    if not all_finite(values):
        raise InputError("code values contain NaN or Inf")
    budgets = [k]
    if req.budgets:
        budgets = check_budgets(req.budgets, config.k_max, "decode budgets", code_width=k)
    out_dtype = req.output_dtype or pb.DTYPE_FLOAT32
    if out_dtype not in CODE_VALUE_DTYPES:
        raise InputError(f"output_dtype {dtype_name(out_dtype)} is not accepted")
    return DecodeInput(
        values=values.reshape(rows, k).float(),
        indices=indices.reshape(rows, k).long(),
        lead=list(indices.shape[:-1]),
        budgets=budgets,
        output_dtype=out_dtype,
    )


def decode_response_to_pb(parsed: DecodeInput, recons: Tensor) -> Any:
    """``recons [n_budgets, N, d_in]`` -> ``DecodeResponse`` (leading dims restored)."""
    resp = pb.DecodeResponse()
    for i, b in enumerate(parsed.budgets):
        recon = recons[i].reshape(*parsed.lead, recons.shape[-1])
        wire = result_to_pb(
            recon,
            parsed.output_dtype,
            f"reconstructions at budget {b}",
            "the code values are too large for this SAE (check they are an SAE code)",
        )
        resp.reconstructions.add(budget=b, reconstruction=wire)
    return resp


def info_to_pb(**fields: Any) -> Any:
    return pb.InfoResponse(**fields)
