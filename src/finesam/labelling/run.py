"""The output folder of a labelling run: what it was made with, each image's committed result, the merge.

    OUT/run.json          the command, options and weights digests the folder was made with
    OUT/parts/<id>.json   one image's annotations, written atomically when the image is done
    OUT/parts/<id>.error.json   why an image failed (tried again by the next run)
    OUT/masks/...         with --png: one PNG per object (recorded in its image's part)
    OUT/annotations.json  COCO instances, merged from the parts at the end (atomically)
    OUT/errors.jsonl      the images that failed, one JSON object per line

A run killed at any moment leaves only whole files; started again with the same command it skips the images
whose part matches (same name, file and prompts) and ends with the files an uninterrupted run writes.

What a run may replace or delete (docs/datasets.md): the files of an earlier run of the same folder, as its
run.json and parts record them, and nothing else. Without a run.json, an annotations.json or errors.jsonl that is
already there is refused unless --overwrite; with --png, a masks/ folder that no earlier run of ours made is
refused always (its files would be replaced).
"""

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from finesam.files import atomic_write
from finesam.labelling.coco import SegmentedObject, annotation, coco_document
from finesam.labelling.sources import DEFAULT_CATEGORY, ImageJob
from finesam.rle import rle_to_mask

RUN_FORMAT = "finesam-labelling/2"  # 2: one mask folder per image name (suffix and case kept)
OUTPUTS = ("annotations.json", "errors.jsonl")  # what the merge writes
_PART = re.compile(r"[0-9a-f]{32}(\.error)?\.json")  # the part files of `ImageJob.part_name`


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


@dataclass(frozen=True)
class Summary:
    images: int  # segmented, in annotations.json
    masks: int
    failures: int
    empty: int = 0  # empty masks left out of annotations.json (kept with keep_empty)


class LabellingRun:
    """The folder `out` of a run whose results depend on `identity` (command, options, weights digests).

    Args:
        out: the output folder.
        identity: everything besides the images that the results depend on, JSON-serialisable.
        polygons: annotations with polygon segmentations.
        png: also one mask PNG per object, under `out/masks/`.
        keep_empty: keep empty masks as annotations (area 0, bbox [0, 0, 0, 0]); by default they are left out
            and counted: COCO evaluation cannot match them and many trainers refuse zero-area boxes.
        categories: the names of the categories by id, all listed in annotations.json (text prompts: the
            phrases); None: the ids used, named "object" (1) or "category N".
    """

    def __init__(
        self,
        out: Path,
        identity: dict[str, Any],
        *,
        polygons: bool = False,
        png: bool = False,
        keep_empty: bool = False,
        categories: dict[int, str] | None = None,
    ) -> None:
        self.out = out
        self.categories = categories
        self.identity = {"format": RUN_FORMAT, **identity, "polygons": polygons, "png": png, "keep_empty": keep_empty}
        self.polygons = polygons
        self.png = png
        self.keep_empty = keep_empty

    @property
    def parts(self) -> Path:
        return self.out / "parts"

    def _earlier(self) -> dict[str, Any] | None:
        """The identity in run.json (None: there is none).

        Raises:
            ValueError: run.json cannot be read.
        """
        try:
            earlier = json.loads((self.out / "run.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.out / 'run.json'}: unreadable ({e}); use another folder or --overwrite") from None
        return earlier if isinstance(earlier, dict) else {}

    def check_outputs(self, overwrite: bool) -> None:
        """Raises `ValueError` when the run would replace files that no earlier run of ours wrote: without a
        run.json, an annotations.json or errors.jsonl already in `out` (unless `overwrite`); with --png, a
        masks/ folder that no earlier --png run of this folder made (even with `overwrite`)."""
        try:
            earlier = self._earlier()
        except ValueError:
            if not overwrite:
                raise
            earlier = None
        if earlier is None and not overwrite:
            for name in OUTPUTS:
                if (self.out / name).exists():
                    raise ValueError(
                        f"{self.out / name} exists and no run.json says a finesam run wrote it: use another --out, "
                        "or --overwrite to replace it"
                    )
        masks = self.out / "masks"
        # any format of ours: a run of format 1 recorded its masks in its parts as well
        ours = (
            earlier is not None
            and str(earlier.get("format")).startswith(RUN_FORMAT.split("/")[0] + "/")
            and earlier.get("png") is True
        )
        if self.png and masks.exists() and not ours and any(masks.iterdir()):
            raise ValueError(
                f"{masks} holds files that no finesam run of this folder wrote, and --png writes there: "
                "use another --out"
            )

    def check(self) -> None:
        """Raises `ValueError` when `out` holds a run made with anything else (options, weights, outputs)."""
        earlier = self._earlier()
        if earlier is None or earlier == self.identity:
            return
        if earlier.get("command") != self.identity.get("command"):
            raise ValueError(
                f"{self.out} holds the results of `finesam {earlier.get('command')}`, not of "
                f"`finesam {self.identity.get('command')}`: use another --out, or --overwrite to start again"
            )
        keys = sorted(set(earlier) | set(self.identity), key=str)
        changed = [
            f"{k}: {earlier.get(k)!r} -> {self.identity.get(k)!r}"
            for k in keys
            if earlier.get(k) != self.identity.get(k)
        ]
        raise ValueError(
            f"{self.out} holds a run made with other settings ({'; '.join(changed)}): resuming it would mix "
            "results; use another --out, or --overwrite to start again"
        )

    def start(self, overwrite: bool) -> None:
        """Records the identity (after `check` and `check_outputs`); with `overwrite`, first removes what an
        earlier run recorded that it wrote: its parts, the mask PNGs its parts name, its annotations.json and
        errors.jsonl (only where a run.json shows that the folder is a run's). Other files are never touched."""
        record = self.out / "run.json"
        if overwrite and record.is_file():
            self._remove_recorded()
        text = json.dumps(self.identity, indent=1, sort_keys=True) + "\n"
        try:
            if record.read_text() == text:
                return  # a resumed run: nothing to write (and nothing to fail on a full disk)
        except (OSError, UnicodeDecodeError):
            pass
        write_text(record, text)

    def _remove_recorded(self) -> None:
        masks = (self.out / "masks").resolve()
        folders: set[Path] = set()
        parts = sorted(p for p in self.parts.glob("*.json") if _PART.fullmatch(p.name)) if self.parts.is_dir() else []
        for part in parts:
            for name in _mask_files(part):
                path = (self.out / name).resolve()
                if path.is_relative_to(masks) and path.suffix == ".png" and path.is_file():
                    path.unlink()
                    folders.add(path.parent)
            part.unlink(missing_ok=True)
        for folder in sorted(folders | {self.parts}, key=lambda p: -len(p.parts)):
            _remove_empty_folders(folder, stop=self.out)
        for name in OUTPUTS:
            (self.out / name).unlink(missing_ok=True)

    def _part(self, job: ImageJob, error: bool = False) -> Path:
        return self.parts / f"{job.part_name}{'.error' if error else ''}.json"

    def _read(self, job: ImageJob, error: bool = False) -> dict[str, Any] | None:
        """The job's committed part (or failure), if it was made for the job as it is now."""
        try:
            part = json.loads(self._part(job, error).read_text())
        except (OSError, ValueError):
            return None
        return part if isinstance(part, dict) and part.get("key") == job.key() else None

    def done(self, job: ImageJob) -> bool:
        return self._read(job) is not None

    def commit(self, job: ImageJob, image: Image.Image, objects: list[SegmentedObject]) -> int:
        """Writes the image's mask PNGs (with --png), then its part: the image is done. Returns the mask count
        (empty masks, left out unless `keep_empty`, are counted in the part and the merge's summary)."""
        kept = objects if self.keep_empty else [item for item in objects if item.area > 0]
        objects, empty = kept, len(objects) - len(kept)
        records = [annotation(item, polygons=self.polygons) for item in objects]
        if self.png:
            for i, (item, record) in enumerate(zip(objects, records, strict=True)):
                name = f"masks/{self.mask_folder(job)}/{i:04d}.png"
                mask = Image.fromarray(np.where(rle_to_mask(item.rle), 255, 0).astype(np.uint8), mode="L")
                atomic_write(self.out / name, lambda tmp, m=mask: m.save(tmp, format="PNG"))
                record["mask_file"] = name
        part = {
            "key": job.key(),
            "image": {"file_name": job.file_name, "width": image.width, "height": image.height},
            "annotations": records,
            "empty": empty,
        }
        write_text(self._part(job), json.dumps(part))
        self._part(job, error=True).unlink(missing_ok=True)
        return len(records)

    def fail(self, job: ImageJob, reason: str) -> None:
        write_text(self._part(job, error=True), json.dumps({"key": job.key(), "image": job.file_name, "error": reason}))

    @staticmethod
    def mask_folder(job: ImageJob) -> str:
        """The folder of an image's mask PNGs under masks/, one per image: its name with the suffix kept
        (`a.png` and `a.jpg` differ), a digest of the name added where it has capitals (`a.png` and `a.PNG`
        differ on a file system that ignores case too), or for names that would lead outside the folder its
        result id."""
        name = PurePosixPath(job.file_name)
        if name.is_absolute() or ".." in name.parts:
            return job.part_name
        if job.file_name != job.file_name.lower():
            return f"{name.as_posix()}-{hashlib.sha256(job.file_name.encode()).hexdigest()[:8]}"
        return name.as_posix()

    def merge(self, jobs: list[ImageJob]) -> Summary:
        """Writes annotations.json from the parts of `jobs` (in their order) and errors.jsonl (always: empty
        when nothing failed); a job with neither part nor recorded failure counts as failed."""
        images, annotations, errors, categories, empty = [], [], [], set(), 0
        for job in jobs:
            part = self._read(job)
            if part is None:
                failure = self._read(job, error=True)
                reason = failure["error"] if failure is not None else "not processed (a process of the run stopped?)"
                errors.append({"image": job.file_name, "error": reason})
                continue
            images.append(part["image"])
            annotations.append(part["annotations"])
            empty += int(part.get("empty", 0))
            categories |= {record["category_id"] for record in part["annotations"]}
        if not categories and not self.categories:
            categories = {DEFAULT_CATEGORY}
        document = coco_document(images, annotations, categories, self.categories)
        write_text(self.out / "annotations.json", json.dumps(document))
        write_text(self.out / "errors.jsonl", "".join(json.dumps(e) + "\n" for e in errors))
        return Summary(len(images), sum(map(len, annotations)), len(errors), empty)


def _mask_files(part: Path) -> list[str]:
    """The mask files a committed part names (none when it cannot be read)."""
    try:
        records = json.loads(part.read_text()).get("annotations", [])
        return [r["mask_file"] for r in records if isinstance(r, dict) and isinstance(r.get("mask_file"), str)]
    except (OSError, ValueError, AttributeError):
        return []


def _remove_empty_folders(folder: Path, stop: Path) -> None:
    """`folder` and its parents up to (not including) `stop`, while they are empty."""
    stop = stop.resolve()
    folder = folder.resolve()
    while folder != stop and folder.is_relative_to(stop):
        try:
            folder.rmdir()
        except OSError:  # not empty (files of someone else), or gone
            return
        folder = folder.parent
