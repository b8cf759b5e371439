"""``autoseg report``: one self-contained HTML page about a run (images embedded, no network, opens from
disk): the plan in words, every fold's training curves, the cross-validation table per class and per case
(sortable), overlays of the worst and the best validation cases, and the post-processing decision."""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from autoseg.atomic import atomic_path
from autoseg.checkpoint import load_checkpoint
from autoseg.dataset import load_dataset
from autoseg.evaluation.evaluate import METRICS, ratio
from autoseg.fingerprint import FINGERPRINT_FILE, load_fingerprint
from autoseg.inference.choice import load_choice
from autoseg.io import ImageReadError, read_image
from autoseg.overlays import OverlayRow, largest_disagreement_slices, render_overlays
from autoseg.planning.summary import format_summary
from autoseg.plans import PLANS_FILE, load_plans, select_configuration
from autoseg.runconfig import CONFIG_FILE, load_config, model_dir
from autoseg.training.progress import progress_png
from autoseg.workflows.validate import VALIDATION_DIR, validated_folds

__all__ = ["build_report", "write_report", "REPORT_FILE", "CaseResult"]

REPORT_FILE = "report.html"
METRIC_NAMES = {"dice": "Dice", "hd95_mm": "HD95 (mm)", "assd_mm": "ASSD (mm)", "tpr": "TPR",
                "precision": "precision", "micro_dice": "micro-Dice"}


@dataclass
class CaseResult:
    """One validated case: its fold and, per class name, the metrics of ``validation/metrics.json``."""

    case_id: str
    fold: str
    scores: dict[str, dict[str, float]]

    @property
    def mean_dice(self) -> float:
        return float(np.mean([v["dice"] for v in self.scores.values()]))


def _png_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _num(v: float, digits: int = 4) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _table(head: list[str], rows: list[list[str]], table_id: str) -> str:
    """An HTML table whose column headers sort it (numbers as numbers)."""
    th = "".join(f"<th onclick=\"sortTable('{table_id}', {i})\">{html.escape(h)}</th>" for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table id="{table_id}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _curves(folder: Path) -> str:
    """Each fold's training curves, and early stops from its ``config.json``."""
    parts = []
    for fold in sorted(folder.glob("fold_*")):
        ckpt = next((p for p in (fold / "checkpoint_final.pt", fold / "checkpoint_latest.pt") if p.is_file()), None)
        if ckpt is None:
            continue
        history = load_checkpoint(ckpt)["state"].history
        png = progress_png(history, title=f"{fold.name} ({ckpt.stem.removeprefix('checkpoint_')})")
        if png is None:
            continue
        early = load_config(fold / CONFIG_FILE).early_stops if (fold / CONFIG_FILE).is_file() else {}
        stops = "".join(f"<li>early stop of {html.escape(k)}: {html.escape(v)}</li>" for k, v in early.items())
        parts.append(f"<h3>{fold.name}</h3>{_png_tag(png, f'training curves {fold.name}')}"
                     + (f"<ul>{stops}</ul>" if stops else ""))
    return "".join(parts) or "<p>No fold has a checkpoint yet (autoseg train).</p>"


def gather_cases(folder: Path) -> list[CaseResult]:
    """Every validated case of the configuration's folds (``fold_all`` excluded)."""
    out = []
    for fold in validated_folds(folder):
        m = json.loads((fold / VALIDATION_DIR / "metrics.json").read_text())
        out += [CaseResult(cid, fold.name, v) for cid, v in m["cases"].items()]
    return out


def class_summary(cases: list[CaseResult], names: list[str]) -> dict[str, dict[str, float]]:
    """Per class: the mean of each metric over the cases, and the micro-Dice (NaN when the counts are not
    recorded, as in runs validated by an autoseg before 2026-11-29)."""
    out = {}
    for n in names:
        rows = [c.scores[n] for c in cases if n in c.scores]
        means = {m: float(np.mean([r[m] for r in rows])) for m in METRICS}
        if rows and all("tp" in r for r in rows):
            tp, fp, fn = (sum(int(r[k]) for r in rows) for k in ("tp", "fp", "fn"))
            means["micro_dice"] = ratio(2 * tp, 2 * tp + fp + fn, tp + fp + fn == 0)
        else:
            means["micro_dice"] = math.nan
        out[n] = means
    return out


def _crossval(cases: list[CaseResult], names: list[str]) -> str:
    summary = class_summary(cases, names)
    cols = [*METRICS, "micro_dice"]
    rows = [[html.escape(n), *(_num(summary[n][m]) for m in cols)] for n in names]
    rows.append(["<b>mean</b>", *(_num(float(np.mean([summary[n][m] for n in names]))) for m in cols)])
    per_class = _table(["class", *(METRIC_NAMES[m] for m in cols)], rows, "classes")
    case_rows = [[html.escape(c.case_id), c.fold, _num(c.mean_dice),
                  *(_num(c.scores[n]["dice"]) for n in names), *(_num(c.scores[n]["hd95_mm"], 2) for n in names)]
                 for c in sorted(cases, key=lambda c: c.mean_dice)]
    per_case = _table(["case", "fold", "mean Dice", *(f"Dice {n}" for n in names), *(f"HD95 {n} (mm)" for n in names)],
                      case_rows, "cases")
    return (f"<p>{len(cases)} validation cases of {len({c.fold for c in cases})} fold(s); means over cases; micro-Dice "
            "sums the voxels of all cases before the ratio. Conventions: a 0/0 ratio is 1 when the class is in "
            "neither mask, else 0; distances are 0 when both masks are empty, the image diagonal when one is.</p>"
            f"{per_class}<h3>Per case (click a column to sort)</h3>{per_case}")


def _case_overlay(case: CaseResult, kind: str, images: dict[str, tuple[Path, ...]], labels: dict[str, Path],
                  folder: Path, class_names: dict[int, str], channel: str) -> str:
    """Reference and prediction of one case over its first channel, on the slices of largest disagreement."""
    image, geometry = read_image(images[case.case_id][0])
    ref = read_image(labels[case.case_id])[0][0]
    pred = read_image(folder / case.fold / VALIDATION_DIR / f"{case.case_id}.nii.gz")[0][0]
    slices = largest_disagreement_slices(ref, pred)
    title = f"{case.case_id}, {case.fold}: {kind}, mean Dice {case.mean_dice:.3f}"
    png = render_overlays([OverlayRow(f"reference\n{channel} (channel 0)", image[0], ref),
                           OverlayRow(f"prediction\n{channel} (channel 0)", image[0], pred)],
                          geometry.spacing_zyx, slices, class_names, heading=title)
    return f"<figure>{_png_tag(png, title)}<figcaption>{html.escape(title)}; planes through the slices where " \
           "reference and prediction differ most</figcaption></figure>"


def _overlays(cases: list[CaseResult], dataset_dir: Path, folder: Path, class_names: dict[int, str], channel: str,
              n_shown: int, progress: bool) -> str:
    if not cases:
        return "<p>No validated case yet.</p>"
    if not (dataset_dir / "dataset.json").is_file():
        return (f"<p>The dataset this run was planned on ({html.escape(str(dataset_dir))}) is not here, so the scans "
                "cannot be shown.</p>")
    spec = load_dataset(dataset_dir)
    images = {c.case_id: c.images for c in spec.cases}
    labels = {c.case_id: c.label for c in spec.cases}
    ranked = sorted(cases, key=lambda c: c.mean_dice)
    worst = ranked[:n_shown]
    best = [c for c in ranked[::-1][:n_shown] if c not in worst]
    shown = [(c, "worst") for c in worst] + [(c, "best") for c in best]
    figures = []
    for c, kind in tqdm(shown, desc="overlays", unit="case", disable=not progress, leave=False):
        try:
            figures.append(_case_overlay(c, kind, images, labels, folder, class_names, channel))
        except (KeyError, OSError, ValueError, ImageReadError) as e:  # one case that cannot be drawn, said so
            why = f"not in the dataset's case list ({e})" if isinstance(e, KeyError) else str(e)
            figures.append(f"<p>Case {html.escape(c.case_id)} ({kind}) cannot be drawn: {html.escape(why)}</p>")
    return "".join(figures)


def _postprocessing(folder: Path, labels: dict[int, str]) -> str:
    path = folder / "crossval.json"
    if not path.is_file():
        return "<p>Not decided yet: <code>autoseg summarize</code> decides it on the folds' validation cases.</p>"
    pp = json.loads(path.read_text())["postprocessing"]
    kept = set(pp["largest_component_classes"])
    rows = [[html.escape(n), "largest component only" if v in kept else "none",
             _num(pp["dice_before"].get(n)), _num(pp["dice_after"].get(n)),
             _num(pp["hd95_before_mm"].get(n), 2), _num(pp["hd95_after_mm"].get(n), 2)]
            for v, n in sorted(labels.items()) if v > 0]
    return ("<p>Per class, keeping only the largest connected component is adopted when it raises the "
            "cross-validation Dice (or keeps it within 0.001 and lowers the HD95); <code>autoseg predict</code> "
            "applies it.</p>"
            + _table(["class", "post-processing", "Dice before", "Dice after", "HD95 before (mm)", "HD95 after (mm)"],
                     rows, "postprocessing"))


_STYLE = """body{font-family:sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:90%}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}
th{background:#eee;cursor:pointer}td:first-child,th:first-child{text-align:left}pre{background:#f6f6f6;padding:1em;
overflow-x:auto;font-size:85%}img{max-width:100%}figure{margin:1em 0}figcaption{font-size:85%;color:#555}"""
_SCRIPT = """function sortTable(id, col){const t=document.getElementById(id),b=t.tBodies[0],
rows=Array.from(b.rows),asc=t.dataset.col==col&&t.dataset.dir!='asc';
const key=r=>{const s=r.cells[col].textContent,n=parseFloat(s);return isNaN(n)?s:n};
rows.sort((a,c)=>{const x=key(a),y=key(c);return (x>y?1:x<y?-1:0)*(asc?1:-1)});
rows.forEach(r=>b.appendChild(r));t.dataset.col=col;t.dataset.dir=asc?'asc':'desc'}"""


def build_report(run_dir: Path, configuration: str | None = None, n_shown: int = 3, progress: bool = True) -> str:
    """The report's HTML for ``configuration`` of ``run_dir`` (None: find-best's choice when it is a single
    configuration, else the plan's default), with ``n_shown`` worst and best cases drawn.

    Raises:
        ValueError: ``run_dir`` is not a planned run, or has no such configuration.
    """
    run_dir = Path(run_dir)
    if not (run_dir / PLANS_FILE).is_file():
        raise ValueError(f"{run_dir}: no {PLANS_FILE}; give a run directory written by autoseg plan")
    plans_all = load_plans(run_dir / PLANS_FILE)
    fp = load_fingerprint(run_dir / FINGERPRINT_FILE)
    plans = select_configuration(plans_all, configuration or _chosen(run_dir))
    folder = model_dir(run_dir, plans.configuration)
    names = [plans.labels[c] for c in sorted(plans.labels)[1:]]
    cases = gather_cases(folder)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = [
        f"<h1>autoseg report: {html.escape(plans.dataset_name)}, configuration {html.escape(plans.configuration)}</h1>"
        f"<p>Run {html.escape(str(run_dir.resolve()))}, written {when}.</p>",
        "<h2>The plan</h2><p>What autoseg chose for this dataset and device, and why (from plans.json):</p>"
        f"<pre>{html.escape(format_summary(fp, plans_all))}</pre>",
        f"<h2>Training curves</h2>{_curves(folder)}",
        f"<h2>Cross-validation</h2>{_crossval(cases, names) if cases else '<p>No fold is validated yet.</p>'}",
        f"<h2>Worst and best validation cases</h2>"
        f"{_overlays(cases, Path(fp.dataset_dir), folder, plans.labels, plans.channel_names[0], n_shown, progress)}",
        f"<h2>Post-processing</h2>{_postprocessing(folder, plans.labels)}",
    ]
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>autoseg report: "
            f"{html.escape(plans.dataset_name)}</title><style>{_STYLE}</style><script>{_SCRIPT}</script></head>"
            f"<body>{''.join(sections)}</body></html>")


def _chosen(run_dir: Path) -> str | None:
    """find-best's choice when it is one configuration (a pair has no folds of its own to report)."""
    choice = load_choice(run_dir)
    return choice.configurations[0] if choice is not None and len(choice.configurations) == 1 else None


def write_report(run_dir: Path, out: Path | None = None, configuration: str | None = None, n_shown: int = 3,
                 progress: bool = True) -> Path:
    """Build the report and write it to ``out`` (default ``RUN_DIR/report.html``) atomically."""
    page = build_report(run_dir, configuration, n_shown, progress)
    path = Path(out) if out is not None else Path(run_dir) / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
