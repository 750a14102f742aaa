"""bench/tile_position.py: an object's recall in the slide run's tiles and in a centred tile."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def tile_position(bench):
    return bench("tile_position")


def test_centred_and_tiled_recall_are_pixel_weighted_over_objects(tile_position):
    """Two objects (100 and 36 px); the slide run found all of the first and none of the
    second, the centred tiles find both: tiled 100/136, centred 1.0. Objects under min_px and
    object pixels outside their centred tile are handled as the docstring says."""
    truth = np.zeros((64, 64), bool)
    truth[5:15, 5:15] = True  # 100 px, near the corner: its 32-px tile is clipped to the slide
    truth[40:46, 40:46] = True  # 36 px
    truth[60, 2] = True  # 1 px: under min_px
    tiled = np.zeros_like(truth)
    tiled[5:15, 5:15] = True
    image = np.zeros((64, 64, 3), np.uint8)
    seen = []

    def predict(x):
        assert x.shape == (1, 3, 32, 32) and x.dtype.is_floating_point
        seen.append(x.shape)
        return np.ones((32, 32), bool)  # claims everything in its tile

    row = tile_position.object_recall(image, truth, tiled, predict, tile=32, min_px=4)
    assert row["objects"] == 2 and row["pixels"] == 136 and len(seen) == 2
    assert row["tiled_recall"] == pytest.approx(100 / 136, abs=1e-3)
    assert row["centred_recall"] == 1.0
    assert row["centred_over_tiled"] == pytest.approx(1.36, abs=0.01)

    # an object larger than the tile: its pixels outside the centred tile count as missed
    big = np.zeros((64, 64), bool)
    big[:, 10:30] = True  # 64 x 20 = 1280 px; a 32-px tile holds 32 x 20 of them
    row = tile_position.object_recall(image, big, big, predict, tile=32, min_px=4)
    assert row["centred_recall"] == pytest.approx(0.5) and row["tiled_recall"] == 1.0


def test_a_slide_smaller_than_the_tile_is_an_error(tile_position):
    small = np.zeros((16, 16), bool)
    with pytest.raises(ValueError, match="smaller than a 32 px tile"):
        tile_position.object_recall(np.zeros((16, 16, 3), np.uint8), small, small, None, 32, 1)
