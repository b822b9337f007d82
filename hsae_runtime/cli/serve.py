"""``hsae-runtime serve MODEL`` (the gRPC server, optionally HTTP/JSON and metrics too), and
``hsae-runtime encode`` / ``hsae-runtime generate`` (query one).

grpc, torch and transformers are imported inside the command bodies, after logging is set up,
so ``hsae-runtime --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

from hsae_runtime.cli.app import app
from hsae_runtime.cli.common import parse_budgets
from hsae_runtime.errors import ConfigError
from hsae_runtime.serving.limits import (
    DEFAULT_ADDRESS,
    DEFAULT_CALL_TIMEOUT_S,
    DEFAULT_GRACE_S,
    DEFAULT_HOST,
    DEFAULT_PORT,
    BatcherConfig,
    ServingLimits,
)


@app.command()
def serve(
    model: Path = typer.Argument(..., help="The .safetensors SAE model file to serve."),
    lm: str = typer.Option(None, "--lm", help="LM hub id, folder or .gguf (default: the SAE's)."),
    hookpoint: str = typer.Option(None, "--hookpoint", help="Hookpoint (default: the SAE's)."),
    no_lm: bool = typer.Option(False, "--no-lm", help="Serve raw-activation requests only."),
    host: str = typer.Option(DEFAULT_HOST, help="Interface to bind (0.0.0.0 = all)."),
    port: int = typer.Option(DEFAULT_PORT, help="TCP port (0 = any free port)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    backend: str = typer.Option("torch", help="SAE backend: torch or onnx."),
    readout: str = typer.Option(
        "encoder", help="Code values: encoder (what exports compute) or refine (refitted per "
        "token to the SAE's own objective; torch backend only; see docs/pareto.md).",
    ),
    lm_dtype: str = typer.Option("float32", help="LM dtype: float32, float16 or bfloat16."),
    max_batch_tokens: int = typer.Option(
        BatcherConfig.max_batch_tokens, help="Most tokens in one batched forward."
    ),
    max_chunk_tokens: int = typer.Option(
        BatcherConfig.max_chunk_tokens,
        help="Longer requests run in chunks of this many tokens (or rows), interleaved with "
        "other requests: nobody waits for more than one chunk of a long one. 0 = never split.",
    ),
    max_wait_ms: float = typer.Option(
        BatcherConfig.max_wait_ms,
        help="Most ms the free worker holds a batch open for more requests (raise it, e.g. "
        "25, for many clients that each wait for their answer before sending again).",
    ),
    max_queue: int = typer.Option(
        BatcherConfig.max_queue, help="Queued requests before RESOURCE_EXHAUSTED."
    ),
    no_batching: bool = typer.Option(False, "--no-batching", help="One forward per request."),
    max_request_tokens: int = typer.Option(
        ServingLimits.max_request_tokens, help="Most tokens / rows in one request."
    ),
    max_message_mb: int = typer.Option(
        ServingLimits.max_message_bytes // 2**20,
        help="Largest gRPC message, MiB, both directions.",
    ),
    max_streams: int = typer.Option(
        ServingLimits.max_streams,
        help="Most EncodeStreams open at once (each holds a handler thread; at most 32).",
    ),
    stream_idle_timeout_s: float = typer.Option(
        ServingLimits.stream_idle_timeout_s,
        help="Close an EncodeStream that sends nothing for this many seconds.",
    ),
    tls_cert: Path = typer.Option(None, help="PEM certificate chain (with --tls-key)."),
    tls_key: Path = typer.Option(None, help="PEM private key (with --tls-cert)."),
    token_file: Path = typer.Option(None, help="File holding the bearer token clients must send."),
    grace: float = typer.Option(
        DEFAULT_GRACE_S, help="Seconds in-flight requests get on SIGTERM/SIGINT."
    ),
    http_port: int = typer.Option(
        None, help="Also serve the HTTP/JSON API on this port of --host (0 = any free port)."
    ),
    metrics_port: int = typer.Option(
        None, help="Serve Prometheus /metrics on this port of --host (0 = any free port)."
    ),
    features: Path = typer.Option(
        None, "--features", help="Serve this static folder (latent dashboards) at /features "
        "on the HTTP port.",
    ),
    max_generations: int = typer.Option(
        ServingLimits.max_generations, help="Most Generate requests in progress at once."
    ),
) -> None:
    """Serve an SAE over gRPC on a live LM: sparse codes at the budgets each request asks for."""
    from hsae_runtime.refine import check_readout
    from hsae_runtime.serving.backend import BackendName
    from hsae_runtime.serving.server import ServerOptions, load_and_start, serve_forever

    if backend not in ("torch", "onnx"):
        raise ConfigError(f"unknown backend {backend!r}", hint="choose torch or onnx")
    backend_name: BackendName = "torch" if backend == "torch" else "onnx"
    options = ServerOptions(
        host=host,
        port=port,
        limits=ServingLimits(
            max_request_tokens=max_request_tokens,
            max_message_bytes=max_message_mb * 2**20,
            max_streams=max_streams,
            stream_idle_timeout_s=stream_idle_timeout_s,
            max_generations=max_generations,
        ),
        batching=BatcherConfig(
            max_batch_tokens=max_batch_tokens,
            max_wait_ms=max_wait_ms,
            max_queue=max_queue,
            max_chunk_tokens=max_chunk_tokens,
            batching=not no_batching,
        ),
        tls_cert=tls_cert,
        tls_key=tls_key,
        token=_read_token(token_file),
        http_port=http_port,
        metrics_port=metrics_port,
        features_dir=features,
    )
    running = load_and_start(
        model,
        lm_name=lm,
        hookpoint=hookpoint,
        no_lm=no_lm,
        device=device,
        lm_dtype=lm_dtype,
        backend=backend_name,
        options=options,
        readout=check_readout(readout),
    )
    serve_forever(running, grace=grace)


@app.command()
def encode(
    text: str = typer.Argument(..., help="Text to encode (use - to read stdin)."),
    server: str = typer.Option(DEFAULT_ADDRESS, "--server", help="Server address host:port."),
    budgets: str = typer.Option("8,32", help="Comma-separated budgets, e.g. 8,16,32."),
    top: int = typer.Option(8, help="Latents shown per token."),
    include_special: bool = typer.Option(False, help="Also encode special tokens (BOS...)."),
    tls_cert: Path = typer.Option(None, help="CA / self-signed certificate: connect with TLS."),
    token_file: Path = typer.Option(None, help="File holding the bearer token."),
    timeout: float = typer.Option(DEFAULT_CALL_TIMEOUT_S, help="Deadline in seconds."),
    features: Path = typer.Option(
        None, help="Folder written by `hsae-runtime features` for this SAE: label latents."
    ),
) -> None:
    """Encode text on a running server and print tokens, per-budget FVU and top latents."""
    import sys

    from hsae_runtime.client import Client, ServerError
    from hsae_runtime.client_results import format_table

    wanted = parse_budgets(budgets) or []
    if text == "-":
        text = sys.stdin.read()
    tls: bool | Path = tls_cert if tls_cert is not None else False
    with Client(server, token=_read_token(token_file), tls=tls, timeout=timeout,
                features=features) as client:
        try:
            result = client.encode(
                text=text, budgets=wanted, fvu=True, include_special_tokens=include_special
            )
        except ServerError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from err
    typer.echo(format_table(result, top=top))


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="Prompt to continue (use - to read stdin)."),
    server: str = typer.Option(DEFAULT_ADDRESS, "--server", help="Server address host:port."),
    budget: int = typer.Option(..., help="Budget k of the spliced code."),
    clamp: list[str] = typer.Option([], help="LATENT=VALUE: set a latent (repeatable)."),
    scale: list[str] = typer.Option([], help="LATENT=FACTOR: scale a latent (repeatable)."),
    ablate: list[str] = typer.Option([], help="LATENT: zero a latent (repeatable)."),
    max_new_tokens: int = typer.Option(20, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
    seed: int = typer.Option(None, help="Sampling seed (repeatable output)."),
    stop: list[str] = typer.Option([], help="Stop once the text contains this (repeatable)."),
    reconstruction_only: bool = typer.Option(
        False, help="Splice the reconstruction alone (drop the SAE's error term)."
    ),
    tls_cert: Path = typer.Option(None, help="CA / self-signed certificate: connect with TLS."),
    token_file: Path = typer.Option(None, help="File holding the bearer token."),
    timeout: float = typer.Option(DEFAULT_CALL_TIMEOUT_S, help="Deadline in seconds."),
) -> None:
    """Generate on a running server with the SAE in the loop, steered by clamp / scale /
    ablate; prints the text as it comes."""
    import sys

    from hsae_runtime.client import Client, ServerError
    from hsae_runtime.steering import parse_intervention

    if prompt == "-":
        prompt = sys.stdin.read()
    interventions = [parse_intervention(t, "set") for t in clamp]
    interventions += [parse_intervention(t, "scale") for t in scale]
    interventions += [parse_intervention(t, "ablate") for t in ablate]
    tls: bool | Path = tls_cert if tls_cert is not None else False
    with Client(server, token=_read_token(token_file), tls=tls, timeout=timeout) as client:
        try:
            for token in client.generate(
                prompt, budget=budget, interventions=interventions,
                reconstruction_only=reconstruction_only, max_new_tokens=max_new_tokens,
                temperature=temperature, top_p=top_p, seed=seed, stop=stop, timeout=timeout,
            ):  # fmt: skip
                typer.echo(token.token, nl=False)
                if token.finish_reason:
                    typer.echo(f"\n[{token.finish_reason}]", err=True)
        except ServerError as err:
            typer.echo(f"\nerror: {err}", err=True)
            raise typer.Exit(1) from err


def _read_token(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except OSError as err:
        raise ConfigError(f"cannot read token file {path}: {err}") from err
    if not token:
        raise ConfigError(f"token file {path} is empty")
    return token
