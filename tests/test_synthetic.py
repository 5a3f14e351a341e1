"""Synthetic thin-structure samples: deterministic, exact binary masks that the image agrees with."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finesam.data.pairs import list_pairs
from finesam.data.synthetic import BACKGROUND_MAX, FOREGROUND_MIN, KINDS, make_sample, sample_seed, write_dataset


def arrays(seed: int, size: tuple[int, int] = (96, 96), kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    image, mask = make_sample(seed, size, kind)
    return np.asarray(image), np.asarray(mask)


def eroded(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood is all foreground (outside the image is background)."""
    padded = np.pad(mask, 1)
    height, width = mask.shape
    return np.all([padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)], axis=0)


def test_same_seed_same_bytes_and_other_seeds_differ():
    image, mask = make_sample(3, (64, 48))
    again_image, again_mask = make_sample(3, (64, 48))
    assert image.tobytes() == again_image.tobytes() and mask.tobytes() == again_mask.tobytes()
    other_image, other_mask = make_sample(7, (64, 48))  # same kind (7 % 4 == 3 % 4), other seed
    assert image.tobytes() != other_image.tobytes() and mask.tobytes() != other_mask.tobytes()


def test_global_random_state_is_untouched():
    state = np.random.get_state()
    make_sample(0, (32, 32))
    assert all(np.array_equal(a, b) for a, b in zip(state, np.random.get_state(), strict=True))


def test_size_is_width_by_height():
    image, mask = make_sample(0, (80, 48))
    assert image.size == mask.size == (80, 48)
    assert image.mode == "RGB" and mask.mode == "L"


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_an_exact_binary_mask_that_the_image_agrees_with(kind):
    for seed in range(4):
        image, mask = arrays(seed, (96, 80), kind)
        assert set(np.unique(mask).tolist()) == {0, 255}  # exactly binary, neither empty nor full
        inside = mask == 255
        assert image[~inside].max() <= BACKGROUND_MAX
        assert image[inside].max(axis=1).min() >= FOREGROUND_MIN
        assert np.array_equal(image.max(axis=2) >= 128, inside)  # the mask is recovered from the image alone


@pytest.mark.parametrize(("kind", "most_surviving_erosion"), [("wire", 0.5), ("hair", 0.2), ("mesh", 0.2)])
def test_structures_are_thin(kind, most_surviving_erosion):
    # lines of width w lose min(w, 2) of their w pixels across to a 3x3 erosion: wires (w <= 4) at least half,
    # hair and mesh lines (w <= 2) all but crossings
    for seed in range(4):
        inside = arrays(seed, (128, 128), kind)[1] == 255
        assert inside.mean() < 0.15
        assert eroded(inside).sum() <= most_surviving_erosion * inside.sum()


def test_kind_cycles_with_the_seed():
    for seed in range(4):
        assert make_sample(seed, (32, 32))[1].tobytes() == make_sample(seed, (32, 32), KINDS[seed % 4])[1].tobytes()
    assert make_sample(1, (32, 32))[1].tobytes() != make_sample(1, (32, 32), "wire")[1].tobytes()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown kind 'blob'"):
        make_sample(0, kind="blob")
    with pytest.raises(ValueError, match="at least 16x16"):
        make_sample(0, (8, 64))
    with pytest.raises(ValueError, match="non-negative"):
        make_sample(-1)


def test_write_dataset_round_trip(tmp_path: Path):
    root = write_dataset(tmp_path / "synthetic", count=5, seed=2, size=(48, 40))
    pairs = list_pairs(root)
    assert [(image.name, mask.name) for image, mask in pairs] == [(f"{i:06d}.png", f"{i:06d}.png") for i in range(5)]
    for index, (image_path, mask_path) in enumerate(pairs):
        image, mask = make_sample(sample_seed(2, index), (48, 40), KINDS[index % 4])
        with Image.open(image_path) as written_image, Image.open(mask_path) as written_mask:
            assert written_image.mode == "RGB" and written_mask.mode == "L"
            assert written_image.tobytes() == image.tobytes() and written_mask.tobytes() == mask.tobytes()
    assert sorted(p.name for p in (root / "im").iterdir()) == [f"{i:06d}.png" for i in range(5)]  # no temporaries
    assert len({sample_seed(2, i) for i in range(5)} | {sample_seed(3, i) for i in range(5)}) == 10
    with pytest.raises(ValueError, match="not empty"):
        write_dataset(root, count=1)
    with pytest.raises(ValueError, match="count"):
        write_dataset(tmp_path / "other", count=0)
