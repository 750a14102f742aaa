"""The tissue registry: which tissues exist, at which scale each is segmented.

Everything that depends on the set of tissues (number of heads, one-hot codes, patch scales,
label values, colours) reads it from a :class:`TissueTable` loaded from ``config/tissues.tsv``;
nothing else in the package hard-codes the six tissues of the paper or their scales.

Label values in every label map are ``id + 1`` (0 is background).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

#: The default registry (the paper's six tissues), shipped with the package; config/tissues.tsv
#: is the workflow's copy of it.
DEFAULT_TISSUES = Path(__file__).with_name("tissues.tsv")

#: Pixel size of the 40x source images (ROIs and slides), micrometres per pixel.
SOURCE_UM_PER_PX = 0.25

COLUMNS = ("id", "key", "name", "scale", "um_per_px", "release_folder", "mask_suffix", "color")
_KEY_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_COLOR_RE = re.compile(r"^#[0-9a-fA-F]{6}$")


@dataclass(frozen=True)
class Tissue:
    """One row of the registry.

    Attributes:
        id: 0-based index; the tissue's one-hot position and ``label value - 1``.
        key: short lower-case name used in file names and config (``"tuft"``).
        name: human-readable name.
        scale: magnification label (``"5x"``), informational.
        um_per_px: pixel size at which this tissue is segmented.
        release_folder: folder name in the public release layout (``"3_0_tuft"``).
        mask_suffix: mask file suffix in that layout (``"tuft"``).
        color: display colour, ``#rrggbb``.
    """

    id: int
    key: str
    name: str
    scale: str
    um_per_px: float
    release_folder: str
    mask_suffix: str
    color: str

    @property
    def label(self) -> int:
        """Value of this tissue in aggregated label maps."""
        return self.id + 1

    def downsample(self, source_um_per_px: float = SOURCE_UM_PER_PX) -> float:
        """Factor from the source resolution to this tissue's scale (4.0 for 40x -> 10x)."""
        return self.um_per_px / source_um_per_px

    @property
    def rgb(self) -> tuple[int, int, int]:
        return tuple(int(self.color[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


class TissueTable:
    """An ordered, validated set of tissues (ids 0..n-1 in order)."""

    def __init__(self, tissues: list[Tissue]):
        _validate(tissues, source="<table>")
        self._tissues = list(tissues)
        self._by_key = {t.key: t for t in tissues}

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_tsv(cls, path: str | Path) -> TissueTable:
        """Load and validate ``config/tissues.tsv``.

        Raises:
            ValueError: naming the file and every problem found.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tissue table {path} does not exist")
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"tissue table {path}: missing column(s) {', '.join(missing)}")
            rows = list(reader)
        tissues, problems = [], []
        for n, row in enumerate(rows, start=2):
            try:
                tissues.append(
                    Tissue(
                        id=int(row["id"]),
                        key=row["key"].strip(),
                        name=row["name"].strip(),
                        scale=row["scale"].strip(),
                        um_per_px=float(row["um_per_px"]),
                        release_folder=row["release_folder"].strip(),
                        mask_suffix=row["mask_suffix"].strip(),
                        color=row["color"].strip(),
                    )
                )
            except (TypeError, ValueError) as exc:
                problems.append(f"line {n}: {exc}")
        if problems:
            raise ValueError(f"tissue table {path}: " + "; ".join(problems))
        _validate(tissues, source=str(path))
        return cls(tissues)

    @classmethod
    def from_records(cls, records: list[dict]) -> TissueTable:
        """Rebuild from :meth:`to_records` (as stored in checkpoints and HDF5 attributes)."""
        return cls([Tissue(**{c: r[c] for c in COLUMNS}) for r in records])

    def to_records(self) -> list[dict]:
        return [asdict(t) for t in self._tissues]

    def to_json(self) -> str:
        return json.dumps(self.to_records(), sort_keys=True)

    def fingerprint(self) -> str:
        """Short hash of what a trained model depends on: ids, keys and scales."""
        core = [(t.id, t.key, t.um_per_px) for t in self._tissues]
        return hashlib.sha1(json.dumps(core).encode()).hexdigest()[:12]

    # -- access -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._tissues)

    def __iter__(self):
        return iter(self._tissues)

    def __getitem__(self, key: str | int) -> Tissue:
        if isinstance(key, int):
            return self._tissues[key]
        try:
            return self._by_key[key]
        except KeyError:
            raise KeyError(f"unknown tissue {key!r}; known: {', '.join(self.keys)}") from None

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TissueTable) and self._tissues == other._tissues

    def __repr__(self) -> str:
        return f"TissueTable({', '.join(self.keys)})"

    @property
    def keys(self) -> list[str]:
        return [t.key for t in self._tissues]

    @property
    def scales(self) -> list[float]:
        """Distinct pixel sizes (um/px), finest first."""
        return sorted({t.um_per_px for t in self._tissues})

    def at_scale(self, um_per_px: float) -> list[Tissue]:
        """Tissues segmented at this pixel size."""
        return [t for t in self._tissues if abs(t.um_per_px - um_per_px) < 1e-9]

    def by_release_folder(self, folder: str) -> Tissue:
        for t in self._tissues:
            if t.release_folder == folder:
                return t
        raise KeyError(f"no tissue has release folder {folder!r}")

    def label_table(self) -> dict[int, str]:
        """Label value -> tissue key, 0 = background (stored in every label file)."""
        return {0: "background", **{t.label: t.key for t in self._tissues}}


def _validate(tissues: list[Tissue], source: str) -> None:
    problems = []
    if not tissues:
        problems.append("no tissues")
    ids = [t.id for t in tissues]
    if ids != list(range(len(tissues))):
        problems.append(f"ids must be 0..{len(tissues) - 1} in order, got {ids}")
    keys = [t.key for t in tissues]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        problems.append(f"duplicate key(s) {', '.join(dup)}")
    for t in tissues:
        if not _KEY_RE.match(t.key):
            problems.append(f"key {t.key!r} must be lower-case letters, digits, '_'")
        if not t.um_per_px > 0:
            problems.append(f"{t.key}: um_per_px must be > 0, got {t.um_per_px}")
        if not _COLOR_RE.match(t.color):
            problems.append(f"{t.key}: color must be #rrggbb, got {t.color!r}")
    if len(tissues) > 254:
        problems.append("at most 254 tissues fit a uint8 label map")
    if problems:
        raise ValueError(f"tissue table {source}: " + "; ".join(problems))


def load_tissues(path: str | Path | None = None) -> TissueTable:
    """Shorthand for :meth:`TissueTable.from_tsv`; ``None`` loads :data:`DEFAULT_TISSUES`."""
    return TissueTable.from_tsv(DEFAULT_TISSUES if path is None else path)


def as_tissue_table(tissues: TissueTable | str | Path) -> TissueTable:
    """A :class:`TissueTable` as it is, or the table loaded from a TSV path."""
    return tissues if isinstance(tissues, TissueTable) else load_tissues(tissues)


def file_digest(path: str | Path) -> str:
    """Short SHA-1 of a file's bytes (what a rule's output depends on, not the file's name)."""
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()[:12]
