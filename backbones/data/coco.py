"""A compact, read-only store of a COCO instances file, shared by the detection and segmentation readers.

The JSON is parsed and validated once; what the readers need is kept in flat numpy arrays (per image its
id, size, file name and a slice of the annotations; per annotation its id, category, box, crowd flag and
a slice of polygon coordinates or RLE bytes), with no Python object per annotation. The arrays are
written once per file content to ``<cache dir>/coco/<sha256>/`` (see `backbones.data.cache`) and
memory-mapped by every process and loader worker: a node holds one copy, reading a sample never
touches a reference count of shared data (no copy-on-read), and a second start skips the JSON parse.

Example:
    >>> store = load_coco_annotations("instances_val2017.json")
    >>> store.num_images, [c["name"] for c in store.categories][:2]
    (5000, ['person', 'bicycle'])
    >>> start, stop = store.annotation_range(0)
    >>> store.mask(start).shape  # (H, W) uint8, decoded with pycocotools
    (427, 640)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils

from .cache import build_once, default_cache_dir
from .coco_json import (
    MAX_NAMES_IN_ERROR,
    REQUIRED_KEYS,
    SEGMENTATION_NONE,
    SEGMENTATION_POLYGONS,
    SEGMENTATION_RLE,
    AnnotationFileError,
    build_arrays,
    names_and_more,
)

__all__ = [
    "FORMAT_VERSION",
    "MAX_NAMES_IN_ERROR",
    "REQUIRED_KEYS",
    "AnnotationFileError",
    "CocoAnnotations",
    "check_images_exist",
    "clip_xyxy",
    "contiguous_labels",
    "load_coco_annotations",
    "names_and_more",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # part of the cache key: bump when the arrays change


def contiguous_labels(categories: Sequence[dict]) -> dict[int, int]:
    """Maps contiguous labels 1..K to COCO category ids, in id order (0 is background).

    Example:
        >>> contiguous_labels([{"id": 7}, {"id": 1}, {"id": 3}])
        {1: 1, 2: 3, 3: 7}
    """
    return {label: category_id for label, category_id in enumerate(sorted(c["id"] for c in categories), 1)}


class CocoAnnotations:
    """The arrays of one COCO instances file; build with `load_coco_annotations`.

    Images are in id order (index ``i`` is the i-th smallest image id); each image's annotations
    keep their order in the file. Attributes are read-only numpy arrays:

    Attributes:
        path: the JSON the store was built from (named in errors).
        categories: the file's category dicts, sorted by id.
        image_ids, heights, widths: (num_images,) per image.
        annotation_ids, category_ids: (num_annotations,) int64.
        bboxes: (num_annotations, 4) float64 COCO boxes ``[x, y, width, height]`` as in the file.
        iscrowd: (num_annotations,) bool.
        segmentation_kind: (num_annotations,) uint8: 0 none, 1 polygons, 2 RLE.
        degenerate_polygon_ids: ids of the annotations that had polygons left out (fewer than 3
            points or an odd number of coordinates), one entry per polygon.
    """

    def __init__(self, path: Path, arrays: dict[str, np.ndarray], categories: list[dict], folder: Path | None):
        self.path = path
        self.categories = categories
        self._arrays = arrays
        self._folder = folder  # where the arrays are mapped from; None when they are held in memory
        self._category_ids = np.array([c["id"] for c in categories], np.int64)
        for name, array in arrays.items():
            setattr(self, name, array)

    # Workers started with "spawn" (and ddp_spawn) get the store by pickling: map the files again
    # there instead of sending a copy of every array.
    def __getstate__(self) -> dict:
        arrays = None if self._folder is not None else self._arrays
        return {"path": self.path, "categories": self.categories, "folder": self._folder, "arrays": arrays}

    def __setstate__(self, state: dict) -> None:
        arrays = state["arrays"] if state["folder"] is None else _map_arrays(state["folder"])
        self.__init__(state["path"], arrays, state["categories"], state["folder"])

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_annotations(self) -> int:
        return len(self.annotation_ids)

    def file_name(self, index: int) -> str:
        """The ``file_name`` of the image at ``index``."""
        start, stop = self.file_name_offsets[index], self.file_name_offsets[index + 1]
        return self.file_name_bytes[start:stop].tobytes().decode()

    def annotation_range(self, index: int) -> tuple[int, int]:
        """``(start, stop)``: the annotations of the image at ``index`` are ``start..stop-1``."""
        return int(self.annotation_starts[index]), int(self.annotation_starts[index + 1])

    def annotation_image_index(self) -> np.ndarray:
        """(num_annotations,) the image index of every annotation."""
        return np.repeat(np.arange(self.num_images), np.diff(self.annotation_starts))

    def polygons(self, annotation: int) -> list[np.ndarray]:
        """The (valid) polygons of an annotation, each a float64 array ``[x0, y0, x1, y1, ...]``."""
        first, last = self.polygon_starts[annotation], self.polygon_starts[annotation + 1]
        offsets = self.polygon_offsets[first : last + 1]
        return [self.polygon_coords[a:b] for a, b in pairwise(offsets)]

    def has_mask(self) -> np.ndarray:
        """(num_annotations,) bool: the annotation has an RLE or at least one valid polygon."""
        kind = self.segmentation_kind
        return (kind == SEGMENTATION_RLE) | ((kind == SEGMENTATION_POLYGONS) & (np.diff(self.polygon_starts) > 0))

    def mask(self, annotation: int, height: int, width: int) -> np.ndarray:
        """The (height, width) uint8 mask of an annotation, decoded as pycocotools' ``annToMask`` does."""
        kind = self.segmentation_kind[annotation]
        if kind == SEGMENTATION_RLE:
            rle = self.rle_index[annotation]
            start, stop = self.rle_offsets[rle], self.rle_offsets[rle + 1]
            size = self.rle_sizes[rle].tolist()
            return mask_utils.decode({"size": size, "counts": self.rle_bytes[start:stop].tobytes()})
        assert kind == SEGMENTATION_POLYGONS, "check_segmentations() before reading masks"
        polygons = self.polygons(annotation)
        if not polygons:  # all were degenerate and left out (with a warning)
            return np.zeros((height, width), np.uint8)
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width)))

    def check_segmentations(self, selected: np.ndarray) -> None:
        """Raises naming the ``selected`` annotations (a bool array) that have no ``segmentation``."""
        missing = self.annotation_ids[selected & (self.segmentation_kind == SEGMENTATION_NONE)].tolist()
        if missing:
            raise AnnotationFileError(
                f"{self.path}: annotation id(s) {names_and_more(missing)} have no 'segmentation' "
                "(polygons or an RLE), which their masks are made from"
            )

    def boxes_xyxy(self) -> np.ndarray:
        """(num_annotations, 4) float64 XYXY boxes, clipped to their images."""
        images = self.annotation_image_index()
        return clip_xyxy(self.bboxes, self.widths[images], self.heights[images])

    def label_of(self, category_ids: np.ndarray) -> np.ndarray:
        """Contiguous labels (1..K, in category id order) of COCO ``category_ids``."""
        return np.searchsorted(self._category_ids, category_ids) + 1

    def warn_degenerate_polygons(self) -> None:
        """Logs, once per call, how many degenerate polygons were left out of the masks."""
        ids = self.degenerate_polygon_ids
        if len(ids):
            logger.warning(
                "%s: left %d polygon(s) with fewer than 3 points or an odd number of coordinates out of the masks "
                "(annotation ids %s)",
                self.path, len(ids), names_and_more(np.unique(ids).tolist()),
            )  # fmt: skip


def clip_xyxy(bboxes: np.ndarray, widths: Any, heights: Any) -> np.ndarray:
    """(n, 4) XYXY boxes of COCO ``[x, y, width, height]`` boxes, clipped to images of the given sizes."""
    limits = np.stack(np.broadcast_arrays(widths, heights), -1).astype(np.float64).reshape(-1, 2)
    near = np.minimum(np.maximum(bboxes[:, :2], 0), limits)
    far = np.minimum(np.maximum(bboxes[:, :2] + bboxes[:, 2:], 0), limits)
    return np.concatenate([near, far], 1)


def _map_arrays(folder: Path) -> dict[str, np.ndarray]:
    return {path.stem: np.load(path, mmap_mode="r") for path in sorted(folder.glob("*.npy"))}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


_OPEN: dict[tuple, CocoAnnotations] = {}  # per process: every reader of a file shares one store


def load_coco_annotations(
    path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, cache: bool = True
) -> CocoAnnotations:
    """Opens the store of a COCO instances file, building (and validating) it on first use.

    The store is written under ``cache_dir / "coco" / <sha256 of the file>`` (default
    `backbones.data.cache.default_cache_dir`, i.e. ``$RESBONE_CACHE``), atomically, so concurrent
    processes are safe; later calls in any process memory-map it. The hash of a file is remembered
    with its path and its identity (size, mtime, and the inode and ctime that a rewrite cannot keep, even
    one that restores the mtime as `cp -p`, `rsync -a` and `tar` do), so an unchanged file is not read again.
    Within a process the same unchanged file gives the same object. If the cache cannot be written the store
    is kept in memory.

    Args:
        path: the COCO instances JSON.
        cache_dir: root of the cache (the store goes into its ``coco`` sub-folder).
        cache: False builds in memory, without reading or writing the cache.

    Raises:
        FileNotFoundError: the file does not exist.
        AnnotationFileError: invalid JSON (with line and column), a missing top-level key or entry
            field, a malformed ``bbox`` or ``segmentation``, an annotation referring to an unknown
            category or image, or an RLE whose size differs from its image's; the file, the
            annotation id and the field are named.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    identity = _file_identity(path)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = (str(path.resolve()), *identity.values(), str(root), cache)
    if key not in _OPEN:
        _OPEN[key] = _open(path, root / "coco", identity["size"]) if cache else _build_in_memory(path)
        _OPEN[key].warn_degenerate_polygons()
    return _OPEN[key]


def _build_in_memory(path: Path) -> CocoAnnotations:
    arrays, categories = build_arrays(path)
    return CocoAnnotations(path, arrays, categories, None)


def _file_identity(path: Path) -> dict[str, int]:
    """What tells a file's content has not changed without reading it: size, mtime, and inode and ctime.

    Size and mtime alone can be kept by a rewrite (`cp -p`, `rsync -a` and `tar` restore the mtime);
    the ctime cannot be set back by a user, and a copy that replaces the file has another inode.
    """
    stat = path.stat()
    return {
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "ctime_ns": stat.st_ctime_ns,
        "inode": stat.st_ino,
        "device": stat.st_dev,
    }


def _content_hash(path: Path, root: Path) -> str:
    """The file's sha256; remembered per path and `_file_identity` so that an unchanged file is not read again."""
    record = root / "hashes" / f"{hashlib.sha256(str(path.resolve()).encode()).hexdigest()}.json"
    known = _file_identity(path)
    try:
        remembered = json.loads(record.read_text())
        if {key: remembered.get(key) for key in known} == known:
            return remembered["sha256"]
    except (OSError, ValueError, KeyError):
        pass  # not remembered yet, or unreadable: hash the file
    digest = _sha256(path)
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        staging = record.with_suffix(f".{os.getpid()}.tmp")
        staging.write_text(json.dumps({**known, "sha256": digest}))
        os.replace(staging, record)
    except OSError:
        pass  # a read-only cache: hash again next time
    return digest


def _open(path: Path, root: Path, size: int) -> CocoAnnotations:
    digest = _content_hash(path, root)
    folder = root / digest
    marker = {"format": FORMAT_VERSION, "size": size, "sha256": digest}
    built: list[CocoAnnotations] = []

    def write(staging: Path) -> None:
        built.append(_build_in_memory(path))
        for name, array in built[0]._arrays.items():
            np.save(staging / f"{name}.npy", array)
        (staging / "categories.json").write_text(json.dumps(built[0].categories))

    try:
        build_once(folder, marker, write)
    except OSError as error:  # a read-only or full cache disk: still usable, one copy per process
        logger.warning("%s: cannot cache its annotation store in %s (%s); keeping it in memory", path, folder, error)
        return built[0] if built else _build_in_memory(path)
    categories = json.loads((folder / "categories.json").read_text())
    return CocoAnnotations(path, _map_arrays(folder), categories, folder)


def check_images_exist(store: CocoAnnotations, images: Path) -> None:
    """Raises FileNotFoundError naming the image folder and a few of the files it lacks."""
    if not images.is_dir():
        raise FileNotFoundError(f"image folder {images} (for {store.path}) does not exist")
    present = set(os.listdir(os.fsencode(images)))  # compared as bytes: no string per image is made
    names, offsets = store.file_name_bytes.tobytes(), store.file_name_offsets.tolist()
    absent = (names[a:b] for a, b in pairwise(offsets) if names[a:b] not in present)
    missing = [n.decode() for n in absent if not (images / n.decode()).is_file()]  # is_file: in sub-folders
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {store.num_images} images listed in {store.path} are missing "
            f"from {images}, e.g. {', '.join(missing[:MAX_NAMES_IN_ERROR])}"
        )
