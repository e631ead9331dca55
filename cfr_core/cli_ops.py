"""``cfr registry``, ``cfr audit`` and ``cfr shots``: what is deployed, is it intact, what was quarantined."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from cfr_core.cli import DEFAULT_HOME, _fail_cleanly, main


def _registry(home: Path, url: str | None):
    from cfr_core.registry import BankRegistry, default_url

    return BankRegistry(url or os.environ.get("CFR_REGISTRY_URL") or default_url(home))


HOME_OPTION = click.option(
    "--home",
    type=click.Path(path_type=Path),
    default=DEFAULT_HOME,
    show_default=True,
    help="Dagster home holding registry.db.",
)
URL_OPTION = click.option(
    "--registry-url", help="SQLAlchemy URL (default: sqlite in HOME; env CFR_REGISTRY_URL)."
)


@main.group()
def registry() -> None:
    """Deployed banks: list them, roll a category back."""


@registry.command("list")
@HOME_OPTION
@URL_OPTION
@click.option("--category", "-c", help="Only this category.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of rows.")
@_fail_cleanly
def registry_list(home: Path, registry_url: str | None, category: str | None, as_json: bool):
    """Every registered version; the deployed one is marked with *."""
    rows = _registry(home, registry_url).list(category)
    if as_json:
        click.echo(json.dumps([r.to_json() for r in rows], indent=2))
        return
    click.echo(
        f"{'':2}{'category':<12}{'version':>8}  {'model hash':<14}{'I-AUROC':>8}{'threshold':>11}  created"
    )
    for r in rows:
        auroc = r.metrics.get("image_auroc") if r.metrics else None
        click.echo(
            f"{'*' if r.deployed else ' ':2}{r.category:<12}{r.version:>8}  {r.model_hash[:12]:<14}"
            f"{'-' if auroc is None else f'{auroc:.3f}':>8}{r.threshold or 0:>11.4f}  {r.created_at}"
        )


@registry.command("rollback")
@click.argument("category")
@click.argument("version", type=int)
@HOME_OPTION
@URL_OPTION
@_fail_cleanly
def registry_rollback(category: str, version: int, home: Path, registry_url: str | None):
    """Point CATEGORY back at an earlier VERSION (one transaction)."""
    rec = _registry(home, registry_url).rollback(category, version)
    click.echo(f"{category}: version {rec.version} is deployed ({rec.model_hash[:12]})")


@main.command("audit")
@click.argument("category")
@click.option("--version", type=int, help="Default: the deployed version.")
@HOME_OPTION
@URL_OPTION
@_fail_cleanly
def audit_cmd(category: str, version: int | None, home: Path, registry_url: str | None):
    """Re-hash a deployment's model, stage artifacts and shot files; walk its lineage.

    Exits 1 on any mismatch.
    """
    from cfr_core.audit import audit

    report = audit(_registry(home, registry_url).get(category, version))
    for what, ok, detail in report.checks:
        click.secho(
            f"{'ok  ' if ok else 'FAIL'} {what}" + (f"  ({detail})" if detail else ""),
            fg=None if ok else "red",
        )
    verdict = "PASSED" if report.ok else "FAILED"
    click.secho(f"audit {verdict}: {category} version {report.version}", bold=True)
    sys.exit(0 if report.ok else 1)


@main.group()
def shots() -> None:
    """The shot library's quarantine: scans the deployed model found anomalous."""


@shots.command("quarantine")
@HOME_OPTION
@click.option(
    "--store", type=click.Path(path_type=Path), help="Artifact store (default HOME/artifacts)."
)
@click.option("--category", "-c")
@_fail_cleanly
def shots_quarantine(home: Path, store: Path | None, category: str | None):
    """List quarantined scans with their score and reason."""
    from cfr_core.data.landing import ShotLibrary

    for q in ShotLibrary((store or home / "artifacts") / "shots").quarantine_list(category):
        click.echo(
            f"{q['category']:<12}{q['content_id']}  {q.get('name', '')}: {q.get('reason', '')}"
        )


@shots.command("release")
@click.argument("category")
@click.argument("content_id")
@HOME_OPTION
@click.option(
    "--store", type=click.Path(path_type=Path), help="Artifact store (default HOME/artifacts)."
)
@_fail_cleanly
def shots_release(category: str, content_id: str, home: Path, store: Path | None):
    """A person confirmed the quarantined scan CONTENT_ID is good: add it to the library."""
    from cfr_core.data.landing import ShotLibrary

    dst = ShotLibrary((store or home / "artifacts") / "shots").release(category, content_id)
    click.echo(f"released into the library: {dst}; the next run of {category} uses it")
