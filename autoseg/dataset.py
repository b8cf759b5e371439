"""Find the cases of a dataset folder in MSD or nnU-Net v2 layout and read its dataset.json.

MSD: ``imagesTr/<case><ending>`` (multi-channel images as one 4D file) + ``labelsTr/<case><ending>``,
cases listed under ``training`` in dataset.json. nnU-Net v2: ``imagesTr/<case>_0000<ending>``,
``_0001`` ... one file per channel + ``labelsTr/<case><ending>``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from autoseg.io import IMAGE_SUFFIXES, strip_suffix

__all__ = ["CaseFiles", "DatasetSpec", "DatasetError", "load_dataset", "files_stamp"]


class DatasetError(Exception):
    """The dataset folder cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class CaseFiles:
    """The files of one training case. ``images`` has one file per channel (nnU-Net) or one 4D file (MSD)."""

    case_id: str
    images: tuple[Path, ...]
    label: Path


@dataclass
class DatasetSpec:
    """What dataset.json and the folder say about a dataset.

    Attributes:
        name: dataset name (dataset.json ``name``, else the folder name).
        root: the dataset folder.
        layout: ``"msd"`` or ``"nnunet"``.
        channel_names: one name per input channel, e.g. ``["CT"]`` or ``["T2", "ADC"]``.
        labels: label value -> class name, 0 is background.
        file_ending: e.g. ``".nii.gz"``.
        cases: the training cases, sorted by id.
        problems: problems found while listing files (missing files, images without labels).
    """

    name: str
    root: Path
    layout: str
    channel_names: list[str]
    labels: dict[int, str]
    file_ending: str
    cases: list[CaseFiles]
    problems: list[str] = field(default_factory=list)


def files_stamp(paths: tuple[Path, ...] | list[Path]) -> str:
    """``name:size:mtime;`` for each file (``-1`` for a missing one): changes whenever a file is rewritten,
    without reading it. Used to decide whether cached results (fingerprint, preprocessed cases) are stale."""
    parts = []
    for p in paths:
        try:
            st = p.stat()
            parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns};")
        except OSError:
            parts.append(f"{p.name}:-1:-1;")
    return "".join(parts)


def _parse_labels(raw: object, where: str) -> dict[int, str]:
    """Accept ``{"background": 0, ...}`` (nnU-Net v2) or ``{"0": "background", ...}`` (MSD)."""
    if not isinstance(raw, dict) or not raw:
        raise DatasetError([f"{where}: 'labels' must be a non-empty mapping, got {raw!r}"])
    labels: dict[int, str] = {}
    for k, v in raw.items():
        if isinstance(v, bool):
            raise DatasetError([f"{where}: label {k!r} has value {v!r}; expected an integer or a name"])
        if isinstance(v, int):
            if v < 0:
                raise DatasetError([f"{where}: label {k!r} has value {v}; label values must be 0 or more"])
            labels[v] = str(k)
        elif isinstance(v, str) and re.fullmatch(r"\d+", str(k)):
            labels[int(k)] = v
        elif isinstance(v, list):
            raise DatasetError([f"{where}: label {k!r} is a region {v}; region-based labels are not supported yet"])
        else:
            raise DatasetError([f"{where}: cannot read label entry {k!r}: {v!r}; expected name->int or int->name"])
    if 0 not in labels:
        raise DatasetError([f"{where}: 'labels' has no background (value 0); found values {sorted(labels)}"])
    return dict(sorted(labels.items()))


def _parse_channels(meta: dict, where: str) -> list[str]:
    raw = meta.get("channel_names", meta.get("modality"))
    if not isinstance(raw, dict) or not raw:
        raise DatasetError([f"{where}: needs 'channel_names' (or MSD 'modality'), e.g. {{\"0\": \"CT\"}}"])
    if not all(isinstance(k, str) and re.fullmatch(r"0|[1-9]\d*", k) for k in raw):
        raise DatasetError([f"{where}: channel keys must be integers written without leading zeros or spaces "
                            f"(\"0\", \"1\", ...), got {sorted(raw)}"])
    keys = sorted(int(k) for k in raw)
    if keys != list(range(len(keys))):
        raise DatasetError([f"{where}: channel keys must be 0..{len(keys) - 1}, got {keys}"])
    return [str(raw[str(k)]) for k in keys]


def _visible_images(folder: Path) -> dict[str, Path]:
    """Map name-without-ending -> path for the image files in ``folder`` (hidden files ignored)."""
    if not folder.is_dir():
        return {}
    out = {}
    for p in sorted(folder.iterdir()):
        stem = strip_suffix(p.name)
        if p.is_file() and not p.name.startswith(".") and stem is not None:
            out[stem] = p
    return out


def _ending_of(meta: dict, label_files: dict[str, Path]) -> str:
    ending = meta.get("file_ending")
    if isinstance(ending, str) and ending:
        return ending
    for p in label_files.values():
        for suffix in IMAGE_SUFFIXES:
            if p.name.lower().endswith(suffix):
                return suffix
    return ".nii.gz"


def _case_from_listing(root: Path, entry: object, n_channels: int, problems: list[str]) -> CaseFiles | None:
    """A case from an MSD ``training`` entry ``{"image": "./imagesTr/x.nii.gz", "label": ...}``."""
    if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
        problems.append(f"dataset.json: training entry {entry!r} needs 'image' and 'label'")
        return None
    if not isinstance(entry["image"], str) or not isinstance(entry["label"], str):
        problems.append(f"dataset.json: training entry {entry!r}: 'image' and 'label' must be paths (strings)")
        return None
    image, label = root / entry["image"], root / entry["label"]
    stem = strip_suffix(label.name) or label.name
    if not image.exists():
        img_stem = strip_suffix(image.name) or image.name
        ending = image.name[len(img_stem):]
        split = tuple(image.with_name(f"{img_stem}_{c:04d}{ending}") for c in range(n_channels))
        if all(p.exists() for p in split):
            return CaseFiles(stem, split, label)
    return CaseFiles(stem, (image,), label)


def _same_ids(cases: list[CaseFiles]) -> list[str]:
    """One problem per case id given to more than one case (MSD's list names cases by path, so two folders can
    hold the same file name), naming their labels; every such case is dropped from ``cases``."""
    by_id: dict[str, list[CaseFiles]] = {}
    for c in cases:
        by_id.setdefault(c.case_id, []).append(c)
    twice = {cid: cs for cid, cs in by_id.items() if len(cs) > 1}
    cases[:] = [c for c in cases if c.case_id not in twice]
    return [f"case {cid}: {len(cs)} training entries have this id ({', '.join(str(c.label) for c in cs)}); "
            "case ids must be unique, rename one" for cid, cs in twice.items()]


def load_dataset(root: str | Path) -> DatasetSpec:
    """Read ``root/dataset.json`` and list the training cases.

    Missing files are not raised here but collected in ``DatasetSpec.problems`` so that verification can
    report every problem at once.

    Raises:
        DatasetError: the folder or dataset.json cannot be used at all.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError([f"{root}: dataset folder does not exist"])
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise DatasetError([f"{meta_path}: missing; a dataset needs dataset.json with 'labels' and 'channel_names'"])
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError([f"{meta_path}: not valid JSON ({e})"]) from None
    if not isinstance(meta, dict):
        raise DatasetError([f"{meta_path}: expected a JSON object at the top level"])
    labels = _parse_labels(meta.get("labels"), str(meta_path))
    channels = _parse_channels(meta, str(meta_path))
    label_files = _visible_images(root / "labelsTr")
    image_files = _visible_images(root / "imagesTr")
    ending = _ending_of(meta, label_files)
    problems: list[str] = []
    cases: list[CaseFiles] = []
    listing = meta.get("training")
    if isinstance(listing, list) and listing:
        for entry in listing:
            case = _case_from_listing(root, entry, len(channels), problems)
            if case is not None:
                cases.append(case)
    else:
        for stem, label in label_files.items():
            own = label.name[len(stem):]  # images share their label's file ending
            split = tuple(root / "imagesTr" / f"{stem}_{c:04d}{own}" for c in range(len(channels)))
            single = root / "imagesTr" / f"{stem}{own}"
            images = (single,) if single.exists() and not any(p.exists() for p in split) else split
            cases.append(CaseFiles(stem, images, label))
        used = {p.resolve() for c in cases for p in c.images}
        for stem, p in image_files.items():
            if p.resolve() not in used:
                case_id = re.sub(r"_\d{4}$", "", stem)
                problems.append(f"{p}: image has no matching label (expected labelsTr/{case_id}{ending})")
    problems += _same_ids(cases)
    if not cases:
        problems.append(f"{root}: no training cases found (looked for labelsTr/*{ending} "
                        "and the 'training' list of dataset.json)")
    num = meta.get("numTraining")
    if isinstance(num, int) and cases and num != len(cases):
        problems.append(f"{meta_path}: numTraining is {num} but {len(cases)} cases were found")
    msd = all(len(c.images) == 1 and strip_suffix(c.images[0].name) == c.case_id for c in cases)
    layout = "msd" if cases and msd else "nnunet"
    name = str(meta.get("name") or root.name)
    return DatasetSpec(name, root, layout, channels, labels, ending, sorted(cases, key=lambda c: c.case_id), problems)
