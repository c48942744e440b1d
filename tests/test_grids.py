"""Sample grids: tiling, gaps, one class per row."""

import numpy as np
import pytest

from edm2_diffusers.grids import grid_class_labels, tile_images


def test_grid_layout_and_one_class_per_row():
    images = np.stack([np.full((2, 3, 1), i / 5) for i in range(6)])  # tile i has grey level i/5
    grid = np.asarray(tile_images(images, rows=2, cols=3, padding=1, pad_value=1.0))
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1)
    for i in range(6):
        r, c = divmod(i, 3)
        tile = grid[1 + r * 3 : 1 + r * 3 + 2, 1 + c * 4 : 1 + c * 4 + 3]
        assert (tile == round(i / 5 * 255)).all()
    assert grid[0].tolist() == [255] * grid.shape[1]
    assert grid_class_labels(2, 3, 10) == [0, 0, 0, 5, 5, 5]
    assert grid_class_labels(10, 2, 10)[::2] == list(range(10))
    assert grid_class_labels(3, 1, 2) == [0, 1, 0] and grid_class_labels(2, 2, None) is None
    with pytest.raises(ValueError, match="need 6 images"):
        tile_images(images[:5], rows=2, cols=3)
