"""What a labelling run works through: the images of a folder or of a list file, or the lines of a prompt manifest.

Every image becomes an `ImageJob` named by its path relative to the folder, list or manifest (that name is its
COCO `file_name` and keys its result); the jobs are sorted (folders) or kept in the order given (lists,
manifests), so every process of a run sees the same list.
"""

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from finesam.inputs import DECODER_BATCH, JSON_PROMPT_KEYS, parse_json_prompts, read_text_input, special_file

DEFAULT_CATEGORY = 1  # "object", when a manifest gives no category ids


@dataclass(frozen=True)
class ObjectPrompts:
    """The prompts of one image's objects, one mask each: K boxes and/or K point lists (one list per object)."""

    boxes: list[list[float]] | None = None  # K x [x1, y1, x2, y2]
    points: list[list[list[float]]] | None = None  # K x [[x, y], ...]
    labels: list[list[int]] | None = None  # K x [1 | 0, ...], the shape of points
    category_ids: list[int] = field(default_factory=list)  # K

    def __len__(self) -> int:
        return len(self.category_ids)

    def groups(self) -> list[list[int]]:
        """The objects in batches that one decoder call can take: those with the same number of points."""
        if self.points is None:
            return [list(range(len(self)))] if len(self) else []
        by_count: dict[int, list[int]] = {}
        for i, points in enumerate(self.points):
            by_count.setdefault(len(points), []).append(i)
        return list(by_count.values())

    def batches(self, size: int = DECODER_BATCH) -> Iterator[tuple[list[int], dict[str, list[Any] | None]]]:
        """The objects as the decoder takes them, `groups` in runs of at most `size`: their indices and their
        boxes, points and labels (None where the objects have none)."""
        for group in self.groups():
            for start in range(0, len(group), size):
                chosen = group[start : start + size]
                prompts = {"boxes": self.boxes, "points": self.points, "labels": self.labels}
                yield chosen, {k: None if v is None else [v[i] for i in chosen] for k, v in prompts.items()}

    def as_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"category_ids": self.category_ids}
        for key in ("boxes", "points", "labels"):
            if (value := getattr(self, key)) is not None:
                entry[key] = value
        return entry


@dataclass(frozen=True)
class ImageJob:
    """One image of a run: where it is, its name in the output, and its objects' prompts (None: everything)."""

    path: Path
    file_name: str
    prompts: ObjectPrompts | None = None

    def key(self) -> str:
        """What the image's result depends on besides the run's options: its name, its file (size and
        modification time: an edited image is segmented again) and its prompts."""
        try:
            stat = self.path.stat()
            file = [stat.st_size, stat.st_mtime_ns]
        except OSError:
            file = None  # unreadable: the job fails, and is tried again by the next run
        prompts = None if self.prompts is None else self.prompts.as_json()
        text = json.dumps({"file_name": self.file_name, "file": file, "prompts": prompts}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def part_name(self) -> str:
        """The name of the image's result file: a digest of its name, so any name (and any depth) fits."""
        return hashlib.sha256(self.file_name.encode()).hexdigest()[:32]


# the image formats a folder scan takes: a fixed list, because PIL also opens videos, PostScript, HDF5, ... by
# their suffix, which are not photos to label (those PIL cannot read here are dropped by `image_suffixes`)
IMAGE_SUFFIXES = (
    ".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".tif", ".tiff", ".webp", ".gif",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".jp2", ".j2k", ".jpx", ".avif",
)  # fmt: skip
SKIPPED_SHOWN = 5  # skipped files named in the one line that reports them


def image_suffixes() -> set[str]:
    """The suffixes of `IMAGE_SUFFIXES` that this PIL opens (lower case; names are compared case-insensitively)."""
    registered = Image.registered_extensions()
    return {suffix for suffix in IMAGE_SUFFIXES if registered.get(suffix) in Image.OPEN}


def is_image_file(path: Path) -> bool:
    """A file named as an image (a single-image command), not a list of paths."""
    return path.suffix.lower() in image_suffixes()


def images_of(
    source: Path, exclude: Path | None = None, report: Callable[[str], object] | None = None
) -> list[ImageJob]:
    """The images of a folder (recursively, sorted by path; hidden files and folders and `exclude`, the run's
    own output folder, left out) or of a text file of paths (one per line, relative to the file's folder; blank
    lines and lines starting with # ignored).

    Args:
        source: the folder or the list file.
        exclude: a folder a folder scan leaves out (the run's output).
        report: called with one line when a folder scan skips files that are not images (`IMAGE_SUFFIXES`) or
            not regular files.

    Returns:
        The jobs, in output order.

    Raises:
        ValueError: the source cannot be read, or holds no image.
    """
    if source.is_dir():
        jobs, skipped = _folder_images(source, exclude)
        if skipped and report is not None:
            shown = ", ".join(skipped[:SKIPPED_SHOWN]) + (", ..." if len(skipped) > SKIPPED_SHOWN else "")
            report(f"{source}: skipped {len(skipped)} files that are not images ({shown})")
    elif source.is_file():
        jobs = _listed_images(source)
    else:
        kind = special_file(source)
        raise ValueError(
            f"{source}: " + (f"is {kind}, not a folder or list file" if kind else "no such folder or list file")
        )
    if not jobs:
        raise ValueError(f"{source}: no images ({'suffixes: ' + ', '.join(sorted(image_suffixes()))})")
    return jobs


def _folder_images(folder: Path, exclude: Path | None) -> tuple[list[ImageJob], list[str]]:
    """The images of a folder, sorted, and the names of the other files it holds (not hidden, not excluded)."""
    suffixes = image_suffixes()
    excluded = exclude.resolve() if exclude is not None else None
    jobs, skipped = [], []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or path.is_dir():
            continue
        if excluded is not None and path.resolve().is_relative_to(excluded):
            continue
        # FIFOs and devices left out as well: opening them can wait forever
        if path.suffix.lower() in suffixes and special_file(path) is None:
            jobs.append(ImageJob(path, relative.as_posix()))
        else:
            skipped.append(relative.as_posix())
    return sorted(jobs, key=lambda job: job.file_name), sorted(skipped)


def _numbered_lines(path: Path, what: str) -> Iterator[tuple[int, str]]:
    """The non-blank lines of a text file, stripped, with their line numbers (from 1)."""
    lines = read_text_input(path, what).splitlines()
    return ((number, line.strip()) for number, line in enumerate(lines, 1) if line.strip())


def _listed_images(listing: Path) -> list[ImageJob]:
    jobs: list[ImageJob] = []
    seen: dict[str, int] = {}
    for number, name in _numbered_lines(listing, "the list of images"):
        if name.startswith("#"):
            continue
        file_name = _file_name(name)
        if file_name in seen:
            raise ValueError(f"{listing}:{number}: {name!r} is listed twice (first on line {seen[file_name]})")
        seen[file_name] = number
        jobs.append(_listed_job(listing, number, file_name))
    return jobs


def _listed_job(listing: Path, number: int, file_name: str, prompts: ObjectPrompts | None = None) -> ImageJob:
    """The job of line `number` of a list or manifest, refused when the file is a FIFO or a device (opening it
    would wait forever; folders leave such files out)."""
    path = listing.parent / file_name  # as recorded: backslashes read as the separators they were written as
    if (kind := special_file(path)) is not None:
        raise ValueError(f"{listing}:{number}: {path} is {kind}, not an image file")
    return ImageJob(path, file_name, prompts)


def _file_name(name: str) -> str:
    """An image's name in the output: its path as given, with forward slashes."""
    return PurePosixPath(name.replace("\\", "/")).as_posix()


MANIFEST_KEYS = JSON_PROMPT_KEYS | {"image", "category_ids"}


def read_manifest(manifest: Path) -> list[ImageJob]:
    """The images and prompts of a JSON Lines manifest: one line per image, `{"image": "path", "boxes":
    [[x1, y1, x2, y2], ...], "points": [[[x, y], ...], ...], "labels": [[1, 0, ...], ...], "category_ids":
    [...]}`, paths relative to the manifest; the prompt keys are the JSON prompt dialect of docs/prompting.md
    ("box" or "boxes"; one object's `[[x, y], ...]` points or one list per object). Each box (or point list,
    with boxes: the points that go with that box) is one object; give boxes, points or both (as many point lists
    as boxes).

    Raises:
        ValueError: a line is not such an object; the message names the line and what is wrong.
    """
    jobs: list[ImageJob] = []
    seen: dict[str, int] = {}
    for number, line in _numbered_lines(manifest, "the manifest"):
        where = f"{manifest}:{number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON: {e}") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not entry["image"]:
            raise ValueError(f'{where}: expected an object with "image": "path" (and "boxes" and/or "points")')
        if unknown := sorted(entry.keys() - MANIFEST_KEYS):
            raise ValueError(f"{where}: unknown keys {unknown} (known: {sorted(MANIFEST_KEYS)})")
        file_name = _file_name(entry["image"])
        if file_name in seen:
            raise ValueError(
                f"{where}: {entry['image']!r} is on line {seen[file_name]} too; give its prompts on one line"
            )
        seen[file_name] = number
        try:
            prompts = _object_prompts(entry)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        jobs.append(_listed_job(manifest, number, file_name, prompts))
    if not jobs:
        raise ValueError(f"{manifest}: no images (one JSON object per line)")
    return jobs


def _object_prompts(entry: dict[str, Any]) -> ObjectPrompts:
    objects = parse_json_prompts(entry)  # the JSON prompt dialect of docs/prompting.md
    count = len(objects)
    category_ids = entry.get("category_ids", [DEFAULT_CATEGORY] * count)
    if not isinstance(category_ids, list) or len(category_ids) != count:
        raise ValueError(f'"category_ids" must be a list of {count} integers, one per object')
    if any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in category_ids):
        raise ValueError('"category_ids" must be positive integers')
    return ObjectPrompts(objects.boxes, objects.points, objects.labels, category_ids)
