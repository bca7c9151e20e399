"""Host-side image grid helpers."""

import numpy as np

from artfr_jax.utils import images


def test_tile_places_rows_in_columns_with_white_gaps():
    rows = np.stack([np.full((4, 6, 3), i + 1, np.uint8) for i in range(5)])
    grid = images.tile(rows, columns=2, gap=1)
    assert grid.shape == (3, 4, 13, 3)
    assert (grid[0, :, :6] == 1).all() and (grid[0, :, 7:] == 2).all()
    assert (grid[0, :, 6] == 255).all()  # gap
    assert (grid[2, :, :6] == 5).all() and (grid[2, :, 7:] == 255).all()  # missing cell
    assert images.stack_rows(grid).shape == (12, 13, 3)
