"""``autoseg report`` on a tiny trained run: the page renders in a real headless browser (Chromium), every
embedded image decodes and is not blank, the tables hold the numbers of ``metrics.json`` and sort, and the
sections say what is missing when a run is incomplete."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from autoseg.cli import main
from autoseg.demo import make_synthetic_dataset
from autoseg.workflows.report import build_report, class_summary, gather_cases

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

#: appended to a copy of the page: draws every image on a canvas and records its size and value range, then
#: sorts the per-case table by its mean-Dice column, and writes both into the DOM that --dump-dom prints
CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  const out = [];
  for (const img of document.images) {
    const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
    const g = c.getContext('2d'); g.drawImage(img, 0, 0);
    let lo = 255, hi = 0;
    if (c.width && c.height) {
      const d = g.getImageData(0, 0, c.width, c.height).data;
      for (let i = 0; i < d.length; i += 4) { lo = Math.min(lo, d[i]); hi = Math.max(hi, d[i]); }
    }
    out.push([img.alt, img.naturalWidth, img.naturalHeight, hi - lo]);
  }
  sortTable('cases', 2);
  const order = Array.from(document.getElementById('cases').tBodies[0].rows).map(r => r.cells[0].textContent);
  const pre = document.createElement('pre'); pre.id = 'check';
  pre.textContent = JSON.stringify({images: out, sorted: order}); document.body.appendChild(pre);
});
</script>"""


class _Tables(HTMLParser):
    """Cell texts of every table by id."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._table = dict(attrs).get("id")
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._table:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    data = make_synthetic_dataset(root / "data", n_cases=10, shape=(20, 28, 24), spacing_xyz=(0.8, 0.8, 2.0))
    run = root / "run"
    for argv in (["plan", str(data), "-o", str(run), "--device", "cpu", "--no-progress"],
                 ["preprocess", str(run), "--no-progress"],
                 ["train", "0", "--run", str(run), "--epochs", "2", "--iterations-per-epoch", "3", "--no-progress",
                  "-j", "0"],
                 ["summarize", "--run", str(run)]):
        assert main(argv) == 0, argv
    return run


def test_report_tables_hold_the_validation_numbers(trained_run, capsys):
    out = trained_run / "qc" / "page.html"
    assert main(["report", "--run", str(trained_run), "-o", str(out), "--cases", "1", "--no-progress"]) == 0
    assert f"report       {out}" in capsys.readouterr().out
    page = out.read_text()
    metrics = json.loads((trained_run / "fold_0" / "validation" / "metrics.json").read_text())
    parser = _Tables()
    parser.feed(page)
    classes = {row[0]: row for row in parser.tables["classes"][1:]}
    head = parser.tables["classes"][0]
    for name, dice in metrics["mean_per_class"].items():
        assert classes[name][head.index("Dice")] == f"{dice:.4f}"
    # micro-Dice by hand from the recorded voxel counts
    for name in metrics["mean_per_class"]:
        tp, fp, fn = (sum(c[name][k] for c in metrics["cases"].values()) for k in ("tp", "fp", "fn"))
        assert classes[name][head.index("micro-Dice")] == f"{2 * tp / (2 * tp + fp + fn):.4f}"
    cases = parser.tables["cases"][1:]
    assert sorted(r[0] for r in cases) == sorted(metrics["cases"])
    pp = parser.tables["postprocessing"]
    assert [r[0] for r in pp[1:]] == list(metrics["mean_per_class"])
    assert all(r[1] in ("largest component only", "none") for r in pp[1:])
    assert page.count("<img") == 1 + 2  # one fold's curves, one worst and one best case
    assert "http://" not in page and "https://" not in page  # nothing fetched from the network


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian package chromium; .ci/run installs it)")
def test_report_renders_in_chromium_with_images_that_decode(trained_run, tmp_path):
    page = build_report(trained_run, n_shown=2, progress=False)
    path = tmp_path / "checked.html"
    path.write_text(page.replace("</body>", CHECK_SCRIPT + "</body>"))
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
                          "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120).stdout
    check = json.loads(re.search(r'<pre id="check">(.*?)</pre>', dom, re.S).group(1).replace("&quot;", '"'))
    n_cases = len(gather_cases(trained_run))
    assert len(check["images"]) == 1 + min(4, n_cases)  # curves + 2 worst + 2 best
    for alt, w, h, value_range in check["images"]:
        assert w > 200 and h > 100, alt  # decoded
        assert value_range > 50, alt  # not blank
    metrics = json.loads((trained_run / "fold_0" / "validation" / "metrics.json").read_text())
    by_mean = sorted(metrics["cases"], key=lambda c: -np.mean([v["dice"] for v in metrics["cases"][c].values()]))
    means = {c: round(float(np.mean([v["dice"] for v in metrics["cases"][c].values()])), 4) for c in by_mean}
    assert [means[c] for c in check["sorted"]] == sorted(means.values(), reverse=True)  # the click sorted it


def test_incomplete_runs_say_what_is_missing(tmp_path, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("fold_*", "crossval.json",
                                                                    "postprocessing.json"))
    page = build_report(run, progress=False)
    assert "No fold has a checkpoint yet" in page and "No fold is validated yet" in page
    assert "Not decided yet" in page
    with pytest.raises(ValueError, match="no plans.json"):
        build_report(tmp_path / "nothing")


def test_a_moved_dataset_leaves_out_the_scans_only(tmp_path, trained_run, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    fp = json.loads((run / "fingerprint.json").read_text())
    fp["dataset_dir"] = str(tmp_path / "gone")
    (run / "fingerprint.json").write_text(json.dumps(fp))
    page = build_report(run, progress=False)
    assert "is not here, so the scans cannot be shown" in page and "<h3>fold_0</h3>" in page


def test_a_case_that_cannot_be_drawn_is_named_and_the_rest_is_drawn(tmp_path, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    worst = min(gather_cases(run), key=lambda c: c.mean_dice)
    (run / "fold_0" / "validation" / f"{worst.case_id}.nii.gz").write_bytes(b"not an image")
    page = build_report(run, n_shown=1, progress=False)
    assert f"Case {worst.case_id} (worst) cannot be drawn" in page
    assert page.count("<img") == 2  # the curves and the best case


def test_class_summary_without_counts_has_no_micro_dice(trained_run):
    cases = gather_cases(trained_run)
    for c in cases:
        for v in c.scores.values():
            for k in ("tp", "fp", "fn"):
                v.pop(k)
    summary = class_summary(cases, list(cases[0].scores))
    assert all(np.isnan(s["micro_dice"]) for s in summary.values())
    assert all(0.0 <= s["dice"] <= 1.0 for s in summary.values())
