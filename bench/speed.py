"""Speed benchmark: where the time goes per sample, per fit, per bank search, per pipeline.

Rerun from a clean clone with ``.venv/bin/python bench/speed.py`` (about 30 min
on 2 cores; ``--quick`` for a few-minute smoke run; ``--sections`` for a
subset). It uses the synthetic benchmark data of ``bench/accuracy.py``
(generated if missing) and three extractor configurations, with the default
method (cfr-bank):

* ``lite``: ImageNet EfficientNet-Lite0 (weights from its Python package) + FPFH;
* ``offline``: colour-texture + FPFH, the training-free extractors;
* ``paper``: DINO ViT-B/8 + Point-MAE with *random* weights (the official
  weights cannot be downloaded here; a forward pass costs the same either way).

Sections (each runs in a fresh process, so its peak memory is its own):

* ``stages``  per-sample time of every stage beside the extractor floor, for
  each scoring stride (1 = every pixel, the paper);
* ``fit``     fit time per category for 1, 2 and 4 shots, and the coreset
  before/after (plain greedy vs the pruned one, same indices);
* ``search``  exact bank search for banks of 5k, 50k and 500k entries;
* ``dagster`` one category through the asset graph vs the same work through
  ``cfr_core`` directly;
* ``stride``  what the scoring stride costs in accuracy (I-AUROC, AUPRO).

Results merge into ``--out``/speed.json (a section rerun replaces only the
entries of the configurations it ran), then speed.md, speed.csv and speed.png are rewritten from it.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import copy
import csv
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cfr_core.config import (  # noqa: E402
    DEFAULT_EXTRACTORS,
    DEFAULT_METHOD,
    ExtractorConfig,
    FitConfig,
)

sys.path.insert(0, str(ROOT / "bench"))
from benchdata import bench_data  # noqa: E402

SECTIONS = ("stages", "fit", "search", "dagster", "stride")
CATEGORY = "candy"  # a one-to-many category: the case CFR is for
STAGE_ORDER = (
    "preprocess",
    "rgb extraction",
    "3D extraction",
    "standardise",
    "mapping",
    "bank search",
    "replacement",
    "scoring",
)
FLOOR = STAGE_ORDER[:3]


def extractor_config(name: str) -> ExtractorConfig:
    if name != "paper":
        return ExtractorConfig.preset(name)
    random = {"allow_random_weights": True}
    return ExtractorConfig.preset("paper", rgb_options=random, points_options=dict(random))


def fit_config(name: str, shots: int, epochs: int, method: str = DEFAULT_METHOD) -> FitConfig:
    cfg = FitConfig.for_method(method, shots=shots, extractors=extractor_config(name))
    return replace(
        cfg,
        mappers=replace(cfg.mappers, epochs=epochs),
        retriever=replace(cfg.retriever, epochs=epochs),
    )


def with_stride(model, stride: int):
    out = copy.copy(model)
    out.config = replace(model.config, scoring=replace(model.config.scoring, stride=stride))
    return out


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _interleaved_test(root: Path, n: int):
    from cfr_core.data.mvtec import GOOD, index_category

    test = index_category(root, CATEGORY).split("test")
    good = [s for s in test if s.defect == GOOD]
    bad = [s for s in test if s.defect != GOOD]
    mixed = [s for pair in zip(good, bad, strict=False) for s in pair]
    return mixed[:n]


# --------------------------------------------------------------------- stages
@contextlib.contextmanager
def _legacy_point_mae():
    """The Point-MAE code before this benchmark: the tokenizer's second conv on the
    concatenated [pooled, point] features, and the smoothing pools in NCHW layout."""
    import importlib

    pm = importlib.import_module("cfr_core.features.point_mae")

    def tokenizer(self, groups):
        k = groups.shape[1]
        x = self.first_conv(groups.transpose(1, 2))
        pooled = x.max(dim=2, keepdim=True).values
        return self.second_conv(torch.cat([pooled.expand(-1, -1, k), x], dim=1)).max(dim=2).values

    def smooth(feature_map, grid):
        pool = torch.nn.functional
        return pool.adaptive_avg_pool2d(pool.avg_pool2d(feature_map.contiguous(), 3, 1), grid)

    saved = pm.MiniPointNet.forward, pm.smooth_to_grid
    pm.MiniPointNet.forward, pm.smooth_to_grid = tokenizer, smooth
    try:
        yield
    finally:
        pm.MiniPointNet.forward, pm.smooth_to_grid = saved


def _one_pass_top1(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """The search before this benchmark: every query against the whole bank with
    torch.topk(k=1), 256 MiB similarity chunks."""
    q = torch.nn.functional.normalize(queries.float(), dim=1)
    b = torch.nn.functional.normalize(bank.float(), dim=1)
    rows = max(1, (1 << 26) // b.shape[0])
    return torch.cat(
        [
            torch.topk(q[s : s + rows] @ b.T, 1, dim=1).values[:, 0]
            for s in range(0, q.shape[0], rows)
        ]
    )


def _row_chunk_max(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """The search before the running max: 64 queries at a time against the whole bank
    (the chunking used for features narrower than 256 until 2026-12)."""
    q = torch.nn.functional.normalize(queries.float(), dim=1)
    b = torch.nn.functional.normalize(bank.float(), dim=1)
    rows = 64 if q.shape[1] < 256 else max(1, (1 << 26) // b.shape[0])
    return torch.cat([(q[s : s + rows] @ b.T).amax(dim=1) for s in range(0, q.shape[0], rows)])


@contextlib.contextmanager
def _search_implementation(name: str):
    """Swap the replacement test's search for the previous one-pass search."""
    import importlib

    # (cfr_core.engine re-exports the function infer, which hides the module of that name)
    infer_module = importlib.import_module("cfr_core.engine.infer")
    current = infer_module.any_similar
    if name.startswith("one-pass"):
        infer_module.any_similar = lambda q, b, min_sim, **_: _one_pass_top1(q, b) >= min_sim
    try:
        yield
    finally:
        infer_module.any_similar = current


def job_stages(root: str, config: str, shots: int, epochs: int, n: int, strides, device: str):
    from cfr_core.data.fewshot import select_shots
    from cfr_core.data.mvtec import index_category
    from cfr_core.data.prepare import prepare_sample
    from cfr_core.engine import FeatureSet, build_extractors, extract_features, fit_features
    from cfr_core.engine.infer import infer
    from cfr_core.engine.timing import StageTimer

    torch.manual_seed(0)
    cfg = fit_config(config, shots, epochs)
    rgb_ex, pts_ex = (e.to(device) for e in build_extractors(cfg.extractors))
    index = index_category(root, CATEGORY)
    shot_samples = select_shots(index.require_train(), shots, 42).samples
    t0 = time.perf_counter()
    model = fit_features(
        CATEGORY,
        cfg,
        extract_features(shot_samples, (rgb_ex, pts_ex), cfg.preprocess),
        (rgb_ex, pts_ex),
        device=device,
    )
    fit_s = time.perf_counter() - t0
    model.to(device)
    samples = _interleaved_test(Path(root), n + 1)  # the first one warms up, untimed
    floor = StageTimer(device)
    feats = []
    fg_pixels = []
    scans = []
    for j, sample in enumerate(samples):
        timer = floor if j else StageTimer(device)
        with timer("preprocess"):
            scan = prepare_sample(sample, cfg.preprocess, surface=False)  # the method's cloud only
        scans.append(scan)
        with timer("rgb extraction"):
            rgb = rgb_ex([scan]).half().float()
        with timer("3D extraction"):
            pts = pts_ex([scan]).half().float()
        fs = FeatureSet(rgb, pts, torch.zeros(1, *rgb.shape[-2:], dtype=torch.bool), [sample.key])
        feats.append(fs)
        if j:
            fg_pixels.append(int(fs.foreground.sum()))
    legacy = None
    if config == "paper":  # the 3D extractor as it was, on the same scans
        with _legacy_point_mae():
            pts_ex(scans[:1])
            legacy = StageTimer(device)
            for scan in scans[1:]:
                with legacy("3D extraction"):
                    pts_ex([scan])
    variants = [("one-pass (before)", 1)] + [("two-pass", s) for s in strides]
    runs = []
    for search, stride in variants:
        variant = with_stride(model, stride)
        with _search_implementation(search):
            infer(variant, feats[0])  # warm-up
            timer = StageTimer(device)
            results = [infer(variant, fs, timer) for fs in feats[1:]]
        maps = torch.cat([r.maps for r in results]).cpu()
        if not runs:
            reference = maps
        runs.append(
            {
                "search": search,
                "stride": stride,
                "seconds": {k: v / n for k, v in timer.seconds.items()},
                "replaced": float(np.mean([float(r.replaced[0]) for r in results])),
                "max_map_change": float((maps - reference).abs().max() / reference.abs().max()),
            }
        )
    return {
        "config": config,
        "device": device,
        "shots": shots,
        "samples": n,
        "grid": cfg.extractors.grid,
        "fg_pixels": float(np.mean(fg_pixels)),
        "bank_rows": None if model.banks is None else int(model.banks.rgb.shape[0]),
        "floor": {k: v / n for k, v in floor.seconds.items()},
        "floor_before": None if legacy is None else {k: v / n for k, v in legacy.seconds.items()},
        "runs": runs,
        "fit_seconds_reduced_epochs": fit_s,
        "epochs": epochs,
    }


# ------------------------------------------------------------------------ fit
def _plain_greedy_seconds(rows: torch.Tensor, n: int, steps: int) -> float:
    """Seconds a plain greedy k-centre (every row measured at every step) takes for n centres,
    from timing ``steps`` of its steps (each step costs the same)."""
    from cfr_core.memory.coreset import random_projection

    x = random_projection(rows, 128, torch.Generator().manual_seed(0)).contiguous()
    sq = (x * x).sum(1)
    min_d = torch.full((x.shape[0],), float("inf"))
    t0 = time.perf_counter()
    for _ in range(steps):
        p = int(torch.argmax(min_d))
        torch.minimum(min_d, (sq - 2.0 * (x @ x[p]) + sq[p]).clamp_min_(0.0), out=min_d)
        min_d[p] = 0.0
    return (time.perf_counter() - t0) / steps * n


def job_fit(root: str, config: str, shots_list, epochs: int, plain_steps: int):
    from cfr_core.engine import FeatureCache, build_extractors, fit
    from cfr_core.memory.bank import _rows, coreset_size

    torch.manual_seed(0)
    ex = build_extractors(extractor_config(config))
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for shots in shots_list:
            cfg = fit_config(config, shots, epochs)
            t0 = time.perf_counter()
            model = fit(root, CATEGORY, cfg, FeatureCache(tmp), extractors=ex)
            total = time.perf_counter() - t0
            t = dict(model.timings)
            extraction = t.pop("shot_features")
            training = sum(t.values())
            entry = {
                "config": config,
                "shots": shots,
                "epochs": epochs,
                "total": total,
                "extraction": extraction - training,  # shot_features spans extraction + training
                "mappers": t.get("mappers", 0.0),
                "banks": t.get("banks", 0.0),
                "retriever": t.get("retriever", 0.0),
                "calibration": total - extraction,
                "bank_rows": int(model.banks.rgb.shape[0]),
            }
            if plain_steps and shots == max(shots_list):
                from cfr_core.data.fewshot import select_shots
                from cfr_core.data.mvtec import index_category
                from cfr_core.engine import extract_features

                sel = select_shots(index_category(root, CATEGORY).require_train(), shots, 42)
                feats = extract_features(sel.samples, ex, cfg.preprocess, FeatureCache(tmp))
                rgb, pts = _rows(feats.rgb), _rows(feats.points)
                entry["banks_plain_greedy"] = sum(
                    _plain_greedy_seconds(r, coreset_size(len(r), 0.1), plain_steps)
                    for r in (rgb, pts)
                )
            out.append(entry)
    return out


# --------------------------------------------------------------------- search
def job_search(size: int, dim: int, queries: int, device: str):
    from cfr_core.memory.search import max_cosine, topk_cosine

    gen = torch.Generator().manual_seed(size)
    bank = torch.nn.functional.normalize(torch.randn(size, dim, generator=gen), dim=1).to(device)
    q = torch.randn(queries, dim, generator=gen).to(device)
    base_rss = peak_rss_mib()
    timings = {}
    repeats = 3 if size <= 50_000 else 1  # the best of 3 where it is cheap: this CPU is noisy
    for name, fn in (
        ("before_top1", lambda: _one_pass_top1(q, bank)),
        ("rows_max", lambda: _row_chunk_max(q, bank)),
        ("max", lambda: max_cosine(q, bank)),
        ("top1", lambda: topk_cosine(q, bank, 1)),
        ("top3", lambda: topk_cosine(q, bank, 3)),
    ):
        if size <= 50_000:  # warm-up where it is cheap
            fn()
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        timings[name] = 1000 * best / queries * 1000
    return {
        "size": size,
        "dim": dim,
        "queries": queries,
        "bank_mib": size * dim * 4 / 2**20,
        **{f"{k}_ms_per_1k": v for k, v in timings.items()},
        "peak_rss_mib": peak_rss_mib(),
        "rss_before_search_mib": base_rss,
    }


# -------------------------------------------------------------------- dagster
def job_dagster(root: str, shots: int, epochs: int):
    import dagster as dg

    from cfr_assets.definitions import default_resources
    from cfr_assets.demo import fill_landing, prepare_home
    from cfr_assets.resources import CFRData
    from cfr_assets.runner import run_category
    from cfr_core.engine import build_extractors, evaluate, fit
    from cfr_core.io import save_model

    cfg = fit_config(DEFAULT_EXTRACTORS, shots, epochs)
    category = "dome"
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        prepare_home(home)
        os.environ["DAGSTER_HOME"] = str(home)
        landing = home / "landing"
        fill_landing(Path(root), landing, [category])
        # direct: the same fit, evaluation and model folder through cfr_core alone
        t0 = time.perf_counter()
        ex = build_extractors(cfg.extractors)
        model = fit(root, category, cfg, extractors=ex)
        ev = evaluate(model, root, extractors=ex)
        save_model(model, Path(tmp) / "direct-model")
        direct = time.perf_counter() - t0
        resources = default_resources(shots=shots, epochs=epochs)
        resources["data"] = CFRData(landing=str(landing), dataset_root=str(root))
        with dg.DagsterInstance.get() as instance:
            t0 = time.perf_counter()
            outcome = run_category(category, instance, resources, log_level="WARNING")
            pipeline = time.perf_counter() - t0
            steps = {}
            for record in instance.get_records_for_run(outcome.run_id).records:
                event = record.event_log_entry.dagster_event
                if event is not None and event.event_type_value == "STEP_SUCCESS":
                    steps[event.step_key] = event.event_specific_data.duration_ms / 1000.0
    return {
        "category": category,
        "shots": shots,
        "epochs": epochs,
        "direct": direct,
        "pipeline": pipeline,
        "success": bool(outcome.success),
        "steps": steps,
        "direct_image_auroc": ev.report.image_auroc,
    }


# --------------------------------------------------------------------- stride
def job_stride(root: str, config: str, categories, shots_list, epochs: int, strides):
    from cfr_core.engine import FeatureCache, build_extractors, evaluate, fit

    cache = FeatureCache(ROOT / "bench" / ".cache" / "features")
    ex = build_extractors(extractor_config(config))
    out = []
    for category in categories:
        for shots in shots_list:
            for method in (DEFAULT_METHOD, "btf"):
                model = fit(root, category, fit_config(config, shots, epochs, method), cache, ex)
                for stride in strides:
                    r = evaluate(with_stride(model, stride), root, cache, ex).report
                    out.append(
                        {
                            "config": config,
                            "category": category,
                            "shots": shots,
                            "method": method,
                            "epochs": epochs,
                            "stride": stride,
                            "image_auroc": r.image_auroc,
                            "pixel_auroc": r.pixel_auroc,
                            "aupro_30": r.aupro[0.3],
                            "aupro_01": r.aupro[0.01],
                        }
                    )
    return out


# -------------------------------------------------------------------- driver
def _run(fn, *args):
    """Run ``fn(*args)`` in a fresh process; return (result, its peak RSS in MiB)."""
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_measured, fn, *args).result()


def _measured(fn, *args):
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(int(os.environ.get("CFR_BENCH_THREADS", torch.get_num_threads())))
    result = fn(*args)
    return result, peak_rss_mib()


def run(args) -> dict:
    path = args.out / "speed.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    root = str(args.data)
    q = args.quick
    configs = args.configs
    if "stages" in args.sections:
        entries = []
        for config in configs:
            epochs = 2 if config == "paper" or q else 100
            print(f"[stages] {config} ...", flush=True)
            res, rss = _run(
                job_stages, root, config, 4, epochs, 3 if q else 8, args.strides, args.device
            )
            res["peak_rss_mib"] = rss
            entries.append(res)
        results["stages"] = _merge(results.get("stages"), entries, configs)
        _save(path, results)
    if "fit" in args.sections:
        entries = []
        for config in configs:
            epochs = args.paper_epochs if config == "paper" else (10 if q else 100)
            print(f"[fit] {config} ...", flush=True)
            res, rss = _run(job_fit, root, config, [1] if q else [1, 2, 4], epochs, 50)
            for r in res:
                r["peak_rss_mib"] = rss
            entries += res
        results["fit"] = _merge(results.get("fit"), entries, configs)
        _save(path, results)
    if "search" in args.sections:
        entries = []
        for size in [5_000, 50_000] if q else [5_000, 50_000, 500_000]:
            for dim in (38, 152, 768):
                print(f"[search] {size} × {dim} ...", flush=True)
                res, rss = _run(job_search, size, dim, 512 if q else 4096, args.device)
                entries.append(res)
        results["search"] = entries
        results["search_date"] = time.strftime("%Y-%m-%d")
        _save(path, results)
    if "dagster" in args.sections:
        print("[dagster] ...", flush=True)
        res, rss = _run(job_dagster, root, 1, 5 if q else 30)
        res["peak_rss_mib"] = rss
        results["dagster"] = res
        _save(path, results)
    if "stride" in args.sections:
        entries = []
        for config in configs:
            print(f"[stride] {config} ...", flush=True)
            if config == "paper":
                cats, shots, epochs = [CATEGORY], [1], args.paper_epochs
            else:
                cats = ["speckled"] if q else ["candy", "dome", "knob", "ribbed", "speckled"]
                shots, epochs = ([1], 10) if q else ([1, 4], 100)
            res, _ = _run(job_stride, root, config, cats, shots, epochs, args.strides)
            entries += res
        results["stride"] = _merge(results.get("stride"), entries, configs)
        _save(path, results)
    results["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "date": time.strftime("%Y-%m-%d"),
    }
    _save(path, results)
    return results


def _merge(old: list | None, new: list, configs) -> list:
    """A rerun of some configurations replaces only their entries of the section."""
    return [e for e in old or [] if e.get("config") not in configs] + new


def _save(path: Path, results: dict) -> None:
    """Write speed.json after every section (atomically), so a late failure loses nothing."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


# ------------------------------------------------------------------- reports
def _stage_rows(entry: dict) -> list[dict]:
    rows = []
    floor = sum(entry["floor"].get(k, 0.0) for k in FLOOR)
    for res in entry["runs"]:
        post = sum(res["seconds"].values())
        rows.append(
            {
                "config": entry["config"],
                "search": res["search"],
                "stride": res["stride"],
                **{k: entry["floor"].get(k, 0.0) for k in FLOOR},
                **{k: res["seconds"].get(k, 0.0) for k in STAGE_ORDER[3:]},
                "floor": floor,
                "post": post,
                "ratio": (floor + post) / floor,
                "post_share": post / floor,
                "replaced": res["replaced"],
                "map_change": res.get("max_map_change", float("nan")),
            }
        )
    return rows


def _ms(x: float) -> str:
    return f"{1000 * x:,.0f}"


def summarise(results: dict, out: Path) -> str:
    m = results.get("machine", {})
    lines = [
        "# Speed (produced by `bench/speed.py`)",
        "",
        f"Machine: {m.get('cores')} cores ({m.get('cpu')}), torch {m.get('torch')}, "
        f"{m.get('threads')} threads, device {m.get('device')}, {m.get('date')}. "
        "Synthetic benchmark data (256 px scans, 224 grid). `paper` = DINO ViT-B/8 + "
        "Point-MAE with random weights (same cost as the official ones); `offline` = "
        "colour-texture + FPFH.",
    ]
    csv_rows = []
    if "stages" in results:
        lines += [
            "",
            "## Per sample: stages beside the extractor floor",
            "",
            "Milliseconds per sample (mean over the timed test samples, 4-shot banks). "
            "Floor = preprocessing + RGB extraction + 3D extraction, what any detector on "
            "these features pays. Post = everything after extraction. Ratio = total / floor. "
            "Stride s maps and searches every s-th pixel and interpolates the map "
            "(s = 1: every pixel, the paper). Map Δ = largest change of any anomaly-map "
            "value against the first row, relative to the map's maximum (0: identical maps).",
            "",
            "| config | search | stride | fg px | "
            + " | ".join(STAGE_ORDER)
            + " | post | ratio | post / floor | replaced | map Δ |",
            "|---|---|---|---|" + "---|" * (len(STAGE_ORDER) + 5),
        ]
        for entry in results["stages"]:
            for r in _stage_rows(entry):
                fg = entry["fg_pixels"] / r["stride"] ** 2
                lines.append(
                    f"| {r['config']} | {r['search']} | {r['stride']} | {fg:,.0f} | "
                    + " | ".join(_ms(r[k]) for k in STAGE_ORDER)
                    + f" | {_ms(r['post'])} | {r['ratio']:.2f}× | {100 * r['post_share']:.0f} % "
                    f"| {100 * r['replaced']:.1f} % | {r['map_change']:.0e} |"
                )
                csv_rows.append({"section": "stages", **r, "fg_pixels": entry["fg_pixels"]})
        for entry in results["stages"]:
            if entry.get("floor_before"):
                before = entry["floor_before"]["3D extraction"]
                after = entry["floor"]["3D extraction"]
                lines += [
                    "",
                    f"3D extraction before/after ({entry['config']}, same scans): "
                    f"{_ms(before)} ms → {_ms(after)} ms per sample ({before / after:.2f}×; "
                    "channels-last pooling, the tokenizer's pooled half applied once per "
                    "group; same features up to float rounding).",
                ]
        lines += [
            "",
            "Peak memory (RSS) of the stage runs: "
            + ", ".join(f"{e['config']} {e['peak_rss_mib']:,.0f} MiB" for e in results["stages"])
            + ".",
        ]
    if "fit" in results:
        lines += [
            "",
            f"## Fit time per category ({CATEGORY})",
            "",
            "Seconds. Extraction = preprocessing + features of the shots; calibration = "
            "features and scores of the validation scans. `paper` runs with fewer epochs "
            "on this CPU; its per-100-epoch column scales the measured mapper and retriever "
            "time linearly.",
            "",
            "| config | shots | bank rows | extraction | mappers | banks | retriever "
            "| calibration | total | epochs | total at 100 epochs | peak RSS MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["fit"]:
            scale = 100 / r["epochs"]
            at100 = r["total"] + (scale - 1) * (r["mappers"] + r["retriever"])
            lines.append(
                f"| {r['config']} | {r['shots']} | {r['bank_rows']:,} | {r['extraction']:.1f} | "
                f"{r['mappers']:.1f} | {r['banks']:.1f} | {r['retriever']:.1f} | "
                f"{r['calibration']:.1f} | {r['total']:.1f} | {r['epochs']} | {at100:.0f} | "
                f"{r['peak_rss_mib']:,.0f} |"
            )
            csv_rows.append({"section": "fit", **r})
        plain = [r for r in results["fit"] if "banks_plain_greedy" in r]
        if plain:
            lines += [
                "",
                "Coreset before/after (both banks of the largest shot count; same indices, "
                "tested): plain greedy k-centre timed over 50 steps and scaled to the bank "
                "size, vs the pruned greedy measured in full.",
                "",
                "| config | shots | rows → bank | plain greedy (s, est.) | pruned (s) | speed-up |",
                "|---|---|---|---|---|---|",
            ]
            for r in plain:
                lines.append(
                    f"| {r['config']} | {r['shots']} | {10 * r['bank_rows']:,} → {r['bank_rows']:,} "
                    f"| {r['banks_plain_greedy']:.0f} | {r['banks']:.1f} | "
                    f"{r['banks_plain_greedy'] / max(r['banks'], 1e-9):.0f}× |"
                )
    if "search" in results:
        lines += [
            "",
            "## Bank search",
            "",
            "Exact cosine search on this CPU, milliseconds per 1,000 queries (random unit "
            "rows; 38 = FPFH keys, 152 = lite RGB, 768 = DINO). First = the first search "
            "(torch.topk with k = 1 over 256 MiB similarity chunks); rows = 64 queries at a "
            "time against the whole bank, max only (the search until 2026-12); now = blocks "
            "of 2,048 queries x 512 bank rows, each query keeping its running best (same "
            "maxima and indices): max only (bank novelty, plausibility) and top-1 with its "
            "index. Top-3 is the retriever's candidate search. Best of 3 runs (1 for 500k "
            "rows). Memory: the bank itself and the process's peak RSS (similarity blocks "
            "never exceed 256 MiB). Measured "
            + results.get("search_date", "with the other sections")
            + " (a section run alone keeps the others' numbers: compare within a table).",
            "",
            "| bank rows | dim | bank MiB | top-1 first | max, rows | max, now | top-1 now "
            "| top-3 | peak RSS MiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["search"]:
            lines.append(
                f"| {r['size']:,} | {r['dim']} | {r['bank_mib']:,.0f} | "
                f"{r['before_top1_ms_per_1k']:,.1f} | "
                f"{r.get('rows_max_ms_per_1k', float('nan')):,.1f} | "
                f"{r.get('max_ms_per_1k', float('nan')):,.1f} | {r['top1_ms_per_1k']:,.1f} | "
                f"{r['top3_ms_per_1k']:,.1f} | {r['peak_rss_mib']:,.0f} |"
            )
            csv_rows.append({"section": "search", **r})
    if "dagster" in results:
        r = results["dagster"]
        overhead = r["pipeline"] - r["direct"]
        lines += [
            "",
            "## Dagster overhead",
            "",
            f"One category ({r['category']}, offline, {r['shots']} shot, {r['epochs']} epochs): "
            "the whole asset graph with its checks materialized in-process on a SQLite "
            "instance, against `fit` + `evaluate` + `save_model` called directly.",
            "",
            "| direct (s) | through Dagster (s) | overhead (s) | overhead | success |",
            "|---|---|---|---|---|",
            f"| {r['direct']:.1f} | {r['pipeline']:.1f} | {overhead:.1f} | "
            f"{100 * overhead / r['direct']:.0f} % | {r['success']} |",
            "",
            "Per step (s): "
            + ", ".join(
                f"{k} {v:.1f}" for k, v in sorted(r["steps"].items(), key=lambda kv: -kv[1])
            ),
        ]
        csv_rows.append({"section": "dagster", **{k: v for k, v in r.items() if k != "steps"}})
    if "stride" in results:
        lines += [
            "",
            "## What the stride costs in accuracy",
            "",
            "Same fitted models evaluated at each stride (few-shot seed 42). Differences "
            "against stride 1 in points (×100); the goal is |Δ| ≤ 0.5.",
            "",
        ]
        rows = results["stride"]
        strides = sorted({r["stride"] for r in rows})
        keys = ("image_auroc", "aupro_30", "aupro_01", "pixel_auroc")
        lines += [
            "| config | method | shots | stride | I-AUROC | AUPRO@30% | AUPRO@1% | P-AUROC "
            "| ΔI-AUROC | ΔAUPRO@30% | ΔAUPRO@1% |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        groups = sorted({(r["config"], r["method"], r["shots"]) for r in rows})
        for config, method, shots in groups:
            sel = [
                r for r in rows if (r["config"], r["method"], r["shots"]) == (config, method, shots)
            ]
            mean = {
                s: {k: np.mean([r[k] for r in sel if r["stride"] == s]) for k in keys}
                for s in strides
            }
            for s in strides:
                d = {k: 100 * (mean[s][k] - mean[strides[0]][k]) for k in keys}
                lines.append(
                    f"| {config} | {method} | {shots} | {s} | "
                    + " | ".join(f"{mean[s][k]:.3f}" for k in keys)
                    + f" | {d['image_auroc']:+.1f} | {d['aupro_30']:+.1f} | {d['aupro_01']:+.1f} |"
                )
        for config in sorted({r["config"] for r in rows}):
            sel = [r for r in rows if r["config"] == config]
            cats = ", ".join(sorted({r["category"] for r in sel}))
            lines += ["", f"`{config}`: mean over {cats}; {sel[0]['epochs']} training epochs."]
        csv_rows += [{"section": "stride", **r} for r in rows]
    text = "\n".join(lines) + "\n"
    notes = out / "speed_notes.md"
    if notes.exists():  # the hand-written reading of the numbers, kept across reruns
        text += "\n" + notes.read_text()
    (out / "speed.md").write_text(text)
    _write_csv(csv_rows, out / "speed.csv")
    if "stages" in results:
        _plot(results["stages"], out / "speed.png")
    return text


def _write_csv(rows: list[dict], path: Path) -> None:
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()})


def _plot(entries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for e in entries for r in _stage_rows(e)]
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(rows) + 1.6), dpi=110)
    labels = [f"{r['config']}  {r['search']}  stride {r['stride']}" for r in rows]
    left = np.zeros(len(rows))
    colours = plt.get_cmap("tab10")
    for j, stage in enumerate(STAGE_ORDER):
        vals = np.array([r[stage] for r in rows]) * 1000
        ax.barh(
            labels,
            vals,
            left=left,
            color=colours(j),
            label=stage,
            hatch="//" if stage in FLOOR else None,
        )
        left += vals
    for y, r in enumerate(rows):
        ax.text(left[y] + 20, y, f"{r['ratio']:.2f}× floor", va="center", fontsize=8)
    ax.set_xlabel("milliseconds per sample (hatched: extractor floor)")
    ax.set_xlim(0, left.max() * 1.25)
    ax.invert_yaxis()
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    ax.set_title("Where the time goes per sample")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data",
        type=Path,
        help="MVTec-layout dataset with category 'candy' (default: the synthetic benchmark)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument(
        "--sections",
        type=lambda s: s.split(","),
        default=list(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)}",
    )
    p.add_argument(
        "--configs", type=lambda s: s.split(","), default=[DEFAULT_EXTRACTORS, "offline", "paper"]
    )
    p.add_argument("--strides", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    p.add_argument(
        "--paper-epochs",
        type=int,
        default=3,
        help="mapper/retriever epochs for the paper config on CPU (scaled to 100)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (stages and search)")
    p.add_argument(
        "--summarise", action="store_true", help="only rewrite the reports from speed.json"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: fewer samples, sizes, epochs")
    args = p.parse_args()
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.quick:
        args.out = args.out / "quick"
    args.out.mkdir(parents=True, exist_ok=True)
    if args.summarise:
        results = json.loads((args.out / "speed.json").read_text())
    else:
        args.data = args.data or bench_data()
        results = run(args)
    print(summarise(results, args.out))


if __name__ == "__main__":
    main()
