"""Which image files hold which channels of a case (nnU-Net v2's ``CASE_XXXX<ending>`` naming).

A file ``CASE_XXXX<ending>`` holds the channels from ``XXXX`` on: one channel for every reader
except ``NaturalImage2DIO``, whose files may be RGB(A) (or grey + alpha) and then hold 3 (4, 2)
channels. nnU-Net's own convention for RGB is exactly that: one ``case_0000.png`` per case and
``channel_names`` ``{"0": "R", "1": "G", "2": "B"}`` (its ``NaturalImage2DIO.read_images``
stacks the colour channels; ``create_lists_from_splitted_dataset_folder`` groups the files by
case). Grey images split one channel per file (``case_0000.png``, ``case_0001.png``, ...) keep
working, and so does a mix (an RGB ``case_0000.png`` and a grey ``case_0003.png`` for four
channels).

``assign_channel_files`` checks one case: every channel that dataset.json lists is in exactly
one file, none is beyond the list; each problem is a line that starts with the file it is about.
nnU-Net only sorts the files and compares the number of channels it read with dataset.json;
the naming rule here says the same for every dataset nnU-Net documents and additionally names
the missing or doubled channel.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from autossl.imageio.base import ImageReadError

CHANNEL_RE = re.compile(r"_(\d{4})$")


def split_channel_id(file_name: str, file_ending: str) -> tuple[str, int] | None:
    """``("case", 3)`` for ``case_0003<ending>``; None when the name has no channel ID."""
    stem = file_name[: -len(file_ending)] if file_name.endswith(file_ending) else file_name
    m = CHANNEL_RE.search(stem)
    return (stem[: m.start()], int(m.group(1))) if m else None


def _describe(n: int) -> str:
    return {1: "1 channel", 2: "2 channels (grey + alpha)", 3: "3 channels (RGB)",
            4: "4 channels (RGBA)"}.get(n, f"{n} channels")


def assign_channel_files(case: str, files_by_id: dict[int, str], n_channels: int, reader, folder: str | Path,
                         file_ending: str, expected: str | None = None) -> tuple[list[str] | None, list[str]]:
    """The files of ``case`` in channel order and the problems found (lines naming a file).

    ``files_by_id`` maps each file's 4-digit ID to its path; ``reader`` is the dataset's
    reader/writer instance (its ``channels_in_file`` says how many channels a file holds);
    ``expected`` is how the messages name the source of ``n_channels`` (default: dataset.json).
    The file list is None when there are problems."""
    expected = expected or f"dataset.json lists {n_channels} channel(s)"
    folder = Path(folder)
    problems: list[str] = []
    holder: dict[int, tuple[str, int, int]] = {}  # channel -> (file, its first channel, its channel count)
    nxt = 0
    several = bool(getattr(reader, "files_may_hold_several_channels", False))
    for cid, f in sorted(files_by_id.items()):
        try:
            k = int(reader.channels_in_file(f)) if several else 1
        except ImageReadError as e:
            problems.append(str(e))
            continue
        if cid < nxt:
            first, owner = holder[cid][1], holder[cid][0]
            problems.append(f"{f}: channel {cid} of case {case} is already in {owner}, which holds "
                            f"{_describe(holder[cid][2])} (channels {first}-{first + holder[cid][2] - 1}); "
                            f"a file CASE_XXXX{file_ending} holds the channels from XXXX on")
            continue
        for c in range(nxt, min(cid, n_channels)):
            problems.append(_missing(folder, case, c, file_ending, expected, holder, several))
        for c in range(cid, cid + k):
            holder[c] = (f, cid, k)
        extra = [c for c in range(cid, cid + k) if c >= n_channels]
        if extra:
            what = f"channel {extra[0]}" if len(extra) == 1 else f"channels {extra[0]}-{extra[-1]}"
            held = "" if k == 1 else f" (the file holds {_describe(k)} from channel {cid} on)"
            problems.append(f"{f}: {what} of case {case} not listed in dataset.json 'channel_names' "
                            f"({n_channels} channel(s)){held}")
        nxt = max(nxt, cid + k)
    for c in range(nxt, n_channels):
        problems.append(_missing(folder, case, c, file_ending, expected, holder, several))
    if problems:
        return None, problems
    return [f for _, f in sorted(files_by_id.items())], []


def _missing(folder: Path, case: str, c: int, file_ending: str, expected: str, holder: dict,
             several: bool) -> str:
    line = f"{folder / f'{case}_{c:04d}{file_ending}'}: channel {c} of case {case} is missing ({expected}"
    held = {v[0]: v[2] for v in holder.values()}
    if several and held:  # say what the files that are there hold (e.g. a grey PNG where RGB was meant)
        line += "; " + ", ".join(f"{Path(f).name} holds {_describe(n)}" for f, n in held.items())
    return line + ")"


def group_case_files(files: Sequence[Path], file_ending: str) -> tuple[dict[str, dict[int, str]], list[Path]]:
    """``{case: {id: path}}`` of the files that end in ``file_ending``, and those without an ID."""
    cases: dict[str, dict[int, str]] = {}
    unnamed: list[Path] = []
    for f in files:
        parsed = split_channel_id(f.name, file_ending)
        if parsed is None:
            unnamed.append(f)
            continue
        cases.setdefault(parsed[0], {})[parsed[1]] = str(f)
    return cases, unnamed
