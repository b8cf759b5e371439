"""Fault injection over every command: nothing lost, nothing half-written, one clear line.

On a generated dataset, for each of ``preprocess``, ``train``, ``predict`` and ``ensemble``: SIGKILL of the
command's whole process group at N seeded random moments of its uninterrupted duration, then the same command
again; the outputs must equal the uninterrupted run's (preprocessed arrays, properties and label copies; the
final weights and validation metrics; the predicted files byte for byte) and no temporary or lock file may
remain. Then single faults: each command under a file-size limit (``RLIMIT_FSIZE``, a full disk for the writer)
and again without it; a truncated and a pickled ``checkpoint_latest.pt``; a plan edited by hand with a wrong
type; preprocessed cases deleted between epochs. Prints one table: fault, runs, recovered, outputs identical,
messages clear (one ``error:`` line and no traceback).

Usage: python benchmarks/bench_faults.py [--out DIR] [--kills 20] [--seed 0]
       python benchmarks/bench_faults.py --kills 2    (the quick subset CI runs)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autoseg.atomic import TMP_PREFIX
from autoseg.demo import make_synthetic_dataset
from autoseg.preprocessing.storage import read_case_arrays

AUTOSEG = [sys.executable, "-m", "autoseg"]
#: one thread per process: two trials run at a time on two cores, and OpenMP threads that outnumber the cores
#: spin (measured: 26 s per training trial with 2 threads each, against ~11 s for a run alone); the references
#: use the same setting, so float results compare bitwise
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TRAIN = ["--epochs", "2", "--iterations-per-epoch", "3", "-j", "0", "--device", "cpu", "--no-progress"]


@dataclass
class Row:
    fault: str
    runs: int = 0
    recovered: int = 0
    identical: int = 0
    clear: int = 0
    seconds: float = 0.0


@dataclass
class Outcome:
    code: int
    stderr: str
    seconds: float


def run(args: list[str], limit: int | None = None, kill_after: float | None = None) -> Outcome:
    """Run ``autoseg ARGS`` in its own process group; with ``limit``, under that file-size limit; with
    ``kill_after``, SIGKILL the whole group after that many seconds (code -9 if it was still running)."""
    def set_limit() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    t0 = time.perf_counter()
    # stderr through a pipe: a file would be under the same size limit and cut the error message short
    proc = subprocess.Popen(AUTOSEG + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=set_limit, env=ENV)
    try:
        err = proc.communicate(timeout=kill_after)[1]
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        err = proc.communicate()[1]
        code = -9
    return Outcome(code, err, time.perf_counter() - t0)


def clear(stderr: str) -> bool:
    """One ``error:`` line, nothing that looks like a traceback (library warnings on stderr are allowed)."""
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    return len(errors) == 1 and "Traceback" not in stderr


def leftovers(*folders: Path) -> list[str]:
    return [str(p) for f in folders if f.exists() for p in f.rglob("*")
            if p.name.startswith(TMP_PREFIX) or p.name.endswith(".lock")]


# --- what "identical" means per command -------------------------------------------------------------------
def same_preprocessed(a: Path, b: Path) -> bool:
    fa, fb = a / "preprocessed", b / "preprocessed"
    names = sorted(p.name for p in fa.iterdir())
    if names != sorted(p.name for p in fb.iterdir()):
        return False
    for p in fa.glob("*.json"):
        cid = p.name[:-5]
        if p.read_bytes() != (fb / p.name).read_bytes():
            return False
        if not all(np.array_equal(x[:], y[:]) for x, y in zip(read_case_arrays(fa, cid), read_case_arrays(fb, cid))):
            return False
    return all((fa / n).read_bytes() == (fb / n).read_bytes() for n in names if not n.endswith(".b2nd"))


def same_training(a: Path, b: Path) -> bool:
    x = torch.load(a / "fold_0" / "checkpoint_final.pt", weights_only=True)["network"]
    y = torch.load(b / "fold_0" / "checkpoint_final.pt", weights_only=True)["network"]
    metrics = [json.loads((r / "fold_0" / "validation" / "metrics.json").read_text()) for r in (a, b)]
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) and metrics[0] == metrics[1]


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names if (a / n).is_file())


# --- the jobs ---------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One command: how to get a fresh starting point, its arguments, where it writes, and the check."""

    name: str
    fresh: Callable[[Path], None]
    args: Callable[[Path], list[str]]
    output: Callable[[Path], Path]
    same: Callable[[Path, Path], bool]
    #: the reference folder holding what the command writes (its smallest file sets the disk-full limit)
    result: Path


def build(root: Path) -> dict[str, Path]:
    """The generated dataset and every stage's finished state, from uninterrupted runs."""
    data = make_synthetic_dataset(root / "data", n_cases=6, shape=(20, 24, 22), spacing_xyz=(1.0, 1.0, 1.5))
    planned = root / "planned"
    for cmd in (["plan", str(data), "-o", str(planned), "--device", "cpu", "--folds", "3", "--no-progress"],):
        assert run(cmd).code == 0
    preprocessed = root / "preprocessed"
    shutil.copytree(planned, preprocessed)
    assert run(["preprocess", str(preprocessed), "--no-progress"]).code == 0
    trained = root / "trained"
    shutil.copytree(preprocessed, trained)
    assert run(["train", "0", "--run", str(trained), *TRAIN]).code == 0
    scans = root / "scans"
    shutil.copytree(data / "imagesTr", scans)
    preds = {}
    for name, extra in (("pred_a", ["--folds", "0"]), ("pred_b", ["--folds", "0", "--no-tta"])):
        preds[name] = root / name
        assert run(["predict", "-i", str(scans), "-o", str(preds[name]), "--run", str(trained), "--no-progress",
                    "--save-probabilities", *extra]).code == 0
    ens = root / "ensembled"
    assert run(["ensemble", str(preds["pred_a"]), str(preds["pred_b"]), "-o", str(ens), "--no-progress"]).code == 0
    return {"data": data, "planned": planned, "preprocessed": preprocessed, "trained": trained, "scans": scans,
            **preds, "ensembled": ens}


def jobs(ref: dict[str, Path]) -> list[Job]:
    def copy_of(key: str) -> Callable[[Path], None]:
        return lambda w: shutil.copytree(ref[key], w / "run")

    def nothing(_: Path) -> None:
        return None

    return [
        Job("preprocess", copy_of("planned"), lambda w: ["preprocess", str(w / "run"), "--no-progress"],
            lambda w: w / "run", lambda w: same_preprocessed(w / "run", ref["preprocessed"]),
            ref["preprocessed"] / "preprocessed"),
        Job("train", copy_of("preprocessed"), lambda w: ["train", "0", "--run", str(w / "run"), *TRAIN],
            lambda w: w / "run", lambda w: same_training(w / "run", ref["trained"]), ref["trained"] / "fold_0"),
        Job("predict", nothing, lambda w: ["predict", "-i", str(ref["scans"]), "-o", str(w / "out"), "--run",
                                           str(ref["trained"]), "--folds", "0", "--save-probabilities",
                                           "--no-progress"],
            lambda w: w / "out", lambda w: same_files(w / "out", ref["pred_a"]), ref["pred_a"]),
        Job("ensemble", nothing, lambda w: ["ensemble", str(ref["pred_a"]), str(ref["pred_b"]), "-o", str(w / "out"),
                                            "--no-progress"],
            lambda w: w / "out", lambda w: same_files(w / "out", ref["ensembled"]), ref["ensembled"]),
    ]


def kills(job: Job, work: Path, n: int, rng: random.Random) -> Row:
    """SIGKILL at ``n`` random moments of the uninterrupted duration, then rerun to the end; two trials at a
    time (each in its own folder), since most of a trial is interpreter start-up on one core."""
    probe = work / f"{job.name}_probe"
    probe.mkdir()
    job.fresh(probe)
    duration = run(job.args(probe)).seconds
    moments = [rng.uniform(0, duration) for _ in range(n)]

    def trial(i: int) -> tuple[bool, bool, bool]:
        w = work / f"{job.name}_{i}"
        w.mkdir()
        job.fresh(w)
        killed = run(job.args(w), kill_after=moments[i])
        again = run(job.args(w))
        result = (again.code == 0, again.code == 0 and job.same(w) and not leftovers(job.output(w)),
                  killed.code in (0, -9) and "Traceback" not in again.stderr)
        shutil.rmtree(w)
        return result

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(trial, range(n)))
    return Row(f"{job.name}: kill -9 at a random moment", n, *(sum(r[k] for r in results) for k in range(3)))


def disk_full(job: Job, work: Path) -> Row:
    """The command under a file-size limit too small for any of its outputs, then again without it. The limit
    is half the smallest file the command wrote in the reference run (at most 1000 bytes): the first output it
    writes, whichever it is, meets a full disk (a nearly empty label map compresses to a few hundred bytes)."""
    row = Row(f"{job.name}: disk full (RLIMIT_FSIZE)")
    w = work / f"{job.name}_full"
    w.mkdir()
    job.fresh(w)
    sizes = [p.stat().st_size for p in job.result.rglob("*") if p.is_file() and p.stat().st_size]
    full = run(job.args(w), limit=min([1000] + [s // 2 for s in sizes]))
    again = run(job.args(w))
    row.runs = 1
    row.recovered = int(again.code == 0)
    row.identical = int(again.code == 0 and job.same(w) and not leftovers(job.output(w)))
    row.clear = int(full.code == 1 and clear(full.stderr) and "could not be written" in full.stderr)
    if not row.clear:
        print(f"{job.name} under a file-size limit: exit {full.code}\n{full.stderr[-1500:]}")
    shutil.rmtree(w)
    return row


def checkpoint_faults(ref: dict[str, Path], work: Path) -> list[Row]:
    """A truncated and a pickled ``checkpoint_latest.pt`` in a fold being trained."""
    rows = []
    for what in ("truncated", "pickled object"):
        row = Row(f"train: {what} checkpoint_latest.pt", runs=1)
        w = work / "ckpt"
        shutil.copytree(ref["trained"], w)
        fold = w / "fold_0"
        latest, marker = fold / "checkpoint_latest.pt", work / "executed"
        if what == "truncated":
            latest.write_bytes((fold / "checkpoint_final.pt").read_bytes()[:5000])
        else:
            subprocess.run([sys.executable, "-c", "import torch, pathlib, sys\nclass E:\n    def __reduce__(self): "
                            "return (pathlib.Path.touch, (pathlib.Path(sys.argv[2]),))\n"
                            "torch.save({'network': {}, 'state': {}, 'x': E()}, sys.argv[1])", str(latest),
                            str(marker)], check=True)
        (fold / "checkpoint_final.pt").unlink()
        out = run(["train", "0", "--run", str(w), *TRAIN])
        advice = "delete it, or train with --restart" in out.stderr
        row.clear = int(out.code == 1 and clear(out.stderr) and str(latest) in out.stderr
                        and advice == (what == "truncated") and not marker.exists())
        if what == "truncated":
            latest.unlink()  # as the message says
        else:
            latest.rename(work / "quarantined.pt")
        again = run(["train", "0", "--run", str(w), *TRAIN])
        row.recovered = int(again.code == 0)
        row.identical = int(again.code == 0 and same_training(w, ref["trained"]) and not leftovers(w))
        rows.append(row)
        shutil.rmtree(w)
    return rows


def plan_edited(ref: dict[str, Path], work: Path) -> Row:
    """A hand edit that gives a field the wrong type: every command that reads the plan refuses in one line."""
    row = Row("plan edited with a wrong type")
    w = work / "edited"
    shutil.copytree(ref["preprocessed"], w)
    plans = json.loads((w / "plans.json").read_text())
    good = (w / "plans.json").read_text()
    plans["stages"][0]["batch_size"] = "two"
    (w / "plans.json").write_text(json.dumps(plans))
    for args in (["preprocess", str(w), "--no-progress"], ["train", "0", "--run", str(w), *TRAIN]):
        out = run(args)
        row.runs += 1
        row.clear += out.code == 1 and clear(out.stderr) and "batch_size" in out.stderr
        if not (out.code == 1 and clear(out.stderr)):
            print(f"edited plan, {args[0]}: exit {out.code}\n{out.stderr[-1500:]}")
    (w / "plans.json").write_text(good)
    again = run(["train", "0", "--run", str(w), *TRAIN])
    row.recovered = row.runs if again.code == 0 else 0
    row.identical = row.runs if again.code == 0 and same_training(w, ref["trained"]) else 0
    shutil.rmtree(w)
    return row


def case_deleted(ref: dict[str, Path], work: Path) -> Row:
    """Every preprocessed image deleted after the first epoch (in this process, through the trainer), then
    ``autoseg preprocess`` and the same training command."""
    from autoseg.cli import main
    from autoseg.training.trainer import Trainer

    row = Row("preprocessed cases deleted between epochs", runs=1)
    w = work / "deleted"
    shutil.copytree(ref["preprocessed"], w)
    end_epoch = Trainer._end_epoch

    def delete_after(self: Trainer, *args: object) -> str | None:
        reason = end_epoch(self, *args)  # type: ignore[arg-type]
        for f in self.folder.glob("*_data.b2nd"):
            f.unlink()
        return reason

    Trainer._end_epoch = delete_after  # type: ignore[method-assign]
    err = tempfile.TemporaryFile("w+")
    real_stderr, sys.stderr = sys.stderr, err  # type: ignore[assignment]
    try:
        code = main(["train", "0", "--run", str(w), *TRAIN])
    finally:
        sys.stderr = real_stderr
        Trainer._end_epoch = end_epoch  # type: ignore[method-assign]
    err.seek(0)
    text = err.read()
    row.clear = int(code == 1 and clear(text) and "checkpoint_latest.pt written" in text)
    ok = run(["preprocess", str(w), "--no-progress"]).code == 0
    ok = ok and run(["train", "0", "--run", str(w), *TRAIN]).code == 0
    row.recovered = int(ok)
    row.identical = int(ok and same_training(w, ref["trained"]) and not leftovers(w))
    shutil.rmtree(w)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one, deleted)")
    ap.add_argument("--kills", type=int, default=20, help="random kill moments per command (default 20)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random kill moments (default 0)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as the commands it starts (ENV): the in-process training compares with them
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        ref = build(root / "reference")
        work = root / "work"
        work.mkdir()
        rng = random.Random(args.seed)
        rows: list[Row] = []
        t_built = time.perf_counter()
        steps: list[Callable[[], list[Row]]] = []
        for job in jobs(ref):
            steps += [lambda job=job: [kills(job, work, args.kills, rng)], lambda job=job: [disk_full(job, work)]]
        steps += [lambda: checkpoint_faults(ref, work), lambda: [plan_edited(ref, work)],
                  lambda: [case_deleted(ref, work)]]
        for step in steps:
            t = time.perf_counter()
            new = step()
            for r in new:
                r.seconds = (time.perf_counter() - t) / len(new)
            rows += new
    print(f"\n{'fault':<46} {'runs':>5} {'recovered':>10} {'identical':>10} {'clear':>6} {'seconds':>8}")
    for r in rows:
        print(f"{r.fault:<46} {r.runs:>5} {r.recovered:>10} {r.identical:>10} {r.clear:>6} {r.seconds:>8.0f}")
    print(f"(reference runs: {t_built - t0:.0f} s)")
    total = sum(r.runs for r in rows)
    bad = [r.fault for r in rows if not (r.recovered == r.identical == r.clear == r.runs)]
    print(f"\n{total} faulted runs in {time.perf_counter() - t0:.0f} s; "
          + ("all recovered with identical outputs and clear messages" if not bad else f"NOT CLEAN: {bad}"))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
