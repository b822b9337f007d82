"""``hsae-runtime triton up DIR``: serve a model repository with the bundled Triton server.

Starts the ``tritonserver`` shipped in the ``triton`` extra (``nvidia-pytriton``) on loopback,
waits until ``/v2/health/ready`` answers, then runs until Ctrl-C or SIGTERM and stops the server
cleanly. See :mod:`hsae_runtime.exporters.triton_server` for how the server is put together and
docs/triton.md for deploying replicas.
"""

from __future__ import annotations

from pathlib import Path

import typer

from hsae_runtime.cli.app import app

triton_app = typer.Typer(help="Run a Triton Inference Server model repository locally.",
                         no_args_is_help=True)
app.add_typer(triton_app, name="triton")


@triton_app.command("up")
def up(
    repo: Path = typer.Argument(..., help="A model repository (export --triton-repo DIR)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address for HTTP, gRPC and metrics."),
    http_port: int = typer.Option(8000, "--http-port", help="HTTP/REST port."),
    grpc_port: int = typer.Option(8001, "--grpc-port", help="gRPC port."),
    metrics_port: int = typer.Option(8002, "--metrics-port", help="Prometheus metrics port."),
    ready_timeout: float = typer.Option(
        120.0, "--ready-timeout", help="Seconds to wait for the models to load."
    ),
    exit_timeout: int = typer.Option(
        10, "--exit-timeout", help="Seconds the server may drain requests and unload on stop."
    ),
    server_arg: list[str] = typer.Option(
        [], "--server-arg", help="Extra tritonserver flag, repeatable (e.g. --log-verbose=1)."
    ),
) -> None:
    """Start tritonserver on REPO, wait until ready, serve until Ctrl-C / SIGTERM."""
    import signal

    from hsae_runtime.exporters.triton_server import TritonPorts, TritonServer

    server = TritonServer(repo, host=host, ports=TritonPorts(http_port, grpc_port, metrics_port),
                          extra_args=server_arg, exit_timeout_s=exit_timeout)

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        server.start()
        server.wait_ready(ready_timeout)
        typer.echo(f"Triton ready: HTTP http://{server.http_url}, gRPC {server.grpc_url}, "
                   f"metrics http://{host}:{metrics_port}/metrics (Ctrl-C stops it)")
        assert server.process is not None
        code = server.process.wait()
        typer.echo(f"tritonserver exited with code {code}", err=True)
        raise typer.Exit(code if code else 1)
    except KeyboardInterrupt:
        typer.echo("stopping Triton ...", err=True)
    finally:
        code = server.stop()
        signal.signal(signal.SIGTERM, previous)
    typer.echo(f"Triton stopped (exit code {code})")
