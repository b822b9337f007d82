"""``hsae-runtime export`` and ``hsae-runtime import``: move SAEs between formats.

``export MODEL`` reads an hsae-runtime ``.safetensors`` file (or a SAELens / sparsify folder,
detected by its weights file) and writes any of: a validated ONNX graph, a Triton model
repository (Python backend by default, or the ONNX graph with ``--triton-backend onnx``), a
copy of the model file, a SAELens folder, a sparsify folder. ``import FOLDER`` converts a
SAELens or sparsify folder into our single-file format. Each step is logged with its time, and
one summary line closes the run.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from hsae_runtime.cli.app import app
from hsae_runtime.cli.common import parse_budgets


def _detect_folder(folder: Path) -> str:
    from hsae_runtime.errors import ModelFileError

    if (folder / "sae_weights.safetensors").is_file():
        return "saelens"
    if (folder / "sae.safetensors").is_file():
        return "sparsify"
    raise ModelFileError(
        f"{folder} holds neither sae_weights.safetensors (SAELens) nor sae.safetensors (sparsify)"
    )


def load_any(path: Path, fmt: str = "auto", **overrides: str | None):
    """An SAE from a model file or a SAELens / sparsify folder (``fmt``: auto|saelens|sparsify)."""
    from hsae_runtime.errors import ConfigError

    if path.is_dir() or fmt in ("saelens", "sparsify"):
        kind = _detect_folder(path) if fmt == "auto" else fmt
        match kind:
            case "saelens":
                from hsae_runtime.exporters.saelens import import_saelens

                return import_saelens(path, **overrides)
            case "sparsify":
                from hsae_runtime.exporters.sparsify import import_sparsify

                return import_sparsify(path, **overrides)
            case other:
                raise ConfigError(f"--format must be auto, saelens or sparsify, got {other!r}")
    from hsae_runtime.sae import SAE

    return SAE.load(path)


def _size(paths: list[Path]) -> str:
    from hsae_runtime.exporters.onnx import size_text

    return size_text(sum(p.stat().st_size for p in paths if p.exists()))


@app.command()
def export(
    model: Path = typer.Argument(
        ..., help="An hsae-runtime .safetensors model, or a SAELens / sparsify folder."
    ),
    onnx: Path | None = typer.Option(None, "--onnx", help="Write a validated ONNX graph here."),
    dtype: str = typer.Option(
        "float32", "--dtype",
        help="ONNX/Triton dtype: float32|float16 (the Triton python backend: also bfloat16).",
    ),
    budgets_out: str | None = typer.Option(
        None, "--budgets-out",
        help="Also output reconstructions at these fixed budgets, e.g. 8,16,32 (ONNX/Triton).",
    ),
    triton_repo: Path | None = typer.Option(
        None, "--triton-repo", help="Write a Triton Inference Server model repository here."
    ),
    triton_name: str = typer.Option("hsae", "--triton-name", help="Model name in the repository."),
    triton_backend: str = typer.Option(
        "python", "--triton-backend",
        help="python: model.py runs hsae_runtime (any tritonserver, the bundled one too); "
        "onnx: the ONNX graph (needs Triton's onnxruntime backend, e.g. NVIDIA's container).",
    ),
    max_batch_size: int = typer.Option(256, "--max-batch-size", help="Triton max_batch_size."),
    queue_delay_us: int = typer.Option(
        100, "--queue-delay-us", help="Triton dynamic batching max queue delay (microseconds)."
    ),
    dynamic_batching: bool = typer.Option(
        True, "--dynamic-batching/--no-dynamic-batching", help="Triton dynamic batching."
    ),
    triton_instance: str = typer.Option(
        "auto", "--triton-instance", help="Triton instance kind: auto|cpu|gpu."
    ),
    triton_instances: int = typer.Option(
        1, "--triton-instances", help="Triton instance count (model copies per device)."
    ),
    readout: str = typer.Option(
        "encoder", "--readout",
        help="python backend: the served codes' values, encoder or refine (as `serve "
        "--readout`); ONNX, SAELens and sparsify always compute the encoder readout.",
    ),
    triton_reference_model: bool = typer.Option(
        False, "--triton-reference-model",
        help="python backend: refer to MODEL by its absolute path instead of copying it.",
    ),
    safetensors: Path | None = typer.Option(
        None, "--safetensors", help="Write the hsae-runtime model file here."
    ),
    saelens: Path | None = typer.Option(None, "--saelens", help="Write a SAELens folder here."),
    sparsify: Path | None = typer.Option(None, "--sparsify", help="Write a sparsify folder here."),
    validate: bool = typer.Option(
        True, "--validate/--no-validate", help="Check ONNX graphs against torch (default on)."
    ),
) -> None:
    """Export a model to ONNX, a Triton repository, SAELens or sparsify (any combination)."""
    import logging

    from hsae_runtime.errors import ConfigError
    from hsae_runtime.refine import check_readout

    log = logging.getLogger("hsae_runtime.export")
    if not any((onnx, triton_repo, safetensors, saelens, sparsify)):
        raise ConfigError(
            "nothing to export",
            hint="pass at least one of --onnx, --triton-repo, --safetensors, --saelens, --sparsify",
        )
    python_repo = triton_repo is not None and triton_backend == "python"
    allowed = ("float32", "float16", "bfloat16") if python_repo and not onnx else ("float32",
                                                                                    "float16")
    if dtype not in allowed:
        raise ConfigError(f"--dtype must be one of {', '.join(allowed)}, got {dtype!r}",
                          hint="bfloat16 is for the Triton python backend alone")
    if triton_backend not in ("python", "onnx"):
        raise ConfigError(f"--triton-backend must be python or onnx, got {triton_backend!r}")
    if triton_reference_model and (not python_repo or model.is_dir()):
        raise ConfigError("--triton-reference-model needs --triton-backend python and a "
                          ".safetensors MODEL")
    chosen = check_readout(readout)
    if chosen != "encoder" and (not python_repo or onnx or saelens or sparsify):
        raise ConfigError(
            f"--readout {readout} is for the Triton python backend alone",
            hint="ONNX, SAELens and sparsify compute the encoder readout: export them in a "
            "separate call without --readout",
        )
    if triton_instance not in ("auto", "cpu", "gpu"):
        raise ConfigError(f"--triton-instance must be auto, cpu or gpu, got {triton_instance!r}")
    budgets = parse_budgets(budgets_out, "--budgets-out")
    start = time.perf_counter()
    sae = load_any(model)
    log.info("loaded %s (d_in=%d, d_sae=%d, k_max=%d) in %.1f s", model, sae.config.d_in,
             sae.config.d_sae, sae.config.k_max, time.perf_counter() - start)
    parts: list[str] = []
    graph = None  # the validated ONNX export, reused for the Triton repository

    def step(label: str):
        log.info("%s ...", label)
        return time.perf_counter()

    if onnx is not None:
        from hsae_runtime.exporters.onnx import export_onnx

        t = step(f"ONNX graph -> {onnx}")
        out = graph = export_onnx(sae, onnx, dtype=dtype,  # type: ignore[arg-type]
                                  budgets_out=budgets, validate=validate)
        err = f", max rel err {out.report.worst:.1e}" if out.report else ", not validated"
        parts.append(f"onnx {onnx} ({_size(out.files)}{err})")
        log.info("ONNX done in %.1f s", time.perf_counter() - t)
    delay = queue_delay_us if dynamic_batching else None
    if python_repo:
        from hsae_runtime.exporters.triton_repo import export_triton_python_repo

        assert triton_repo is not None
        t = step(f"Triton python-backend repository -> {triton_repo}/{triton_name}")
        cfg_path, files = export_triton_python_repo(
            sae, triton_repo, name=triton_name, dtype=dtype,
            model_file=model if triton_reference_model else None,
            max_batch_size=max_batch_size, queue_delay_us=delay,
            instance_kind=triton_instance, instance_count=triton_instances,  # type: ignore[arg-type]
            readout=chosen,
        )
        parts.append(f"triton (python backend) {cfg_path.parent} ({_size(files)})")
        log.info("Triton repository done in %.1f s", time.perf_counter() - t)
    elif triton_repo is not None:
        from hsae_runtime.exporters.triton_repo import export_triton_repo

        t = step(f"Triton repository -> {triton_repo}/{triton_name}")
        cfg_path, out = export_triton_repo(
            sae, triton_repo, name=triton_name, dtype=dtype,  # type: ignore[arg-type]
            budgets_out=budgets, max_batch_size=max_batch_size, queue_delay_us=delay,
            instance_kind=triton_instance, instance_count=triton_instances,  # type: ignore[arg-type]
            validate=validate, reuse=graph,
        )
        err = f", max rel err {out.report.worst:.1e}" if out.report else ""
        parts.append(f"triton {cfg_path.parent} ({_size([cfg_path, *out.files])}{err})")
        log.info("Triton repository done in %.1f s", time.perf_counter() - t)
    if safetensors is not None:
        t = step(f"model file -> {safetensors}")
        sae.save(safetensors)
        parts.append(f"safetensors {safetensors} ({_size([safetensors])})")
        log.info("model file done in %.1f s", time.perf_counter() - t)
    if saelens is not None:
        from hsae_runtime.exporters.saelens import export_saelens

        t = step(f"SAELens folder -> {saelens}")
        parts.append(f"saelens {saelens} ({_size(export_saelens(sae, saelens))})")
        log.info("SAELens folder done in %.1f s", time.perf_counter() - t)
    if sparsify is not None:
        from hsae_runtime.exporters.sparsify import export_sparsify

        t = step(f"sparsify folder -> {sparsify}")
        parts.append(f"sparsify {sparsify} ({_size(export_sparsify(sae, sparsify))})")
        log.info("sparsify folder done in %.1f s", time.perf_counter() - t)
    typer.echo(f"exported: {'; '.join(parts)} in {time.perf_counter() - start:.1f} s")


@app.command("import")
def import_folder(
    folder: Path = typer.Argument(..., help="A SAELens or sparsify folder (cfg.json + weights)."),
    out: Path = typer.Option(..., "--out", "-o", help="The hsae-runtime .safetensors to write."),
    fmt: str = typer.Option("auto", "--format", help="auto|saelens|sparsify."),
    hookpoint: str | None = typer.Option(None, "--hookpoint", help="Override the hookpoint."),
    model_name: str | None = typer.Option(None, "--model-name", help="Override the LM name."),
    dtype: str | None = typer.Option(
        None, "--dtype", help="Convert weights: float32|float16|bfloat16 (default: as stored)."
    ),
) -> None:
    """Convert a SAELens or sparsify TopK folder into an hsae-runtime model file."""
    from hsae_runtime.errors import ConfigError

    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder", hint="import reads SAELens/sparsify folders")
    start = time.perf_counter()
    sae = load_any(folder, fmt, hookpoint=hookpoint, model_name=model_name, dtype=dtype)
    sae.save(out)
    cfg = sae.config
    typer.echo(
        f"imported {folder} -> {out} ({_size([out])}, d_in={cfg.d_in}, d_sae={cfg.d_sae}, "
        f"k_max={cfg.k_max}, hookpoint={cfg.hookpoint}) in {time.perf_counter() - start:.1f} s"
    )
