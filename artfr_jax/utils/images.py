"""Small image helpers shared by trainers, restore and evaluate: uint8 <-> [-1, 1] on the device,
grids and files on the host."""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from PIL import Image


def to_float_image(x: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1] (done on device: uint8 moves 4x less data)."""
    return x.astype(jnp.float32) / 127.5 - 1.0


def to_uint8_image(x: jax.Array) -> jax.Array:
    """[-1, 1] -> uint8 [0, 255], rounded and clipped."""
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def side_by_side(*columns: np.ndarray) -> np.ndarray:
    """Concatenates [B, H, W, 3] uint8 arrays along width -> [B, H, sum(W), 3]."""
    return np.concatenate(columns, axis=2)


def stack_rows(rows: np.ndarray) -> np.ndarray:
    """[B, H, W, 3] -> one [B*H, W, 3] image."""
    rows = np.asarray(rows)
    return rows.reshape(-1, *rows.shape[2:]) if rows.ndim == 4 else rows


def tile(rows: np.ndarray, columns: int, gap: int = 2) -> np.ndarray:
    """[B, H, W, 3] -> [ceil(B / columns), H, columns * (W + gap) - gap, 3]: ``columns`` rows side
    by side with a white gap (missing cells white)."""
    rows = np.asarray(rows)
    b, h, w, c = rows.shape
    n = -(-b // columns)
    out = np.full((n, h, columns * (w + gap) - gap, c), 255, rows.dtype)
    for i in range(b):
        x = (i % columns) * (w + gap)
        out[i // columns, :, x : x + w] = rows[i]
    return out


def save_grid(rows: np.ndarray, path: str) -> str:
    """Writes grid rows as one PNG (creating the folder; local path or ``gs://`` URI); returns
    the path."""
    out = epath.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(stack_rows(rows).astype(np.uint8)).save(buffer, format="PNG")
    out.write_bytes(buffer.getvalue())
    return path
