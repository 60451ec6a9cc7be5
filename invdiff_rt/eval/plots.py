"""Sample grids for evaluation runs: one row per prompt, one column per sample."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..artifacts import atomic_save_image

MAX_COLUMNS = 16
MIN_TILE = 64  # small images are upscaled (nearest) so a 32 px grid is readable


def grid_array(rows: Sequence[np.ndarray], pad: int = 2, background: int = 255) -> np.ndarray:
    """Tile uint8 rows (`[n_i,H,W,3]` each) into one `[R*(H+pad)+pad, C*(W+pad)+pad, 3]` image."""
    h, w = rows[0].shape[1:3]
    cols = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), background, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y:y + h, x:x + w] = img
    return out


def save_grid(path: str | Path, images: np.ndarray, n_rows: int, max_columns: int = MAX_COLUMNS) -> Path:
    """Save `images` (`[n_rows * n, H, W, 3]`, row-major by prompt) as a PNG grid of the first min(n, 16) per row."""
    from PIL import Image

    per_row = len(images) // n_rows
    cols = min(per_row, max_columns)
    rows = [images[i * per_row:i * per_row + cols] for i in range(n_rows)]
    scale = max(1, -(-MIN_TILE // images.shape[1]))
    if scale > 1:
        rows = [r.repeat(scale, axis=1).repeat(scale, axis=2) for r in rows]
    return atomic_save_image(Image.fromarray(grid_array(rows)), path)
