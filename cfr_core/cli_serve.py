"""``cfr serve``: the warm scoring service (:mod:`cfr_core.serve`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

from cfr_core.cli import DEFAULT_HOME, _fail_cleanly, main
from cfr_core.cli_types import FiniteFloatRange


@main.command("serve")
@click.option(
    "--home",
    type=click.Path(path_type=Path),
    default=DEFAULT_HOME,
    show_default=True,
    help="Dagster home holding registry.db: every deployed category is served (env DAGSTER_HOME).",
)
@click.option(
    "--registry-url",
    help="SQLAlchemy URL of the registry (default: sqlite in HOME; env CFR_REGISTRY_URL).",
)
@click.option(
    "--model",
    "model_dir",
    type=click.Path(path_type=Path),
    help="Serve this one model folder under its category instead (trials, tests); verdicts "
    "are recorded only when HOME holds a registry.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--poll",
    default=10.0,
    show_default=True,
    type=FiniteFloatRange(0, 86400),
    help="Seconds between registry checks for new deployments (0: never; registry mode).",
)
@_fail_cleanly
def serve_cmd(home, registry_url, model_dir, host, port, poll):
    """Serve PASS / FAIL over HTTP with each category's deployed model kept in memory.

    \b
    POST /v1/categories/CATEGORY/score   multipart fields rgb (PNG) and xyz (TIFF);
                                         ?heatmap=true adds the anomaly map (base64 PNG)
    GET  /v1/models                      the models answering, and any refused deployment
    GET  /healthz                        200 once a model is loaded, 503 before

    A new deployment is loaded beside the live one and answers only after its audit
    passes; a deployment whose audit fails is refused (GET /v1/models says why) and the
    previous model keeps answering. Every verdict is written to the registry's database
    (time, category, version, model hash, input hashes, score, verdict). Bad input gets
    HTTP 4xx with the same one-line message as `cfr score`.

    \b
    Example:
      curl -F rgb=@part.png -F xyz=@part.tiff localhost:8000/v1/categories/dome/score
    """
    import uvicorn

    from cfr_core.cli_ops import _registry
    from cfr_core.line_log import LineLog
    from cfr_core.registry import default_url
    from cfr_core.serve import ModelHolder, create_app

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    if model_dir is not None:
        holder = ModelHolder(model_dir=model_dir)
        live = holder.load_folder()
        click.echo(f"serving {live.category} from {model_dir} ({live.model_hash[:12]})", err=True)
        url = registry_url or os.environ.get("CFR_REGISTRY_URL") or default_url(home)
        has_registry = (
            not url.startswith("sqlite:///") or Path(url.removeprefix("sqlite:///")).exists()
        )
        line_log = LineLog(_registry(home, registry_url).engine) if has_registry else None
        if line_log is None:
            click.secho(
                f"warning: no registry in {home}: verdicts are not recorded (pass --home)",
                fg="yellow",
                err=True,
            )
    else:
        registry = _registry(home, registry_url)
        holder = ModelHolder(registry=registry)
        for note in holder.refresh():
            click.echo(note, err=True)
        if not holder.live:
            click.secho(
                "warning: no deployed model passed its audit yet; /healthz answers 503 until one "
                "does",
                fg="yellow",
                err=True,
            )
        line_log = LineLog(registry.engine)
    app = create_app(holder, line_log, poll if model_dir is None else 0.0)
    click.echo(f"listening on http://{host}:{port}  (Ctrl-C stops)", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
