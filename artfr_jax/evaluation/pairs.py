"""Finding the images of a result folder and pairing them with ground truth by file stem."""

from __future__ import annotations

import collections
import dataclasses
import os

from artfr_jax.data.sources import IMAGE_EXTS


def list_image_files(folder: str, flag: str) -> tuple[list[str], list[str]]:
    """Top-level image files of ``folder`` (sorted) and the names of other top-level files.

    Not recursive, so the restore command's ``side_by_side/`` subfolder is not mixed in. Raises
    ``ValueError`` naming ``flag`` when the folder is missing or holds no image file.
    """
    if not folder:
        raise ValueError(f"{flag} is empty; set it to a folder of images")
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {folder!r} does not exist or is not a folder")
    images, other = [], []
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name.startswith(".") or not entry.is_file():
                continue
            (images if entry.name.lower().endswith(IMAGE_EXTS) else other).append(entry.name)
    if not images:
        raise ValueError(
            f"{flag} {folder!r} has no image files at its top level ({'/'.join(IMAGE_EXTS)})"
        )
    return [os.path.join(folder, n) for n in sorted(images)], sorted(other)


def stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


@dataclasses.dataclass
class Pairing:
    """Restored files matched to GT files by stem, and what could not be matched."""

    pairs: list[tuple[str, str | None]]  # (restored, gt); gt is None when no GT folder is given
    unpaired: list[str]  # restored files without a GT file of the same stem
    missing: list[str]  # GT files without a restored file
    ambiguous: list[str]  # stems held by several restored (or GT) files; left out

    def problems(self) -> list[str]:
        """One line per kind of problem, for the report."""
        lines = []
        for what, names in (
            ("restored files without GT", self.unpaired),
            ("GT files without a restored file", self.missing),
            ("stems held by several files (left out)", self.ambiguous),
        ):
            if names:
                shown = ", ".join(os.path.basename(n) for n in names[:5])
                more = f" and {len(names) - 5} more" if len(names) > 5 else ""
                lines.append(f"{len(names)} {what}: {shown}{more}")
        return lines


def pair_by_stem(restored: list[str], gt: list[str] | None) -> Pairing:
    """Pairs ``a.png`` with ``a.jpg``: the restore command keeps stems, not extensions."""

    def by_stem(paths):
        groups = collections.defaultdict(list)
        for p in paths:
            groups[stem(p)].append(p)
        return groups

    rs = by_stem(restored)
    ambiguous = sorted(s for s, ps in rs.items() if len(ps) > 1)
    if gt is None:
        pairs = [(ps[0], None) for s, ps in sorted(rs.items()) if len(ps) == 1]
        return Pairing(pairs=pairs, unpaired=[], missing=[], ambiguous=ambiguous)
    gs = by_stem(gt)
    ambiguous = sorted(set(ambiguous) | {s for s, ps in gs.items() if len(ps) > 1})
    pairs, unpaired = [], []
    for s, ps in sorted(rs.items()):
        if s in ambiguous:
            continue
        if s in gs:
            pairs.append((ps[0], gs[s][0]))
        else:
            unpaired.append(ps[0])
    missing = [ps[0] for s, ps in sorted(gs.items()) if s not in rs and s not in ambiguous]
    return Pairing(pairs=pairs, unpaired=unpaired, missing=missing, ambiguous=ambiguous)
