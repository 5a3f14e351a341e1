"""Finding (image, mask) pairs in the `im/` + `gt/` layout, and refusing incomplete folders."""

from pathlib import Path

import pytest

from finesam.data.pairs import list_pairs


def layout(root: Path, images: list[str], masks: list[str]) -> Path:
    for folder, names in (("im", images), ("gt", masks)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            (root / folder / name).write_bytes(b"")
    return root


def test_pairs_are_matched_by_stem_and_sorted(tmp_path: Path):
    root = layout(tmp_path, ["b.JPG", "a.png", "c.tiff", "notes.txt", ".hidden.png"], ["c.png", "a.png", "b.png"])
    pairs = list_pairs(root)
    assert [(image.name, mask.name) for image, mask in pairs] == [
        ("a.png", "a.png"),
        ("b.JPG", "b.png"),
        ("c.tiff", "c.png"),
    ]
    assert all(image.parent == root / "im" and mask.parent == root / "gt" for image, mask in pairs)


def test_images_without_masks_are_counted_and_named(tmp_path: Path):
    images = [f"{i:03d}.jpg" for i in range(9)]
    root = layout(tmp_path, images, ["000.png", "001.png"])
    with pytest.raises(ValueError, match=r"7 of 9 images have no mask") as error:
        list_pairs(root)
    assert "002.jpg, 003.jpg, 004.jpg, 005.jpg, 006.jpg, ... (2 more)" in str(error.value)


def test_masks_without_images_are_refused(tmp_path: Path):
    root = layout(tmp_path, ["a.jpg"], ["a.png", "stray.png"])
    with pytest.raises(ValueError, match=r"1 masks in .*gt have no image in .*im: stray.png"):
        list_pairs(root)


def test_both_problems_are_reported_together(tmp_path: Path):
    root = layout(tmp_path, ["a.jpg", "b.jpg"], ["a.png", "c.png"])
    with pytest.raises(ValueError, match=r"no mask .*b\.jpg.*no image .*c\.png"):
        list_pairs(root)


def test_a_stem_twice_is_ambiguous(tmp_path: Path):
    root = layout(tmp_path, ["a.jpg", "a.png"], ["a.png"])
    with pytest.raises(ValueError, match=r"2 files in .*im share a stem: a\.jpg, a\.png"):
        list_pairs(root)


def test_empty_or_missing_folders_are_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="is missing"):
        list_pairs(tmp_path)
    root = layout(tmp_path, [], [])
    with pytest.raises(ValueError, match="no images"):
        list_pairs(root)
    (root / "gt").rmdir()
    with pytest.raises(ValueError, match="gt is missing"):
        list_pairs(root)
