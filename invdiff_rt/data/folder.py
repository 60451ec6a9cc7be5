"""The dataset folder format: Hugging Face `imagefolder` splits (`train/`, `test/`) with PNGs and `metadata.jsonl`.

Each metadata line holds `file_name`, `text` (the caption / prompt) and any extra attribute columns
(e.g. `color`, `background`). Training reads images and `text`; evaluation reads one attribute column.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..artifacts import fingerprint_files
from ..errors import InvdiffError

METADATA = "metadata.jsonl"
REQUIRED = ("file_name", "text")


@dataclass(frozen=True)
class Record:
    """One image of a split: its path, caption, extra columns and the metadata line it came from (1-based)."""

    file: Path
    text: str
    attrs: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)
    line: int = 0


def split_dir(root: str | Path, split: str) -> Path:
    return Path(root) / split


def split_exists(root: str | Path, split: str) -> bool:
    return (split_dir(root, split) / METADATA).is_file()


def _parse_line(meta: Path, number: int, raw: str) -> dict[str, Any]:
    try:
        row = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InvdiffError(f"{meta}:{number}: not valid JSON ({e.msg}); fix or delete the line") from e
    if not isinstance(row, dict):
        raise InvdiffError(f"{meta}:{number}: expected a JSON object; every line needs file_name and text")
    for key in REQUIRED:
        if key not in row:
            raise InvdiffError(f'{meta}:{number}: missing "{key}"; every line needs file_name and text')
        if not isinstance(row[key], str) or (key == "file_name" and not row[key]):
            raise InvdiffError(f'{meta}:{number}: "{key}" must be a non-empty string; fix the line')
    return row


def _to_record(split: Path, meta: Path, number: int, row: dict[str, Any]) -> Record:
    file = split / row["file_name"]
    if Path(row["file_name"]).is_absolute() or ".." in Path(row["file_name"]).parts:
        raise InvdiffError(f'{meta}:{number}: "file_name" must be a path inside {split}; fix the line')
    if not file.is_file():
        raise InvdiffError(f"{meta}:{number}: image {file} not found; add the file or delete the line")
    attrs = {k: v for k, v in row.items() if k not in REQUIRED}
    return Record(file=file, text=row["text"], attrs=attrs, line=number)


def read_split(root: str | Path, split: str = "train") -> list[Record]:
    """Read and validate `root/split/metadata.jsonl`: every line parses, has file_name and text, and its image exists."""
    folder = split_dir(root, split)
    meta = folder / METADATA
    if not meta.is_file():
        raise InvdiffError(f"{meta}: not found; a dataset folder needs {split}/{METADATA} (make one: invdiff data make)")
    try:
        lines = meta.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InvdiffError(f"{meta}: unreadable ({e}); regenerate the dataset") from e
    records = [_to_record(folder, meta, i, _parse_line(meta, i, raw)) for i, raw in enumerate(lines, 1) if raw.strip()]
    if not records:
        raise InvdiffError(f"{meta}: no records; add one JSON line per image")
    return records


def _open_rgb(record: Record, size: int | None):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(record.file) as im:
            im = im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise InvdiffError(f"{record.file}: unreadable image ({type(e).__name__}); replace or delete it "
                           f"(metadata line {record.line})") from e
    if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    return im


def load_images(records: Sequence[Record], size: int | None = None):
    """Load records as float32 `[N,3,H,W]` in `[-1, 1]` (RGB; bilinear resize only if `size` is given and differs)."""
    import numpy as np
    import torch

    if not records:
        raise InvdiffError("load_images: no records given; read a non-empty split first")
    arrays = [np.asarray(_open_rgb(r, size), dtype=np.uint8) for r in records]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise InvdiffError(f"{records[0].file.parent}: images have different sizes {sorted(shapes)}; pass size=")
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return (batch / 127.5 - 1.0).contiguous()


def data_fingerprint(root: str | Path, split: str = "train") -> str:
    """sha256 over the split's metadata and the bytes of every image it lists."""
    records = read_split(root, split)
    folder = split_dir(root, split)
    files = {folder / METADATA} | {r.file for r in records}
    return fingerprint_files(folder, [f.relative_to(folder) for f in files])


def prompts_of(records: Sequence[Record]) -> list[str]:
    """Sorted unique captions."""
    return sorted({r.text for r in records})


def _metadata_of(record: Record) -> Path:
    """The metadata.jsonl a record came from (the nearest one above its image)."""
    for parent in record.file.parents:
        if (parent / METADATA).is_file():
            return parent / METADATA
    return record.file.parent / METADATA


def attribute_values(records: Sequence[Record], column: str) -> list:
    """Sorted unique values of one attribute column; every record must have it."""
    for r in records:
        if column not in r.attrs:
            meta = _metadata_of(r)
            have = ", ".join(sorted(r.attrs)) or "none"
            raise InvdiffError(f'{meta}:{r.line}: missing column "{column}" (columns: {have}); pick another --attribute')
    return sorted({r.attrs[column] for r in records}, key=lambda v: (str(type(v)), v))


def attribute_of(records: Sequence[Record], column: str) -> list:
    """The attribute column, one value per record (validated like `attribute_values`)."""
    attribute_values(records, column)
    return [r.attrs[column] for r in records]
