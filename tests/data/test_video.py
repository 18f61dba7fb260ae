"""video: the moving shape's centroid, measured in every frame, travels the answered way."""

from __future__ import annotations

import numpy as np
import pytest

from minivlm.data.video import DIRECTION_VECTORS, VideoDataset


def frames_of(sample):
    (item,) = sample["messages"][0]["content"][:-1]
    assert item["type"] == "video"
    return item["video"]


def centroid(frame, background) -> np.ndarray:
    pixels = np.asarray(frame).astype(int)
    ys, xs = np.nonzero(np.abs(pixels - np.array(background)).max(-1) > 40)
    return np.array([xs.mean(), ys.mean()])


@pytest.mark.parametrize("n_frames", [2, 6])
def test_motion_in_the_pixels_matches_the_answer(n_frames):
    dataset = VideoDataset(seed=0, n_frames=n_frames)
    for index in range(100):
        sample = dataset[index]
        frames = frames_of(sample)
        assert len(frames) == n_frames and all(
            f.size == (64, 64) and f.mode == "RGB" for f in frames
        )
        path = np.stack([centroid(f, sample["scene"].background) for f in frames])
        steps = np.diff(path, axis=0)
        direction = np.array(DIRECTION_VECTORS[sample["answer"]])
        along = steps @ direction
        across = steps @ direction[::-1]
        assert (along > 0).all(), (sample["id"], path)  # moves the answered way every frame
        assert np.abs(across).max() < 0.5  # and not sideways
        assert path[-1] @ direction - path[0] @ direction >= 0.3 * 64  # a clearly visible distance


def test_shape_stays_inside_every_frame():
    dataset = VideoDataset(seed=1, image_size=96)
    for index in range(100):
        for scene in dataset[index]["scene"].frames():
            (shape,) = scene.shapes
            left, top, right, bottom = shape.box()
            assert 0 < left and 0 < top and right < 1 and bottom < 1


def test_fewer_than_two_frames_is_refused():
    with pytest.raises(ValueError, match="n_frames"):
        VideoDataset(n_frames=1)
