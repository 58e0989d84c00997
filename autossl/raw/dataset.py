"""A raw dataset in nnU-Net v2's format, plus ``imagesTrUnlabeled/``.

``RawDataset(folder)`` reads and checks ``dataset.json`` and lists cases:
``labeled``   {case: {"images": [ch0, ch1, ...], "label": path}}  (imagesTr + labelsTr)
``unlabeled`` {case: {"images": [...]}}                           (imagesTrUnlabeled)
``test``      {case: {"images": [...]}}                           (imagesTs, never used for training)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from autossl.imageio.channel_files import assign_channel_files, group_case_files
from autossl.imageio.registry import reader_writer_class
from autossl.utilities.file_io import load_json


class DatasetError(ValueError):
    """A problem with a raw dataset; the message names the file and what is wrong."""


def validate_dataset_json(dj: dict, where: str) -> list[str]:
    problems = []
    for key in ("channel_names", "labels", "numTraining", "file_ending"):
        if key not in dj:
            alt = {"channel_names": "modality"}.get(key)
            hint = f" (found the old key '{alt}'; rename it)" if alt and alt in dj else ""
            problems.append(f"{where}: missing required key '{key}'{hint}")
    if problems:
        return problems
    if not isinstance(dj["channel_names"], dict) or not dj["channel_names"]:
        problems.append(f"{where}: 'channel_names' must be a non-empty mapping like {{\"0\": \"CT\"}}")
    labels = dj["labels"]
    if not isinstance(labels, dict) or "background" not in labels:
        problems.append(f"{where}: 'labels' must map names to integers and contain 'background': 0")
        return problems
    int_values = []
    for name, v in labels.items():
        if isinstance(v, (list, tuple)):
            if "regions_class_order" not in dj:
                problems.append(f"{where}: label '{name}' is a region but 'regions_class_order' is missing")
            int_values.extend(int(x) for x in v)
        elif isinstance(v, int):
            int_values.append(v)
        else:
            problems.append(f"{where}: label '{name}' has value {v!r}; expected an integer or a list of integers")
    if labels.get("background") != 0:
        problems.append(f"{where}: 'background' must be 0")
    if "ignore" in labels:
        ign = labels["ignore"]
        others = [v for k, v in labels.items() if k != "ignore" and isinstance(v, int)]
        if not isinstance(ign, int) or (others and ign <= max(others)):
            problems.append(f"{where}: the 'ignore' label must be the highest integer label")
    if not any(isinstance(v, (list, tuple)) for v in labels.values()):
        plain = sorted(v for k, v in labels.items() if k != "ignore" and isinstance(v, int))
        if plain != list(range(len(plain))):
            problems.append(f"{where}: labels must be consecutive integers starting at 0, found {plain}")
    if not isinstance(dj["file_ending"], str) or not dj["file_ending"].startswith("."):
        problems.append(f"{where}: 'file_ending' must be a string like '.nii.gz'")
    return problems


def label_values(dj: dict) -> list[int]:
    vals = set()
    for v in dj["labels"].values():
        if isinstance(v, (list, tuple)):
            vals.update(int(x) for x in v)
        else:
            vals.add(int(v))
    return sorted(vals)


def _expand(p: str, base: Path) -> str:
    p = os.path.expandvars(p)
    return p if os.path.isabs(p) else str(base / p)


@dataclass
class RawDataset:
    folder: Path
    dataset_json: dict = field(init=False)
    labeled: dict = field(init=False)
    unlabeled: dict = field(init=False)
    test: dict = field(init=False)

    def __post_init__(self):
        self.folder = Path(self.folder)
        dj_path = self.folder / "dataset.json"
        if not dj_path.is_file():
            raise DatasetError(f"{dj_path}: dataset.json not found")
        self.dataset_json = load_json(dj_path)
        problems = validate_dataset_json(self.dataset_json, str(dj_path))
        if problems:
            raise DatasetError("\n".join(problems))
        self.labeled, self.unlabeled, self.test = self._list_cases()

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def file_ending(self) -> str:
        return self.dataset_json["file_ending"]

    @property
    def num_channels(self) -> int:
        return len(self.dataset_json["channel_names"])

    def reader_writer(self):
        return reader_writer_class(self.file_ending, self.dataset_json.get("overwrite_image_reader_writer"))()

    def _images_in(self, folder: Path, strict: bool = True) -> dict:
        """Group ``CASE_XXXX<ending>`` files by case; check every channel is present (an RGB file
        of ``NaturalImage2DIO`` holds three, see ``autossl.imageio.channel_files``)."""
        ending = self.file_ending
        if not folder.is_dir():
            return {}
        files = [f for f in sorted(folder.iterdir()) if f.name.endswith(ending) and not f.name.startswith(".")]
        cases, unnamed = group_case_files(files, ending)
        if unnamed:
            raise DatasetError(f"{unnamed[0]}: image file names must end in _XXXX{ending} (channel ID), "
                               f"e.g. case_0000{ending}")
        out = {}
        n = self.num_channels
        rw = self.reader_writer() if strict else None
        for case, chans in cases.items():
            if strict:
                ordered, problems = assign_channel_files(case, chans, n, rw, folder, ending)
                if problems:
                    raise DatasetError(problems[0])
            else:
                ordered = [chans[c] for c in sorted(chans)]
            out[case] = {"images": ordered}
        return out

    def _list_cases(self):
        dj = self.dataset_json
        if "dataset" in dj:  # explicit listing replaces the folder scan
            labeled = {
                k: {"images": [_expand(i, self.folder) for i in v["images"]], "label": _expand(v["label"], self.folder)}
                for k, v in dj["dataset"].items()
            }
        else:
            labeled = self._images_in(self.folder / "imagesTr")
            for case, d in labeled.items():
                lab = self.folder / "labelsTr" / f"{case}{self.file_ending}"
                if not lab.is_file():
                    raise DatasetError(
                        f"{d['images'][0]}: case {case} is in imagesTr but {lab} does not exist. "
                        f"If this case has no label, move its images to imagesTrUnlabeled/."
                    )
                d["label"] = str(lab)
        unlabeled = self._images_in(self.folder / "imagesTrUnlabeled")
        clash = sorted(set(unlabeled) & set(labeled))
        if clash:
            raise DatasetError(f"{self.folder / 'imagesTrUnlabeled'}: case {clash[0]} is also a labelled case in imagesTr")
        test = self._images_in(self.folder / "imagesTs", strict=False)
        return labeled, unlabeled, test
