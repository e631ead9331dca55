"""Development study: where CFR loses and what each choice is worth, on development categories only.

Every default of the ``lite`` preset (and the θ rule, blur, standardisation and
score of the CFR family) is chosen here, on ``DEV_CATEGORIES`` of the synthetic
benchmark; the report categories are never loaded by this script.

One fit per (category, shots, seed, fit setting) gives every per-pixel term
of the CFR family at once:

* ``raw``      3D→RGB discrepancy of the mapper's prediction
* ``att``/``nn`` 3D→RGB discrepancy of the attention / nearest-key replacement
* ``plaus``    unreliability d = 1 - max cos(prediction, RGB bank)
* ``pts``      RGB→3D discrepancy
* ``b_rgb``/``b_pts`` 1 - max cos of the observed RGB / 3D feature to its bank
* ``cfm``      CFM's product map; ``btf`` BTF's nearest-neighbour distance

and every scoring recipe (replacement at any θ, blur, bank-distance variants)
is then evaluated from those terms without refitting. Results go to
``bench/results/dev/`` as Markdown tables, a CSV and pictures.

    .venv/bin/python bench/develop.py terms   --preset lite   # fit + cache terms (slow)
    .venv/bin/python bench/develop.py analyse --preset lite   # tables from the cache (fast)
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cfr_core.config import ExtractorConfig, FitConfig  # noqa: E402
from cfr_core.data.fewshot import select_shots  # noqa: E402
from cfr_core.data.mvtec import index_category  # noqa: E402
from cfr_core.data.synth import DEV_CATEGORIES, KINDS, render_sample  # noqa: E402
from cfr_core.engine import FeatureCache, build_extractors  # noqa: E402
from cfr_core.engine.features import extract_features  # noqa: E402
from cfr_core.engine.fit import fit_features, test_samples  # noqa: E402
from cfr_core.io.artifacts import load_model, save_model  # noqa: E402
from cfr_core.memory.bank import joint_features  # noqa: E402
from cfr_core.memory.search import nearest_distance, topk_cosine  # noqa: E402
from cfr_core.metrics.aupro import aupro  # noqa: E402
from cfr_core.metrics.roc import image_auroc  # noqa: E402
from cfr_core.scoring.maps import aupro_maps, box_blur, discrepancy, image_scores  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from benchdata import bench_data  # noqa: E402

OUT = ROOT / "bench" / "results" / "dev"
CACHE = ROOT / "bench" / ".cache"
TERMS = ("raw", "att", "nn", "cond", "plaus", "pts", "b_rgb", "b_pts", "kvj", "cfm", "btf")


def extractor_config(preset: str, options: dict) -> ExtractorConfig:
    cfg = ExtractorConfig.preset(preset)
    return replace(
        cfg,
        rgb_options={**cfg.rgb_options, **options.get("rgb", {})},
        standardize=options.get("standardize"),
    )


@torch.no_grad()
def cfr_terms(model, feats) -> dict[str, np.ndarray]:
    """Per-pixel terms of every test image under a fitted CFR model (B×G×G each)."""
    if model.norm is not None:
        feats = model.norm.apply(feats)
    fg_all = feats.foreground
    out = {
        t: np.zeros(fg_all.shape, np.float32)
        for t in ("raw", "att", "nn", "cond", "plaus", "pts", "b_rgb", "b_pts", "kvj")
    }
    banks = model.banks
    for i in range(len(feats)):
        fg = fg_all[i]
        if not fg.any():
            continue
        f_rgb, f_3d = feats.rgb[i][:, fg].T, feats.points[i][:, fg].T
        p_rgb, p_3d = model.mappers(f_rgb, f_3d)
        sims, _ = topk_cosine(p_rgb, banks.rgb, 1)
        _, idx = topk_cosine(f_3d, banks.keys, model.retriever.top_k)
        att = model.retriever(f_3d, idx, banks.keys, banks.values)
        nn_val = banks.values[idx[:, 0]]
        _, idx8 = topk_cosine(f_3d, banks.keys, model.config.scoring.cond_top_k)
        cand = banks.values[idx8]  # N×k×C: the appearances this geometry had in the shots
        pick = F.cosine_similarity(cand, f_rgb.unsqueeze(1), dim=-1).argmax(dim=1)
        cond = cand[torch.arange(len(pick)), pick]
        b_rgb, _ = topk_cosine(f_rgb, banks.rgb, 1)
        b_pts, _ = topk_cosine(f_3d, banks.keys, 1)
        # BTF's joint distance, on the key-value bank CFR already holds (pairs of one pixel)
        kv = joint_features(banks.values, banks.keys)
        kvj = nearest_distance(joint_features(f_rgb, f_3d), kv)
        values = {
            "raw": discrepancy(p_rgb, f_rgb),
            "att": discrepancy(att, f_rgb),
            "nn": discrepancy(nn_val, f_rgb),
            "cond": discrepancy(cond, f_rgb),
            "plaus": 1.0 - sims[:, 0],
            "pts": discrepancy(p_3d, f_3d),
            "b_rgb": 1.0 - b_rgb[:, 0],
            "b_pts": 1.0 - b_pts[:, 0],
            "kvj": kvj,
        }
        for k, v in values.items():
            out[k][i][fg.numpy()] = v.numpy()
    return out


@torch.no_grad()
def product_map(model, feats) -> np.ndarray:
    """CFM-style product of the two direct discrepancies (no replacement)."""
    if model.norm is not None:
        feats = model.norm.apply(feats)
    fg_all = feats.foreground
    out = np.zeros(fg_all.shape, np.float32)
    for i in range(len(feats)):
        fg = fg_all[i]
        if fg.any():
            f_rgb, f_3d = feats.rgb[i][:, fg].T, feats.points[i][:, fg].T
            p_rgb, p_3d = model.mappers(f_rgb, f_3d)
            out[i][fg.numpy()] = (discrepancy(p_rgb, f_rgb) * discrepancy(p_3d, f_3d)).numpy()
    return out


@torch.no_grad()
def btf_map(model, feats) -> np.ndarray:
    if model.norm is not None:
        feats = model.norm.apply(feats)
    fg_all = feats.foreground
    out = np.zeros(fg_all.shape, np.float32)
    for i in range(len(feats)):
        fg = fg_all[i]
        if fg.any():
            rows = joint_features(feats.rgb[i][:, fg].T, feats.points[i][:, fg].T)
            out[i][fg.numpy()] = nearest_distance(rows, model.joint_bank).numpy()
    return out


@torch.no_grad()
def shot_statistics(model, shots) -> dict[str, np.ndarray]:
    """Unreliability of real and predicted RGB features of the shots' foreground pixels
    (what a θ rule may be computed from: no test data)."""
    feats = model.norm.apply(shots) if model.norm is not None else shots
    real, pred = [], []
    for i in range(len(feats)):
        fg = feats.foreground[i]
        f_rgb, f_3d = feats.rgb[i][:, fg].T, feats.points[i][:, fg].T
        p_rgb, _ = model.mappers(f_rgb, f_3d)
        real.append(1.0 - topk_cosine(f_rgb, model.banks.rgb, 1)[0][:, 0])
        pred.append(1.0 - topk_cosine(p_rgb, model.banks.rgb, 1)[0][:, 0])
    return {"real": torch.cat(real).numpy(), "pred": torch.cat(pred).numpy()}


def fit_and_cache(args, preset, options, tag, cat, shots, seed, cache, extractors) -> Path:
    path = CACHE / "terms" / tag / f"{cat}-{shots}-{seed}.npz"
    if path.exists():
        return path
    data = bench_data()
    base = FitConfig.for_method(
        "cfr", shots=shots, fewshot_seed=seed, extractors=extractor_config(preset, options)
    )
    base = replace(
        base,
        mappers=replace(base.mappers, epochs=args.epochs, hidden=options.get("hidden")),
        retriever=replace(base.retriever, epochs=args.epochs),
    )
    index = index_category(data, cat)
    sel = select_shots(index.require_train(), shots, seed)
    shot_feats = extract_features(sel.samples, extractors, base.preprocess, cache)
    samples = test_samples(data, cat)
    test = extract_features(samples, extractors, base.preprocess, cache)
    model_dir = CACHE / "models" / tag / f"{cat}-{shots}-{seed}"
    t0 = time.perf_counter()
    if (model_dir / "manifest.json").exists():
        cfr = load_model(model_dir)
    else:
        cfr = fit_features(cat, base, shot_feats, extractors)
        save_model(cfr, model_dir, overwrite=True)
    fit_s = time.perf_counter() - t0
    terms = cfr_terms(cfr, test)
    stats = shot_statistics(cfr, shot_feats)
    cfm_cfg = replace(
        FitConfig.for_method("cfm", shots=shots, fewshot_seed=seed, extractors=base.extractors)
    )
    cfm_cfg = replace(cfm_cfg, mappers=replace(cfm_cfg.mappers, epochs=args.epochs))
    terms["cfm"] = product_map(fit_features(cat, cfm_cfg, shot_feats, extractors), test)
    btf_cfg = FitConfig.for_method(
        "btf", shots=shots, fewshot_seed=seed, extractors=base.extractors
    )
    terms["btf"] = btf_map(fit_features(cat, btf_cfg, shot_feats, extractors), test)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        **{k: v.astype(np.float16) for k, v in terms.items()},
        masks=test.masks.numpy(),
        labels=np.array([s.label for s in samples]),
        defects=np.array([s.defect for s in samples]),
        stems=np.array([s.stem for s in samples]),
        shot_real=stats["real"].astype(np.float16),
        shot_pred=stats["pred"].astype(np.float16),
        shot_stems=np.array([s.stem for s in sel.samples]),
        fit_seconds=np.array(fit_s),
    )
    print(f"  {tag} {cat} {shots}-shot seed {seed}: fit {fit_s:.0f} s", flush=True)
    return path


def run_terms(args) -> None:
    for tag, preset, options in study_settings(args):
        extractors = build_extractors(extractor_config(preset, options))
        cache = FeatureCache(CACHE / "features")
        for seed in args.seeds:
            for shots in args.shots:
                for cat in args.categories:
                    fit_and_cache(args, preset, options, tag, cat, shots, seed, cache, extractors)


def study_settings(args) -> list[tuple[str, str, dict]]:
    """(tag, preset, options) of the fit-affecting settings under study."""
    out = []
    for spec in args.settings:
        options = json.loads(spec) if spec.startswith("{") else {}
        tag = options.pop("tag", spec if not spec.startswith("{") else None)
        out.append((f"{args.preset}-{tag or 'default'}", args.preset, options))
    return out


# ----------------------------------------------------------------------------- analysis

PAPER_BLUR = ((5, 1),)
REPLACING = (
    "cfr",
    "cfr-nn",
    "cfr-cond",
    "cfr*bank",
    "cfr*kvj",
    "cfr*b_pts",
    "cfr*b_rgb",
    "sqrtcfr*bank",
    "cfr*bank2",
)
HEAVY_BLUR = ((5, 5), (7, 3))


def load_terms(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: (z[k].astype(np.float32) if z[k].dtype == np.float16 else z[k]) for k in z.files}


def replaced(t: dict, theta: float, how: str = "att") -> np.ndarray:
    """3D→RGB discrepancy with the pixels whose unreliability d >= θ replaced."""
    return np.where(t["plaus"] >= theta, t[how], t["raw"])


def recipe_map(t: dict, recipe: str, theta: float) -> np.ndarray:
    """The raw (unblurred) anomaly map of a scoring recipe."""
    fg = t["pts"] > 0
    if recipe == "cfr":
        return replaced(t, theta) * t["pts"]
    if recipe == "cfr-nn":
        return replaced(t, theta, "nn") * t["pts"]
    if recipe == "cfr-cond":
        return replaced(t, theta, "cond") * t["pts"]
    if recipe == "noreplace":
        return t["raw"] * t["pts"]
    if recipe == "rgb-term":
        return replaced(t, theta)
    if recipe == "3d-term":
        return t["pts"]
    if recipe in ("cfm", "btf", "b_rgb", "b_pts"):
        return t[recipe] * fg
    if recipe == "bank":
        return (t["b_rgb"] + t["b_pts"]) * fg
    if recipe == "cfr*bank":
        return replaced(t, theta) * t["pts"] * (t["b_rgb"] + t["b_pts"])
    if recipe == "kvj":
        return t["kvj"] * fg
    if recipe == "cfr*b_pts":
        return replaced(t, theta) * t["pts"] * t["b_pts"]
    if recipe == "cfr*b_rgb":
        return replaced(t, theta) * t["pts"] * t["b_rgb"]
    if recipe == "sqrtcfr*bank":
        return np.sqrt(replaced(t, theta) * t["pts"]) * (t["b_rgb"] + t["b_pts"])
    if recipe == "cfr*bank2":
        return replaced(t, theta) * t["pts"] * (t["b_rgb"] + t["b_pts"]) ** 2
    if recipe == "cond*pts*bank":
        return t["cond"] * t["pts"] * (t["b_rgb"] + t["b_pts"])
    if recipe == "cfr*kvj":
        return replaced(t, theta) * t["pts"] * t["kvj"]
    if recipe == "cond*pts":
        return t["cond"] * t["pts"]
    if recipe == "cond*pts*kvj":
        return t["cond"] * t["pts"] * t["kvj"]
    if recipe == "pts*kvj":
        return t["pts"] * t["kvj"]
    raise ValueError(recipe)


def evaluate(t: dict, maps: np.ndarray, blur, score: str, with_aupro: bool) -> dict[str, float]:
    m = box_blur(torch.from_numpy(maps), blur)
    if score == "max":
        s = m.reshape(len(m), -1).max(dim=1).values
    elif score == "peak":  # max / mean of the non-zero values: blind to a uniform shift
        flat = m.reshape(len(m), -1)
        nz = (flat != 0).sum(1).clamp_min(1)
        s = flat.max(dim=1).values / (flat.sum(1) / nz).clamp_min(1e-12)
    else:
        s = image_scores(m)
    labels = t["labels"]
    out = {"i_auroc": image_auroc(s.numpy(), labels)}
    if with_aupro:
        norm = m if score == "max" else aupro_maps(m)
        out["aupro_30"] = aupro(norm.numpy(), t["masks"], 0.3, thresholds=99)
    good = labels == 0
    seen = t.get("seen")
    if seen is not None and (good & ~seen).any() and (good & seen).any():
        # how far good parts of an unseen appearance sit above the good parts of a seen one
        sv = s.numpy()
        out["unseen_rank"] = float((sv[good & ~seen][:, None] > sv[good & seen][None]).mean())
    return out


def appearance(cat: str, stems, split: str = "test", defects=None) -> np.ndarray | None:
    """Per sample, the appearance id (candy colour, knob finish) or None for other categories."""
    field = {"candy": "colour", "knob": "finish"}.get(cat)
    if field is None:
        return None
    defects = defects if defects is not None else ["good"] * len(stems)
    return np.array(
        [
            render_sample(cat, str(d), 0, split, int(st), 64).info[field]
            for st, d in zip(stems, defects, strict=True)
        ]
    )


def analyse(args) -> None:
    rows = []
    for tag, _, _ in study_settings(args):
        for seed in args.seeds:
            for shots in args.shots:
                for cat in args.categories:
                    path = CACHE / "terms" / tag / f"{cat}-{shots}-{seed}.npz"
                    if not path.exists():
                        print(f"missing {path}; run `terms` first")
                        continue
                    t = load_terms(path)
                    looks = appearance(cat, t["stems"], "test", t["defects"])
                    if looks is not None:
                        shot_looks = appearance(cat, t["shot_stems"], "train")
                        t["seen"] = np.isin(looks, shot_looks)
                    thetas = dict(args.thetas)
                    for q in (0.9, 0.99, 0.999):
                        thetas[f"real-q{q}"] = float(np.quantile(t["shot_real"], q))
                        thetas[f"pred-q{q}"] = float(np.quantile(t["shot_pred"], q))
                    for recipe in args.recipes:
                        theta_items = (
                            thetas.items()
                            if recipe in ("cfr", "cfr-nn", "cfr*bank")
                            else [("-", 0.0)]
                        )
                        for th_name, theta in theta_items:
                            raw = recipe_map(t, recipe, theta)
                            rate = (
                                float(
                                    ((t["plaus"] >= theta) & (t["pts"] > 0))[t["labels"] == 0].sum()
                                    / max(1, (t["pts"] > 0)[t["labels"] == 0].sum())
                                )
                                if recipe in ("cfr", "cfr-nn", "cfr*bank")
                                else 0.0
                            )
                            for blur_name, blur in (("paper", PAPER_BLUR), ("heavy", HEAVY_BLUR)):
                                if blur_name not in args.blurs:
                                    continue
                                for score in args.scores:
                                    r = evaluate(t, raw, blur, score, args.aupro)
                                    rows.append(
                                        {
                                            "tag": tag,
                                            "category": cat,
                                            "kind": KINDS[cat],
                                            "shots": shots,
                                            "seed": seed,
                                            "recipe": recipe,
                                            "theta": th_name,
                                            "theta_value": round(theta, 4),
                                            "blur": blur_name,
                                            "score": score,
                                            "replaced": round(rate, 4),
                                            **{k: round(v, 4) for k, v in r.items()},
                                        }
                                    )
                    print(f"analysed {tag} {cat} {shots}-shot seed {seed}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    out_csv = OUT / f"study-{args.name}.csv"
    fields = sorted(
        {k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99
    )
    with open(out_csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fields)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out_csv} ({len(rows)} rows)")


PICTURE_TERMS = (
    ("raw", "3D→RGB discrepancy"),
    ("plaus", "unreliability d"),
    ("pts", "RGB→3D discrepancy"),
    ("cfr", "CFR map (replaced, θ auto)"),
    ("kvj", "joint distance (KV bank)"),
    ("btf", "BTF map"),
)


# ----------------------------------------------------------------------------- decisions

#: how the analysis names the deployed method's map
AS_METHOD = {"cfr*bank": "cfr-bank", "noreplace": "cfr-noreplace"}


def study_rows() -> dict[tuple, dict]:
    """Every analysed row of every study-*.csv, one per (setting, category, shots, seed, recipe,
    θ rule, blur, score)."""
    rows: dict[tuple, dict] = {}
    for path in sorted(OUT.glob("study-*.csv")):
        with open(path) as fh:
            for r in csv.DictReader(fh):
                key = tuple(
                    r[k]
                    for k in (
                        "tag",
                        "category",
                        "shots",
                        "seed",
                        "recipe",
                        "theta",
                        "blur",
                        "score",
                    )
                )
                rows[key] = r
    return rows


def _cell(rows, tag, shots, recipe, theta, blur, score, cats, field="i_auroc"):
    vals = []
    for cat in cats:
        r = rows.get((tag, cat, str(shots), "42", recipe, theta, blur, score))
        if r is None or r.get(field, "") == "":
            return None
        vals.append(float(r[field]))
    return float(np.mean(vals))


def decisions(args) -> None:
    """Tables behind every default of the lite preset, from the analysed studies."""
    rows = study_rows()
    cats = list(DEV_CATEGORIES)
    o2m = [c for c in cats if KINDS[c] != "control"]

    def th(recipe):
        return "pred-q0.99" if recipe in REPLACING else "-"

    def fmt(v):
        return "–" if v is None else f"{v:.3f}"

    def md_row(label, cells):
        return f"| {label} | " + " | ".join(map(fmt, cells)) + " |"

    lines = [
        "# Development decisions (bench/develop.py decisions)",
        "",
        f"Development categories {', '.join(cats)}; few-shot seed 42; mean image AUROC "
        f"over all five and over the one-to-many four ({', '.join(o2m)}). Unless a table "
        "varies it: lite preset, standardised features, heavy blur, ratio image score, θ "
        "from the shots (pred-q0.99). Report categories were never loaded.",
        "",
        "## Method and preset (heavy blur, ratio score)",
        "",
        "| method | lite 1-shot | lite 1-shot one-to-many | lite 4-shot | lite 4-shot one-to-many "
        "| offline 1-shot | offline 1-shot one-to-many |",
        "|---|---|---|---|---|---|---|",
    ]
    for recipe in ("cfr", "cfr*bank", "noreplace", "cfm", "btf"):
        cells = [
            _cell(rows, tag, shots, recipe, th(recipe), "heavy", "ratio", sub)
            for tag, shots in (("lite-default", 1), ("lite-default", 4), ("offline-default", 1))
            for sub in (cats, o2m)
        ]
        lines.append(md_row(AS_METHOD.get(recipe, recipe), cells))
    lines += [
        "",
        "## Blur (lite, 1 shot, ratio score)",
        "",
        "| method | paper (one 5×5) | heavy (five 5×5 + three 7×7) |",
        "|---|---|---|",
    ]
    for recipe in ("cfr", "cfr*bank", "noreplace", "cfm", "btf"):
        cells = [
            _cell(rows, "lite-default", 1, recipe, th(recipe), b, "ratio", cats)
            for b in ("paper", "heavy")
        ]
        lines.append(md_row(AS_METHOD.get(recipe, recipe), cells))
    lines += [
        "",
        "## Image score (lite, heavy blur)",
        "",
        "| method | shots | ratio (max / sqrt(mean), the paper's) | max |",
        "|---|---|---|---|",
    ]
    for recipe in ("cfr*bank", "btf"):
        for shots in (1, 4):
            cells = [
                _cell(rows, "lite-default", shots, recipe, th(recipe), "heavy", sc, cats)
                for sc in ("ratio", "max")
            ]
            lines.append(
                f"| {AS_METHOD.get(recipe, recipe)} | {shots} | "
                + " | ".join(map(fmt, cells))
                + " |"
            )
    lines += [
        "",
        "## θ, the replacement threshold (lite, heavy blur, ratio score)",
        "",
        "pred-qQ: the Q quantile of the unreliability of the mappers' predictions on the shots' "
        "own pixels (what `ScoringConfig.theta = 'auto'` computes at fit time); real-qQ: the "
        "same quantile of the real RGB features' distance to the RGB bank; numbers: fixed θ. "
        "Replaced: share of good test pixels replaced.",
        "",
        "| θ rule | cfr 1-shot | cfr-bank 1-shot | replaced 1-shot | cfr 4-shot | cfr-bank 4-shot "
        "| replaced 4-shot |",
        "|---|---|---|---|---|---|---|",
    ]
    for rule in (
        "0.05",
        "0.1",
        "0.2",
        "0.4",
        "real-q0.9",
        "real-q0.99",
        "pred-q0.9",
        "pred-q0.99",
        "pred-q0.999",
    ):
        cells = []
        for shots in (1, 4):
            cells += [
                _cell(rows, "lite-default", shots, rec, rule, "heavy", "ratio", cats)
                for rec in ("cfr", "cfr*bank")
            ]
            cells.append(
                _cell(rows, "lite-default", shots, "cfr", rule, "heavy", "ratio", cats, "replaced")
            )
        lines.append(md_row(rule, cells))
    lines += [
        "",
        "## Standardisation of the features (lite, heavy blur, ratio score)",
        "",
        "| method | standardised 1-shot | raw 1-shot | standardised 4-shot | raw 4-shot |",
        "|---|---|---|---|---|",
    ]
    for recipe in ("cfr*bank", "cfm", "btf"):
        cells = [
            _cell(rows, tag, shots, recipe, th(recipe), "heavy", "ratio", cats)
            for shots in (1, 4)
            for tag in ("lite-default", "lite-nostd")
        ]
        lines.append(md_row(AS_METHOD.get(recipe, recipe), cells))
    lines += [
        "",
        "## How the bank novelty enters the score (lite, heavy blur, ratio score)",
        "",
        "b_rgb / b_pts: 1 − max cosine of the observed RGB / 3D feature to CFR's RGB / key "
        "bank; bank = b_rgb + b_pts.",
        "",
        "| recipe | 1-shot | 4-shot |",
        "|---|---|---|",
    ]
    for recipe in (
        "cfr",
        "bank",
        "cfr*b_rgb",
        "cfr*b_pts",
        "cfr*bank",
        "sqrtcfr*bank",
        "cfr*bank2",
    ):
        cells = [
            _cell(rows, "lite-default", shots, recipe, th(recipe), "heavy", "ratio", cats)
            for shots in (1, 4)
        ]
        note = ""
        if None in cells:  # analysed without replacement
            note = " (no replacement)"
            cells = [
                _cell(rows, "lite-default", shots, recipe, "-", "heavy", "ratio", cats)
                for shots in (1, 4)
            ]
        lines.append(md_row(recipe + note, cells))
    notes = OUT / "notes.md"
    text = "\n".join(lines) + "\n"
    (OUT / "decisions.md").write_text(text)
    print(text)
    if notes.exists():
        print(f"(the reading of these tables: {notes})")


def pictures(args) -> None:
    """Per development category: two good parts (one of a seen look, one unseen when the
    category has looks) and three defects, with every term of the CFR family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cfr_core.data.prepare import prepare_sample

    data = bench_data()
    tag = study_settings(args)[0][0]
    for shots in args.shots:
        for cat in args.categories:
            path = CACHE / "terms" / tag / f"{cat}-{shots}-{args.seeds[0]}.npz"
            if not path.exists():
                continue
            t = load_terms(path)
            samples = test_samples(data, cat)
            looks = appearance(cat, t["stems"], "test", t["defects"])
            seen_looks = appearance(cat, t["shot_stems"], "train")
            good = [i for i, s in enumerate(samples) if s.label == 0]
            if looks is not None:
                seen = [i for i in good if looks[i] in seen_looks]
                unseen = [i for i in good if looks[i] not in seen_looks]
                good = (seen[:1] + unseen[:1]) or good[:2]
            picks = (
                good[:2]
                + [
                    next(i for i, s in enumerate(samples) if s.defect == d)
                    for d in dict.fromkeys(s.defect for s in samples if s.label == 1)
                ][:3]
            )
            theta = float(np.quantile(t["shot_pred"], 0.99))
            t["cfr"] = replaced(t, theta) * t["pts"]
            fig, axes = plt.subplots(
                len(picks),
                2 + len(PICTURE_TERMS),
                figsize=(2 * (2 + len(PICTURE_TERMS)), 2 * len(picks)),
                dpi=80,
            )
            for row, i in enumerate(picks):
                scan = prepare_sample(samples[i], FitConfig().preprocess, surface=False)
                label = samples[i].defect + (
                    f" ({looks[i]}{', unseen' if looks is not None and looks[i] not in seen_looks else ''})"
                    if looks is not None
                    else ""
                )
                axes[row, 0].imshow(scan.rgb)
                axes[row, 0].set_title(label, fontsize=8)
                axes[row, 1].imshow(t["masks"][i], cmap="gray")
                axes[row, 1].set_title("ground truth", fontsize=8)
                for col, (name, title) in enumerate(PICTURE_TERMS, start=2):
                    m = t[name][i]
                    fg = t["pts"][i] > 0
                    vmax = float(np.quantile(t[name][t["pts"] > 0], 0.99)) if fg.any() else 1.0
                    axes[row, col].imshow(np.where(fg, m, np.nan), cmap="jet", vmin=0, vmax=vmax)
                    axes[row, col].set_title(title, fontsize=8)
            for ax in axes.flat:
                ax.set_xticks([])
                ax.set_yticks([])
            fig.suptitle(
                f"{cat}, {shots} shot(s), seed {args.seeds[0]}: per-pixel terms (colour scale: 99th percentile over the test set)",
                fontsize=9,
            )
            fig.tight_layout()
            OUT.mkdir(parents=True, exist_ok=True)
            fig.savefig(OUT / f"diagnosis-{cat}-{shots}shot.png")
            plt.close(fig)
            print(f"wrote {OUT / f'diagnosis-{cat}-{shots}shot.png'}")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("what", choices=["terms", "analyse", "pictures", "decisions"])
    p.add_argument("--preset", default="lite")
    p.add_argument(
        "--settings",
        nargs="*",
        default=["default"],
        help='fit settings, e.g. \'{"tag": "s12", "rgb": {"stages": [1, 2]}}\'',
    )
    p.add_argument("--categories", type=lambda s: s.split(","), default=list(DEV_CATEGORIES))
    p.add_argument("--shots", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4])
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[42])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--name", default="main", help="name of the analysis CSV")
    p.add_argument("--aupro", action="store_true", help="also AUPRO@30% (slow)")
    p.add_argument("--blurs", type=lambda s: s.split(","), default=["paper", "heavy"])
    p.add_argument("--scores", type=lambda s: s.split(","), default=["ratio", "max"])
    p.add_argument(
        "--recipes",
        type=lambda s: s.split(","),
        default=[
            "cfr",
            "cfr-cond",
            "kvj",
            "cfr*kvj",
            "cond*pts",
            "cond*pts*kvj",
            "pts*kvj",
            "noreplace",
            "rgb-term",
            "3d-term",
            "cfm",
            "btf",
            "b_rgb",
            "b_pts",
            "bank",
            "cfr*bank",
        ],
    )
    p.add_argument(
        "--thetas",
        type=lambda s: [(x, float(x)) for x in s.split(",")],
        default=[(x, float(x)) for x in ("0.05", "0.1", "0.2", "0.4")],
    )
    args = p.parse_args()
    bad = [c for c in args.categories if c not in DEV_CATEGORIES]
    if bad:
        p.error(f"{bad} are report categories: choices are made on {DEV_CATEGORIES} only")
    logging.basicConfig(level=logging.WARNING)
    if args.what == "terms":
        run_terms(args)
    elif args.what == "pictures":
        pictures(args)
    elif args.what == "decisions":
        decisions(args)
    else:
        analyse(args)


if __name__ == "__main__":
    main()
