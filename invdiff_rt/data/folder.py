"""The dataset folder format: Hugging Face `imagefolder` splits (`train/`, `test/`) with PNGs and `metadata.jsonl`.

Each metadata line holds `file_name`, `text` (the caption / prompt) and any extra attribute columns
(e.g. `color`, `background`). Training reads images and `text`; evaluation reads one attribute column.

What is accepted, and what is refused with one line naming the file (and the metadata line):
- metadata.jsonl must be UTF-8; every `file_name` is listed once; every `text` is a non-blank caption.
- Images of mode L, LA, P, RGBA, CMYK, I, I;16 (16-bit) or F are converted to 8-bit RGB: alpha is dropped, 16-bit
  and 32-bit grey values are scaled to 0-255. Images of other sizes are resized bilinearly to the model's size
  where a size is given (training, groups); otherwise all images of one split must share a size. A one-line note
  (logging, stderr) counts the converted and resized images.
- An image that declares more than MAX_PIXELS pixels (a decompression bomb) is refused before it is decoded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..artifacts import fingerprint_files, read_utf8
from ..errors import InvdiffError

METADATA = "metadata.jsonl"
REQUIRED = ("file_name", "text")
MAX_PIXELS = 4096 * 4096  # far above any image this project trains on; PIL's own limit is ~89 M pixels


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
        if not isinstance(row[key], str) or not row[key].strip():
            raise InvdiffError(f'{meta}:{number}: "{key}" must be a non-empty string; fix the line')
    return row


def _to_record(split: Path, meta: Path, number: int, row: dict[str, Any]) -> Record:
    file = split / row["file_name"]
    if Path(row["file_name"]).is_absolute() or ".." in Path(row["file_name"]).parts:
        raise InvdiffError(f'{meta}:{number}: "file_name" must be a path inside {split}; fix the line')
    try:
        found = file.is_file()
    except OSError as e:  # e.g. a name longer than the file system takes
        raise InvdiffError(f'{meta}:{number}: "file_name" is not a usable path ({e.strerror}); fix the line') from None
    if not found:
        raise InvdiffError(f"{meta}:{number}: image {file} not found; add the file or delete the line")
    attrs = {k: v for k, v in row.items() if k not in REQUIRED}
    return Record(file=file, text=row["text"].strip(), attrs=attrs, line=number)  # "a cat " is "a cat"


def read_split(root: str | Path, split: str = "train") -> list[Record]:
    """Read and validate `root/split/metadata.jsonl`: every line parses, has file_name and text, and its image exists."""
    folder = split_dir(root, split)
    meta = folder / METADATA
    if not meta.is_file():
        raise InvdiffError(f"{meta}: not found; a dataset folder needs {split}/{METADATA} (make one: invdiff data make)")
    lines = read_text_lines(meta)
    records = [_to_record(folder, meta, i, _parse_line(meta, i, raw)) for i, raw in enumerate(lines, 1) if raw.strip()]
    if not records:
        raise InvdiffError(f"{meta}: no records; add one JSON line per image")
    _check_unique(meta, records)
    return records


_LINE_END = re.compile(r"\r\n|\r|\n")  # str.splitlines() also splits at U+2028, NEL, form feeds, ...


def read_text_lines(path: Path, flag: str = "") -> list[str]:
    """The lines of a UTF-8 text file (a leading byte-order mark, as Windows editors write, is dropped; \\n, \\r\\n
    or \\r ends a line, a U+2028 pasted from a web page does not); a byte sequence that is not UTF-8 is an error
    naming its line."""
    text = read_utf8(path, f"{flag} {path}" if flag else str(path))
    return _LINE_END.split(text.removesuffix("\n").removesuffix("\r")) if text else []  # not str.splitlines()


def _check_unique(meta: Path, records: list[Record]) -> None:
    first: dict[Path, int] = {}
    for r in records:
        if r.file in first:
            raise InvdiffError(f"{meta}:{r.line}: {r.file.name} is already listed on line {first[r.file]}; "
                               "list each image once (delete one of the lines)")
        first[r.file] = r.line


@contextlib.contextmanager
def _reading(record: Record) -> Iterator[None]:
    """A failure to read `record`'s image, as one line naming it and its metadata line."""
    from PIL import Image, UnidentifiedImageError

    try:
        yield
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise InvdiffError(f"{record.file}: unreadable image ({type(e).__name__}); replace or delete it "
                           f"(metadata line {record.line})") from e


def _open_rgb(record: Record, size: int | None, notes: Counter | None = None):
    from PIL import Image, ImageOps

    with _reading(record), Image.open(record.file) as im:
        _check_pixels(record, im.size)
        upright = ImageOps.exif_transpose(im)  # a phone photo's EXIF orientation, as viewers show it
        if notes is not None:
            notes["rotated"] += _orientation(im) not in (0, 1)
            notes[f"mode {im.mode}"] += im.mode != "RGB"
            notes[f"{upright.size[0]}x{upright.size[1]}"] += size is not None and upright.size != (size, size)
        im = to_rgb(upright)
    if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    return im


def native_size(records: Sequence[Record]) -> tuple[int, int] | None:
    """The (width, height) every image of the records has (read from their headers), None when they differ."""
    from PIL import Image

    sizes = set()
    for record in records:
        with _reading(record), Image.open(record.file) as im:
            sizes.add(im.size)
    return sizes.pop() if len(sizes) == 1 else None


def _orientation(im) -> int:
    return int(im.getexif().get(0x0112, 1) or 1)  # EXIF Orientation; 1 = upright


def _check_pixels(record: Record, size: tuple[int, int]) -> None:
    if size[0] * size[1] > MAX_PIXELS:
        raise InvdiffError(f"{record.file}: declares {size[0]}x{size[1]} pixels, more than {MAX_PIXELS} "
                           f"(a decompression bomb?); replace it or delete metadata line {record.line}")


def to_rgb(im):
    """8-bit RGB from any PIL mode: alpha dropped, 16/32-bit grey scaled to 0-255 (not clipped)."""
    import numpy as np
    from PIL import Image

    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        array = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or array.max() > 255 else 255.0
        top = 1.0 if im.mode == "F" and array.max() <= 1.0 else top  # a float image in [0, 1]
        im = Image.fromarray(np.clip(np.round(array / top * 255.0), 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    return im.convert("RGB")


def load_images(records: Sequence[Record], size: int | None = None):
    """Load records as float32 `[N,3,H,W]` in `[-1, 1]` (RGB; bilinear resize only if `size` is given and differs)."""
    import numpy as np
    import torch

    if not records:
        raise InvdiffError("load_images: no records given; read a non-empty split first")
    notes: Counter = Counter()
    arrays = [np.asarray(_open_rgb(r, size, notes), dtype=np.uint8) for r in records]
    _note_conversions(records[0].file.parent, notes, size)
    for r, a in zip(records, arrays):
        if a.shape != arrays[0].shape:
            raise InvdiffError(f"{r.file}: {a.shape[1]}x{a.shape[0]} pixels, but {records[0].file.name} has "
                               f"{arrays[0].shape[1]}x{arrays[0].shape[0]} (metadata line {r.line}); "
                               "give every image of a split the same size")
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return (batch / 127.5 - 1.0).contiguous()


def _note_conversions(folder: Path, notes: Counter, size: int | None) -> None:
    """One line on stderr when images were converted to RGB or resized (the data is used, not refused)."""
    modes = sorted(k for k, n in notes.items() if n and k.startswith("mode "))
    sizes = sorted(k for k, n in notes.items() if n and "x" in k and not k.startswith("mode "))
    if modes or sizes or notes["rotated"]:
        converted = sum(notes[k] for k in modes)
        resized = sum(notes[k] for k in sizes)
        logging.getLogger(__name__).warning(
            f"note: {folder}: {converted} images converted to 8-bit RGB ({', '.join(m[5:] for m in modes) or '-'}), "
            f"{resized} resized to {size}x{size} (from {', '.join(sizes) or '-'}), {notes['rotated']} turned upright "
            "by their EXIF orientation")


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
            raise InvdiffError(f'{meta}:{r.line}: missing column "{column}" (columns: {have}); name one of those')
        if not isinstance(r.attrs[column], (str, int, float, type(None))):
            raise InvdiffError(f'{_metadata_of(r)}:{r.line}: column "{column}" is {type(r.attrs[column]).__name__}, '
                               "not one value (a string or number); fix the line")
        if isinstance(r.attrs[column], float) and not math.isfinite(r.attrs[column]):  # pandas writes NaN for missing
            raise InvdiffError(f'{_metadata_of(r)}:{r.line}: column "{column}" is {r.attrs[column]}, not a value; '
                               "write null for a missing one or fix the line")
    return sorted({r.attrs[column] for r in records}, key=lambda v: (str(type(v)), v))


def attribute_of(records: Sequence[Record], column: str) -> list:
    """The attribute column, one value per record (validated like `attribute_values`)."""
    attribute_values(records, column)
    return [r.attrs[column] for r in records]
