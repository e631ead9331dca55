"""The ``cfr`` command line.

Every command prints what it did and where the results are; failures print one
clear line naming the file and the fix, and exit non-zero.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

import click

from cfr_core.cli_types import FiniteFloatRange
from cfr_core.errors import CFRError

DEFAULT_HOME = Path(os.environ.get("DAGSTER_HOME", "dagster_home"))


def _fail_cleanly(func):
    """Turn library errors into one readable line and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CFRError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(2)

    return wrapper


def _progress(label: str):
    """A progress callback (done, total) that draws a bar on stderr."""
    state: dict = {}

    def update(done: int, total: int) -> None:
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = click.progressbar(length=total, label=label, file=sys.stderr)
            bar.__enter__()
        bar.update(done - bar.pos)
        if done >= total:
            bar.__exit__(None, None, None)

    return update


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Log debug details.")
@click.version_option(package_name="cfr-factory")
def main(verbose: bool) -> None:
    """CFR Factory: few-shot RGB + 3D anomaly detection for production lines.

    Datasets use the MVTec 3D-AD layout:
    ROOT/CATEGORY/{train,validation}/good/{rgb/*.png, xyz/*.tiff} and
    ROOT/CATEGORY/test/{good,DEFECT}/{rgb, xyz, gt}.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for chatty in ("alembic", "matplotlib"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


@main.group()
def data() -> None:
    """Create, convert, check and preprocess datasets."""


@data.command("check")
@click.argument("root", type=click.Path(path_type=Path))
@click.option(
    "--category", "-c", "categories", multiple=True, help="Check only this category (repeatable)."
)
@click.option(
    "--min-valid",
    default=0.01,
    show_default=True,
    type=FiniteFloatRange(0, 1),
    help="Smallest share of measured points a usable point cloud must have.",
)
@click.option("--strict", is_flag=True, help="Also exit non-zero on warnings.")
@click.option(
    "--json", "json_out", type=click.Path(path_type=Path), help="Also write the report as JSON."
)
@_fail_cleanly
def data_check(
    root: Path, categories: tuple[str, ...], min_valid: float, strict: bool, json_out: Path | None
):
    """Open and validate every file of a dataset; list every problem per file.

    Checks that each RGB has its point cloud (and each defect its mask), that
    every file decodes, that shapes and dtypes are right, that RGB, xyz and mask
    sizes agree, and that each cloud has enough valid (finite, non-zero) points.
    Exits 1 when any error is found (any warning too, with --strict).
    """
    from cfr_core.data.io import check_output_file
    from cfr_core.data.validate import check_category, list_categories

    if json_out is not None:
        check_output_file(json_out)  # before the whole dataset is read, not after
    cats = list(categories) or list_categories(root)
    reports = []
    for cat in cats:
        reports.append(check_category(root, cat, min_valid, progress=_progress(f"checking {cat}")))
    n_err = sum(r.n_errors for r in reports)
    n_warn = sum(r.n_warnings for r in reports)
    click.echo(
        f"{'category':<18}{'train':>6}{'valid':>6}{'test':>6}  {'defect types':<32}{'size':<12}{'errors':>7}"
    )
    for r in reports:
        sizes = ",".join(f"{w}x{h}" for h, w in sorted(r.sizes)) or "-"
        click.echo(
            f"{r.category:<18}{r.n_samples['train']:>6}{r.n_samples['validation']:>6}{r.n_samples['test']:>6}  "
            f"{','.join(r.defect_types) or '-':<32}{sizes:<12}{r.n_errors:>7}"
        )
    for r in reports:
        for p in r.problems:
            click.secho(str(p), fg="red" if p.severity == "error" else "yellow")
    if json_out:
        payload = [
            {
                "category": r.category,
                "samples": r.n_samples,
                "defect_types": r.defect_types,
                "problems": [
                    {"path": str(p.path), "severity": p.severity, "reason": p.reason}
                    for p in r.problems
                ],
            }
            for r in reports
        ]
        from cfr_core.data.io import atomic_path

        with atomic_path(json_out) as tmp:
            tmp.write_text(json.dumps(payload, indent=2) + "\n")
    verdict = "FAILED" if n_err or (strict and n_warn) else "OK"
    click.secho(
        f"{verdict}: {n_err} error(s), {n_warn} warning(s) in {len(reports)} categories", bold=True
    )
    sys.exit(1 if verdict == "FAILED" else 0)


@data.command("synth")
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--categories",
    default="dome,candy,speckled,ribbed",
    show_default=True,
    help="Comma-separated: dome (plain control), candy (colours vary across parts), "
    "speckled (pattern placement varies), ribbed (paint must match geometry).",
)
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Every file is a function of the seed."
)
@click.option(
    "--size", default=256, show_default=True, type=click.IntRange(64, 2048), help="Long image side."
)
@click.option("--train", "n_train", default=8, show_default=True, type=click.IntRange(1))
@click.option("--validation", "n_validation", default=4, show_default=True, type=click.IntRange(0))
@click.option("--test-good", default=10, show_default=True, type=click.IntRange(1))
@click.option("--test-per-defect", default=5, show_default=True, type=click.IntRange(1))
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option(
    "--preview", type=click.Path(path_type=Path), help="Also save a contact sheet PNG here."
)
@_fail_cleanly
def data_synth(
    out: Path,
    categories: str,
    seed: int,
    size: int,
    n_train,
    n_validation,
    test_good,
    test_per_defect,
    overwrite: bool,
    preview: Path | None,
):
    """Generate a synthetic benchmark in the MVTec 3D-AD layout into OUT.

    Parts on a tilted table with sensor noise, shadows and dropouts; test sets
    with defects visible in RGB only (stain), 3D only (dent), both (crack), and
    only as a disagreement between the two (mismatch, ribbed).
    """
    from cfr_core.data.synth import SynthConfig, generate

    cfg = SynthConfig(
        categories=tuple(c.strip() for c in categories.split(",") if c.strip()),
        seed=seed,
        size=size,
        n_train=n_train,
        n_validation=n_validation,
        n_test_good=test_good,
        n_test_per_defect=test_per_defect,
    )
    generate(out, cfg, overwrite=overwrite, progress=_progress("rendering"))
    click.echo(f"wrote {', '.join(cfg.categories)} to {out}")
    if preview:
        from cfr_core.data.preview import save_contact_sheet

        save_contact_sheet(out, preview)
        click.echo(f"contact sheet: {preview}")


@data.command("convert-eyecandies")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--class", "classes", multiple=True, help="Convert only this class (repeatable).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@_fail_cleanly
def data_convert_eyecandies(src: Path, out: Path, classes: tuple[str, ...], overwrite: bool):
    """Convert an Eyecandies tree (SRC) to the MVTec 3D-AD layout in a new folder OUT.

    Depth is de-normalised with info_depth.yaml, back-projected (focal 711.11 px,
    principal point at the image centre) and moved to world coordinates with
    pose.txt; the background plane is removed; image_4 is the RGB; test_public
    is split into good/bad by its masks. SRC is never written.
    """
    from cfr_core.data.eyecandies import convert

    convert(src, out, list(classes) or None, overwrite=overwrite, progress=_progress("converting"))
    click.echo(f"converted {src} -> {out}; run `cfr data check {out}` next")


@data.command("preprocess")
@click.argument("root", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--category", "-c", "categories", multiple=True, help="Only this category (repeatable)."
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@_fail_cleanly
def data_preprocess(root: Path, out: Path, categories: tuple[str, ...], overwrite: bool):
    """Remove the table plane and stray clusters; pad to square. Writes a new tree OUT.

    RANSAC plane on the 10-pixel border strips (inlier 4 mm), points within
    5 mm of it zeroed, largest DBSCAN cluster kept (eps 6 mm, 30 points),
    RGB / xyz / masks zero- or edge-padded to a square side that is a multiple
    of 100. ROOT is never modified.
    """
    from cfr_core.data.preprocess_tree import preprocess_tree

    preprocess_tree(
        root,
        out,
        list(categories) or None,
        overwrite=overwrite,
        progress=_progress("preprocessing"),
    )
    click.echo(f"preprocessed {root} -> {out}")


@data.command("preview")
@click.argument("root", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--category", "-c", "categories", multiple=True, help="Only this category (repeatable)."
)
@_fail_cleanly
def data_preview(root: Path, out: Path, categories: tuple[str, ...]):
    """Save a contact sheet PNG: per category a good sample and one of each defect type."""
    from cfr_core.data.preview import save_contact_sheet

    save_contact_sheet(root, out, list(categories) or None)
    click.echo(f"contact sheet: {out}")


def _demo_table(rows) -> None:
    click.echo(
        f"\n{'category':<10}{'run':>11}{'version':>9}{'I-AUROC':>9}{'AUPRO@30%':>11}"
        f"{'threshold':>11}{'rejects':>9}{'escapes':>9}{'oracle':>8}  audit"
    )
    for r in rows:
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        pct = lambda v: "-" if v is None else f"{v:.0%}"  # noqa: E731
        click.echo(
            f"{r.category:<10}{r.status:>11}{r.version or '-':>9}{fmt(r.image_auroc):>9}"
            f"{fmt(r.aupro_30):>11}{fmt(r.threshold):>11}{pct(r.false_reject_rate):>9}"
            f"{pct(r.escape_rate):>9}{pct(r.oracle_escape_rate):>8}  "
            f"{'ok' if r.audit_ok else 'FAILED'}"
        )
    click.echo(
        "rejects: good test parts failed at the threshold; escapes: defective test parts "
        "passed; oracle: escapes of the best threshold with no more rejects (on the same scans)"
    )


def _live_deployments(home: Path) -> str:
    """'dome v2, candy v1': what the registry in ``home`` deploys now."""
    from cfr_core.registry import BankRegistry

    db = home / "registry.db"
    if not db.is_file():
        return ""
    registry = BankRegistry(f"sqlite:///{db}")
    live = (registry.deployed(c) for c in registry.categories())
    return ", ".join(f"{r.category} v{r.version}" for r in live if r)


@main.command("demo")
@click.option(
    "--home",
    type=click.Path(path_type=Path),
    default=DEFAULT_HOME,
    show_default=True,
    help="Dagster home (state, artifacts, registry); the demo data goes to HOME/demo.",
)
@click.option("--size", default=256, show_default=True, type=click.IntRange(64, 2048))
@click.option("--seed", default=0, show_default=True, type=int, help="Synthetic data seed.")
@click.option("--categories", help="Comma-separated subset of dome,candy,speckled,ribbed.")
@click.option("--shots", default=4, show_default=True, type=click.IntRange(1))
@click.option("--epochs", default=100, show_default=True, type=click.IntRange(1))
@click.option("--grid", default=224, show_default=True, type=click.IntRange(8))
@_fail_cleanly
def demo(
    home: Path, size: int, seed: int, categories: str | None, shots: int, epochs: int, grid: int
):
    """Run the main job on the embedded synthetic demo data, through Dagster.

    Generates the demo categories into HOME/demo/data, drops their good scans
    into HOME/landing, materializes every asset of every category (with the
    blocking checks) against the Dagster instance in HOME, deploys, audits, and
    prints the per-category table. Then `make ui` shows the same state.
    """
    from cfr_assets.demo import DemoInterrupted, run_demo

    cats = tuple(c.strip() for c in categories.split(",")) if categories else None
    try:
        rows = run_demo(
            home, size, seed, cats, shots, epochs, grid, log=lambda m: click.echo(m, err=True)
        )
    except DemoInterrupted as stopped:
        _demo_table(stopped.rows)
        live = _live_deployments(home)
        click.secho(
            f"\ninterrupted during {stopped.during}: stopped (a run cut short deploys nothing; "
            f"the previous deployment stays live). Deployed now: {live or 'nothing'}",
            fg="yellow",
            bold=True,
        )
        sys.exit(130)
    _demo_table(rows)
    click.echo(
        f"\nartifacts: {home / 'artifacts'}\nregistry:  {home / 'registry.db'}  (cfr registry list)"
    )
    click.echo(
        f"UI:        DAGSTER_HOME={home.resolve()} dagster dev -w workspace.yaml   (or: make ui)"
    )
    if not all(r.success and r.audit_ok for r in rows):
        for r in rows:
            if not r.success:
                click.secho(f"{r.category}: {r.message}", fg="red", err=True)
        click.secho("FAILED: not every category was deployed and audited", fg="red", bold=True)
        sys.exit(1)
    click.secho("OK: every demo category deployed and audited", bold=True)


# the model and operations commands register themselves on `main`
from cfr_core import cli_model, cli_ops, cli_serve  # noqa: E402, F401

if __name__ == "__main__":  # pragma: no cover
    main()
