"""``cfr registry``, ``cfr audit``, ``cfr shots`` and ``cfr pipeline``: what is deployed, is it
intact, what was quarantined, and one category's rebuild through Dagster."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from cfr_core.cli import DEFAULT_HOME, _fail_cleanly, main
from cfr_core.cli_types import FiniteFloatRange
from cfr_core.paths import check_content_id, check_name


def _registry(home: Path, url: str | None):
    """The bank registry; the default SQLite one must exist (a mistyped --home is an error)."""
    from cfr_core.errors import DataError
    from cfr_core.registry import BankRegistry, default_url

    url = url or os.environ.get("CFR_REGISTRY_URL") or default_url(home)
    fix = (
        "pass the Dagster home that the pipeline used (--home or DAGSTER_HOME), "
        "or run `cfr demo` / `cfr pipeline run` first"
    )
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.is_file():
            raise DataError("no bank registry here", path, fix)
        if path.stat().st_size == 0:  # opening it would write a new registry into it
            raise DataError("an empty file, not a bank registry", path, fix)
    return BankRegistry(url)


def _library(home: Path, store: Path | None):
    from cfr_core.data.landing import ShotLibrary
    from cfr_core.errors import DataError

    root = store or (Path(os.environ["CFR_STORE"]) if os.environ.get("CFR_STORE") else None)
    base = root or home / "artifacts"
    if not base.is_dir():  # a mistyped --home / --store is not an empty library
        raise DataError(
            "no artifact store here",
            base,
            "pass the Dagster home that the pipeline used (--home or DAGSTER_HOME) or its "
            "--store, or run `cfr demo` / `cfr pipeline run` first",
        )
    return ShotLibrary(base / "shots")


HOME_OPTION = click.option(
    "--home",
    type=click.Path(path_type=Path),
    default=DEFAULT_HOME,
    show_default=True,
    help="Dagster home holding registry.db and artifacts/ (env DAGSTER_HOME).",
)
URL_OPTION = click.option(
    "--registry-url", help="SQLAlchemy URL (default: sqlite in HOME; env CFR_REGISTRY_URL)."
)
STORE_OPTION = click.option(
    "--store",
    type=click.Path(path_type=Path),
    help="Artifact store (default HOME/artifacts; env CFR_STORE).",
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
    rows = _registry(home, registry_url).list(check_name(category) if category else None)
    if as_json:
        click.echo(json.dumps([r.to_json() for r in rows], indent=2))
        return
    click.echo(
        f"{'':2}{'category':<12}{'version':>8}  {'model hash':<14}{'I-AUROC':>8}"
        f"{'rejects':>9}{'escapes':>9}{'threshold':>11}  created"
    )

    def metric(r, key: str, fmt: str) -> str:
        value = r.metrics.get(key) if isinstance(r.metrics, dict) else None
        return "-" if not isinstance(value, int | float) else format(value, fmt)

    for r in rows:
        click.echo(
            f"{'*' if r.deployed else ' ':2}{r.category:<12}{r.version:>8}  {r.model_hash[:12]:<14}"
            f"{metric(r, 'image_auroc', '.3f'):>8}{metric(r, 'false_reject_rate', '.1%'):>9}"
            f"{metric(r, 'escape_rate', '.1%'):>9}{r.threshold or 0:>11.4f}  {r.created_at}"
        )
    click.echo(
        "rejects: good test parts failed at the threshold; escapes: defective test parts "
        "passed (blank: no labelled test split)"
    )


@registry.command("rollback")
@click.argument("category")
@click.argument("version", type=int)
@HOME_OPTION
@URL_OPTION
@_fail_cleanly
def registry_rollback(category: str, version: int, home: Path, registry_url: str | None):
    """Point CATEGORY back at an earlier VERSION (one transaction, logged in the deploy log).

    The version must pass the full audit first (`cfr audit CATEGORY --version VERSION`:
    the registry's hash chains, its model folder against the manifest and the row, every
    stage of its lineage and every shot file). Anything that fails is refused, and the
    live deployment stays.
    """
    from cfr_core.audit import audited_rollback

    reg = _registry(home, registry_url)
    rec, report = audited_rollback(reg, check_name(category), version)
    click.echo(
        f"{category}: version {rec.version} is deployed ({rec.model_hash[:12]}; "
        f"audit passed, {len(report.checks)} checks)"
    )


def _print_report(report) -> None:
    for what, ok, detail in report.checks:
        click.secho(
            f"{'ok  ' if ok else 'FAIL'} {what}" + (f"  ({detail})" if detail else ""),
            fg=None if ok else "red",
        )
    verdict = "PASSED" if report.ok else "FAILED"
    click.secho(f"audit {verdict}: {report.category} version {report.version}", bold=True)


@main.command("audit")
@click.argument("category", required=False)
@click.option("--version", type=int, help="Default: the deployed version.")
@click.option("--all", "every", is_flag=True, help="Audit the deployed version of every category.")
@click.option(
    "--recompute",
    is_flag=True,
    help="Also re-extract the shots' features from the recorded shot files (no cache) and "
    "compare them with the features the model was fitted on (about a second per shot).",
)
@HOME_OPTION
@URL_OPTION
@_fail_cleanly
def audit_cmd(
    category: str | None,
    version: int | None,
    every: bool,
    recompute: bool,
    home: Path,
    registry_url: str | None,
):
    """Derive everything a deployment depends on, re-hash it, and compare.

    Checks the registry's hash chains, the model folder against its manifest and
    the registry's model hash, every stage version named by the model's lineage
    (bytes, files, upstream versions), every shot file, and that the row's shots,
    extractors, config, threshold and metrics equal the model's. Exits 1 on any
    mismatch.
    """
    from cfr_core.audit import AuditReport, audit, chain_check, recompute_checks

    reg = _registry(home, registry_url)
    if every == bool(category):
        raise click.UsageError("give a CATEGORY or --all")
    # the chains first: a row is not trusted (not even its `deployed` flag) before they hold
    chain = chain_check(reg)
    if not chain[1]:
        click.secho(f"FAIL {chain[0]}  ({chain[2]})", fg="red")
    if every:
        records = [rec for c in reg.categories() if (rec := _deployed_or_none(reg, c))]
    else:
        records = [_version_or_none(reg, check_name(category), version)]
    reports = []
    for rec in records:
        if rec is None:  # no deployed version, or an unknown one: say so, as a failed audit
            report = AuditReport(category or "?", version or 0)
            report.add(
                "a version to audit",
                False,
                f"{category!r} has "
                + (f"no version {version}" if version else "no deployed version"),
            )
            report.add(*chain)
        else:
            report = audit(rec, reg)
            if recompute:
                click.echo(f"recomputing {rec.category} version {rec.version}'s features ...")
                for check in recompute_checks(rec):
                    report.add(*check)
        reports.append(report)
    if every and not reports:
        click.echo("no deployments")
        sys.exit(0 if chain[1] else 1)
    for report in reports:
        _print_report(report)
    sys.exit(0 if chain[1] and all(r.ok for r in reports) else 1)


def _deployed_or_none(reg, category: str):
    from cfr_core.registry import RegistryError

    try:
        return reg.deployed(category)
    except RegistryError as exc:  # several rows flagged: the chain check says why
        click.secho(f"FAIL {category}: {exc}", fg="red")
        return None


def _version_or_none(reg, category: str, version: int | None):
    from cfr_core.registry import RegistryError

    try:
        return reg.get(category, version)
    except RegistryError as exc:
        click.secho(f"FAIL {exc}", fg="red")
        return None


@main.group()
def shots() -> None:
    """The shot library (the good scans) and its quarantine (scans the gate stopped)."""


@shots.command("list")
@HOME_OPTION
@STORE_OPTION
@click.option("--category", "-c")
@_fail_cleanly
def shots_list(home: Path, store: Path | None, category: str | None):
    """List the library's scans: category, id, the file the operator dropped, how it got in.

    "no gate" (dropped before the first deployment or with the gate off) and "released"
    (a person released it from the quarantine) are scans a person vouched for: they
    calibrate the next gate. "gate vN" scans were passed by deployed version N on its
    own: they can be shots, but the gate does not learn from its own verdicts.
    "unrecorded" scans were accepted before the library recorded how; they count as
    vouched for.
    """
    entries = _library(home, store).library_list(check_name(category) if category else None)
    if not entries:
        click.echo("the shot library is empty")
    for e in entries:
        how = e["admitted"] + (f" v{e['gate_version']}" if e["admitted"] == "gate" else "")
        click.echo(f"{e['category']:<12} {e['content_id']}  {how:<9} {e.get('name', '')}")


@shots.command("quarantine")
@HOME_OPTION
@STORE_OPTION
@click.option("--category", "-c")
@_fail_cleanly
def shots_quarantine(home: Path, store: Path | None, category: str | None):
    """List quarantined scans: category, id, the file the operator dropped, score and reason."""
    entries = _library(home, store).quarantine_list(check_name(category) if category else None)
    if not entries:
        click.echo("the quarantine is empty")
    for q in entries:
        click.echo(
            f"{q['category']:<12} {q['content_id']}  {q.get('name', '')}: {q.get('reason', '')}"
        )


@shots.command("release")
@click.argument("category")
@click.argument("content_id")
@click.option(
    "--yes", is_flag=True, help="Release it: without this, only say what the release loosens."
)
@HOME_OPTION
@STORE_OPTION
@_fail_cleanly
def shots_release(category: str, content_id: str, yes: bool, home: Path, store: Path | None):
    """A person confirmed the quarantined scan CONTENT_ID is good: add it to the library.

    A released scan is one a person vouched for: besides joining the shot pool, it
    calibrates the next gate, which so learns the spread of the good parts (scans the
    gate passed on its own do not). The next gate's limits then rise to admit scans
    like it: without --yes the command says which checks it failed and by how much,
    and releases nothing. The shot library changes, so the rebuild sensor starts a
    rebuild of CATEGORY on its next tick (with `dagster dev` or the daemon running);
    without them, run `cfr pipeline run CATEGORY`.
    """
    library = _library(home, store)
    category, content_id = check_name(category), check_content_id(content_id)
    if not yes:
        if not library.quarantined(category, content_id):
            library.release(category, content_id)  # raises: no such quarantined scan
        info = library.info(category, content_id, quarantine=True)
        score, limit = info.get("score"), info.get("threshold")
        click.echo(f"{category} {content_id} ({info.get('name', '')}) was quarantined: ")
        click.echo(f"  {info.get('reason', 'no reason recorded')}")
        if isinstance(score, int | float) and isinstance(limit, int | float) and limit > 0:
            click.echo(
                f"  its model score {score:.4g} against the gate's limit {limit:.4g} "
                f"({score / limit:.2f}x)"
            )
        click.echo(
            "Releasing it vouches for it: the next gate is calibrated with it, and every limit "
            "it exceeded rises to at least its value (scans like it then pass unseen).\n"
            f"If it is good, run again with --yes: cfr shots release {category} {content_id} --yes"
        )
        sys.exit(1)
    dst = library.release(category, content_id)
    click.echo(
        f"released into the library: {dst} (the next gate is calibrated with it)\n"
        f"the rebuild sensor starts a rebuild of {category} on its next tick; "
        f"without dagster running: cfr pipeline run {category}"
    )


@main.group()
def pipeline() -> None:
    """Run the Dagster pipeline for one category from the command line."""


@pipeline.command("run")
@click.argument("category")
@click.option("--epochs", type=click.IntRange(1), help="Mapper and retriever epochs (default 100).")
@click.option("--shots", type=click.IntRange(1), help="Shots per category (default 4).")
@click.option("--grid", type=click.IntRange(8), help="Feature grid (default 224).")
@click.option(
    "--tolerance",
    type=FiniteFloatRange(0),
    help="How much worse (I-AUROC, AUPRO@30%) than the deployed model the candidate may be "
    "(default 0.02).",
)
@click.option(
    "--wait",
    default=0.0,
    show_default=True,
    type=FiniteFloatRange(0),
    help="Seconds to wait for the category lock when another run holds it.",
)
@click.option("--ingest-only", is_flag=True, help="Only ingest new landing scans (cfr_ingest_job).")
@HOME_OPTION
@_fail_cleanly
def pipeline_run(
    category: str,
    epochs: int | None,
    shots: int | None,
    grid: int | None,
    tolerance: float | None,
    wait: float,
    ingest_only: bool,
    home: Path,
):
    """Run cfr_category_job for CATEGORY on the Dagster instance in HOME.

    Ingests new landing scans (quality-gated), rebuilds every stage, runs the
    blocking checks and deploys, exactly like a run the sensor starts; the run
    appears in the UI. Holds the category lock: a second run of the category
    waits up to --wait seconds, then exits with a message naming the run that
    holds it. Exits 1 when the run fails.
    """
    import dagster as dg

    from cfr_assets.demo import prepare_home

    check_name(category)
    home = home.resolve()
    prepare_home(home)
    os.environ["DAGSTER_HOME"] = str(home)
    os.environ["CFR_LOCK_WAIT"] = str(wait)
    from cfr_assets.definitions import default_resources
    from cfr_assets.runner import check_known, run_category

    overrides = {
        k: v
        for k, v in {"epochs": epochs, "shots": shots, "grid": grid, "tolerance": tolerance}.items()
        if v is not None
    }
    resources = default_resources(**overrides)
    with dg.DagsterInstance.get() as instance:
        check_known(category, instance, resources)
        # a held lock is one line here, not a failed run and its traceback in the log
        # (advisory: the run takes the lock again; another run may start in between)
        holder = f"cfr pipeline run {category} (pid {os.getpid()}, waiting to start)"
        scope = "ingest" if ingest_only else "rebuild"
        with resources["store"].registry().category_lock(category, holder, wait, scope=scope):
            pass
        outcome = run_category(
            category,
            instance,
            resources,
            job="cfr_ingest_job" if ingest_only else "cfr_category_job",
        )
    click.echo(f"run {outcome.run_id}: {category} {outcome.message}")
    if not outcome.success:
        sys.exit(1)
