"""Python client for the hsae.v1 server: numpy in, numpy out.

::

    from hsae_runtime.client import Client

    with Client("127.0.0.1:50051") as client:
        print(client.info())
        res = client.encode(text="The cat sat.", budgets=[8, 32], fvu=True)
        values, indices = res.codes(8)        # [N, 8]: the first 8 entries of the k=32 code
        print(res.tokens, res.fvu[8])
        steer = [Intervention(1883, "set", 40.0)]
        text = "".join(t.token for t in client.generate("The cat", budget=16, interventions=steer))

The server returns the code once, at the largest requested budget; :meth:`EncodeResult.codes`
slices the nested prefix for any smaller one. Message-size limits are set explicitly (gRPC's
4 MiB default receive limit is too small for real activation batches). Server errors raise
:class:`ServerError` carrying the gRPC status code.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from hsae_runtime.client_results import (
    NP_TO_WIRE,
    EncodeResult,
    GeneratedToken,
    ServerInfo,
    array_from_pb,
    result_from_pb,
)
from hsae_runtime.errors import InputError
from hsae_runtime.serving.limits import DEFAULT_ADDRESS, DEFAULT_CALL_TIMEOUT_S, ServingLimits
from hsae_runtime.serving.stubs import load as load_stubs
from hsae_runtime.steering import Intervention

pb, pb_grpc = load_stubs()

_OUTPUT_DTYPES = {"float32": pb.DTYPE_FLOAT32, "float16": pb.DTYPE_FLOAT16}


class ServerError(RuntimeError):
    """The server answered with an error status. ``code`` is a :class:`grpc.StatusCode`."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        self.details = details
        super().__init__(f"{code.name}: {details}")


def _tensor(x: Any, what: str) -> Any:
    arr = np.asarray(x)
    if arr.dtype not in NP_TO_WIRE:
        if arr.dtype.kind == "f":
            arr = arr.astype(np.float32)
        elif arr.dtype.kind in "iu" and what == "indices":
            arr = arr.astype(np.int32)
        else:
            raise InputError(f"{what}: unsupported dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr)
    return pb.Tensor(data=arr.tobytes(), shape=list(arr.shape), dtype=NP_TO_WIRE[arr.dtype])


class Client:
    """A connection to an hsae-runtime server.

    ``tls``: ``False`` (plain TCP), ``True`` (TLS with the system's roots) or a path to a PEM
    CA / self-signed certificate. ``token`` is sent as ``authorization: Bearer <token>``.
    ``timeout`` (seconds) is the default deadline of every call.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        token: str | None = None,
        tls: bool | str | Path = False,
        *,
        timeout: float | None = DEFAULT_CALL_TIMEOUT_S,
        max_message_bytes: int = ServingLimits.max_message_bytes,
        server_name: str | None = None,
        features: str | Path | None = None,
    ) -> None:
        """``features``: a folder written by ``hsae-runtime features`` for the same SAE; results
        then carry latent labels (:meth:`EncodeResult.describe`)."""
        from hsae_runtime.features.labels import load_labels

        self.labels = load_labels(features) if features is not None else {}
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if tls is False:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            roots = None if tls is True else Path(tls).read_bytes()
            creds = grpc.ssl_channel_credentials(root_certificates=roots)
            self._channel = grpc.secure_channel(address, creds, options=options)
        self._stub = pb_grpc.HSAEStub(self._channel)
        self._metadata = [("authorization", f"Bearer {token}")] if token else None
        self.timeout = timeout

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise ServerError(err.code(), err.details() or "") from err  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ RPCs
    def info(self, timeout: float | None = None) -> ServerInfo:
        r = self._call(self._stub.Info, pb.InfoRequest(), timeout)
        return ServerInfo(
            lm_name=r.lm_name,
            hookpoint=r.hookpoint,
            d_in=r.d_in,
            d_sae=r.d_sae,
            k_max=r.k_max,
            trained_budgets=tuple(r.trained_budgets),
            dtype=r.dtype,
            server_version=r.server_version,
            has_lm=r.has_lm,
            max_request_tokens=r.max_request_tokens,
            max_message_bytes=r.max_message_bytes,
            backend=r.backend,
            device=r.device,
        )

    def encode(
        self,
        text: str | None = None,
        *,
        tokens: Sequence[int] | np.ndarray | None = None,
        activations: Any | None = None,
        budgets: Sequence[int],
        reconstructions: bool = False,
        fvu: bool = False,
        include_special_tokens: bool = False,
        output_dtype: str = "float32",
        request_id: str = "",
        timeout: float | None = None,
    ) -> EncodeResult:
        """Encode one input (exactly one of ``text`` / ``tokens`` / ``activations [..., d_in]``)."""
        request = self.encode_request(
            text=text,
            tokens=tokens,
            activations=activations,
            budgets=budgets,
            reconstructions=reconstructions,
            fvu=fvu,
            include_special_tokens=include_special_tokens,
            output_dtype=output_dtype,
            request_id=request_id,
        )
        response = self._call(self._stub.Encode, request, timeout)
        return result_from_pb(response, request.budgets, self.labels)

    def stream(
        self,
        requests: Iterable[dict[str, Any]],
        *,
        timeout: float | None = None,
        raise_errors: bool = True,
    ) -> Iterator[EncodeResult | ServerError]:
        """Pipeline many encodes over one EncodeStream; yields results in request order.

        Each item of ``requests`` holds :meth:`encode`'s keyword arguments. A failed item raises
        :class:`ServerError` (or, with ``raise_errors=False``, is yielded as one).
        """
        sent: list[list[int]] = []

        def gen() -> Iterator[Any]:
            for kwargs in requests:
                request = self.encode_request(**kwargs)
                sent.append(list(request.budgets))
                yield request

        try:
            responses = self._stub.EncodeStream(
                gen(), timeout=timeout or None, metadata=self._metadata
            )
            for i, resp in enumerate(responses):
                if resp.HasField("error"):
                    err = ServerError(_status_code(resp.error.code), resp.error.message)
                    if raise_errors:
                        raise err
                    yield err
                    continue
                yield result_from_pb(resp, sent[i], self.labels)
        except grpc.RpcError as err:
            raise ServerError(err.code(), err.details() or "") from err  # type: ignore[attr-defined]

    def decode(
        self,
        indices: Any,
        values: Any,
        budgets: Sequence[int] | None = None,
        *,
        output_dtype: str = "float32",
        timeout: float | None = None,
    ) -> np.ndarray:
        """Reconstruct from a code ``[..., k]``: ``[..., d_in]``, or ``[n_budgets, ..., d_in]``
        when ``budgets`` is given (prefix reconstructions)."""
        request = pb.DecodeRequest(
            indices=_tensor(np.asarray(indices).astype(np.int32, copy=False), "indices"),
            values=_tensor(values, "values"),
            budgets=list(budgets or []),
            output_dtype=_output_dtype(output_dtype),
        )
        resp = self._call(self._stub.Decode, request, timeout)
        recons = [array_from_pb(item.reconstruction) for item in resp.reconstructions]
        return recons[0] if budgets is None else np.stack(recons)

    def generate(
        self,
        text: str | None = None,
        *,
        tokens: Sequence[int] | None = None,
        budget: int,
        interventions: Sequence[Intervention] = (),
        reconstruction_only: bool = False,
        max_new_tokens: int = 0,
        temperature: float = 0.0,
        top_p: float = 0.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        top_logprobs: int = 0,
        compare_unsteered: bool = False,
        return_code: bool = False,
        timeout: float | None = None,
    ) -> Iterator[GeneratedToken]:
        """Continue ``text`` (or ``tokens``) with the SAE in the loop at ``budget``, steered by
        ``interventions``; yields each token as the server makes it (closing the iterator
        early cancels the call). 0 for ``max_new_tokens`` / ``top_p`` means the server's
        default / no cut."""
        ops = {"set": pb.STEER_OP_SET, "scale": pb.STEER_OP_SCALE, "ablate": pb.STEER_OP_ABLATE}
        request = pb.GenerateRequest(
            budget=budget, reconstruction_only=reconstruction_only, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, stop=list(stop), top_logprobs=top_logprobs,
            compare_unsteered=compare_unsteered, return_code=return_code,
        )  # fmt: skip
        if (text is None) == (tokens is None):
            raise InputError("give exactly one of text and tokens")
        if text is not None:
            request.text = text
        else:
            request.tokens.ids.extend(int(t) for t in tokens or ())
        if seed is not None:
            request.seed = seed
        for iv in interventions:
            item = request.interventions.add(latent=iv.latent, op=ops[iv.op], value=iv.value)
            if iv.condition is not None:
                item.condition = iv.condition
        call = self._stub.Generate(request, timeout=timeout or None, metadata=self._metadata)
        try:
            for msg in call:
                yield GeneratedToken.from_pb(msg)
        except grpc.RpcError as err:
            raise ServerError(err.code(), err.details() or "") from err  # type: ignore[attr-defined]
        finally:
            call.cancel()  # a no-op once the stream has ended

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def encode_request(
        text: str | None = None,
        *,
        tokens: Sequence[int] | np.ndarray | None = None,
        activations: Any | None = None,
        budgets: Sequence[int],
        reconstructions: bool = False,
        fvu: bool = False,
        include_special_tokens: bool = False,
        output_dtype: str = "float32",
        request_id: str = "",
    ) -> Any:
        """Build an ``hsae.v1.EncodeRequest`` (validation happens on the server)."""
        given = [
            name
            for name, v in (("text", text), ("tokens", tokens), ("activations", activations))
            if v is not None
        ]
        if len(given) != 1:
            raise InputError(
                f"pass exactly one of text, tokens, activations (got {given or 'none'})"
            )
        request = pb.EncodeRequest(
            budgets=[int(b) for b in budgets],
            return_reconstructions=reconstructions,
            return_fvu=fvu,
            include_special_tokens=include_special_tokens,
            output_dtype=_output_dtype(output_dtype),
            request_id=request_id,
        )
        if text is not None:
            request.text = text
        elif tokens is not None:
            request.tokens.ids.extend(int(t) for t in np.asarray(tokens).reshape(-1))
        else:
            arr: Any = activations
            if hasattr(arr, "detach"):  # a torch tensor; numpy has no bfloat16
                arr = arr.detach().cpu()
                arr = (arr.float() if str(arr.dtype) == "torch.bfloat16" else arr).numpy()
            request.activations.CopyFrom(_tensor(arr, "activations"))
        return request


def _output_dtype(name: str) -> int:
    if name not in _OUTPUT_DTYPES:
        raise InputError(f"output_dtype must be one of {sorted(_OUTPUT_DTYPES)}, got {name!r}")
    return _OUTPUT_DTYPES[name]


def _status_code(number: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN
