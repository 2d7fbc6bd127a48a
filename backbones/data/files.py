"""Files every tool and data module shares: which files are images, listing them, and atomic writes.

Imports neither OpenCV (only `write_image` does, when called) nor Lightning.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Callable
from pathlib import Path

__all__ = ["IMAGE_SUFFIXES", "is_image", "json_safe", "list_images", "write_atomically", "write_image", "write_json"]

# The suffixes (lower case) read as images everywhere: OpenCV decodes them all.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def is_image(path: str | os.PathLike) -> bool:
    """Whether `path` has one of `IMAGE_SUFFIXES` (in any case)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def list_images(
    source: str | os.PathLike, *, recursive: bool = False, exclude: str | os.PathLike | None = None
) -> list[Path]:
    """The image files of a folder, sorted by path; a file is returned as it is.

    Args:
        source: an image file or a folder.
        recursive: also search the subfolders (hidden ones, starting with ".", are skipped).
        exclude: a folder inside `source` whose contents are never listed (a tool's output folder,
            so that a second run does not read the pictures of the first); ignored elsewhere.

    Raises:
        FileNotFoundError: `source` does not exist, or the folder holds no image.
    """
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such image or folder")
    candidates = source.rglob("*") if recursive else source.iterdir()
    excluded = Path(exclude).resolve() if exclude is not None else None
    if excluded is not None and (excluded == source.resolve() or not excluded.is_relative_to(source.resolve())):
        excluded = None
    images = sorted(
        path
        for path in candidates
        if is_image(path)
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(source).parts)
        and (excluded is None or not path.resolve().is_relative_to(excluded))
    )
    if not images:
        hint = "" if recursive else "; --recursive also searches its subfolders"
        raise FileNotFoundError(f"{source}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder{hint}")
    return images


def write_atomically(path: str | os.PathLike, data: bytes | str | Callable[[Path], object]) -> Path:
    """Writes `data` to a temporary file beside `path`, then renames it to `path`.

    A reader never sees a half-written file at `path`, and a failed write leaves none behind. The
    file gets a new file's usual permissions (0666 less the umask, e.g. 0644), which
    `tempfile.mkstemp` (0600) would not give.

    Args:
        path: the file to write; its folder is created if needed.
        data: the contents (str as UTF-8), or a function that writes the file whose path it is given,
            e.g. `lambda tmp: torch.save(state, tmp)`.

    Returns:
        `path`, as a `Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _create_temporary(path)
    try:
        if callable(data):
            data(temporary)
        else:
            temporary.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def json_safe(value):
    """`value` with every float nan replaced by None, in nested dicts, lists and tuples (JSON has no nan)."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def write_json(path: str | os.PathLike, value, *, indent: int | None = None) -> Path:
    """Writes `value` as JSON atomically (`write_atomically`), nan as null; nothing is written if it cannot
    be serialised."""
    text = json.dumps(json_safe(value), indent=indent, allow_nan=False)
    return write_atomically(path, text + "\n")


def write_image(path: str | os.PathLike, image) -> Path:
    """Encodes an RGB (H, W, 3) or single-channel (H, W) uint8 array in the format of `path`'s suffix
    (OpenCV) and writes it atomically (`write_atomically`).

    Raises:
        ValueError: OpenCV cannot encode the array in that format.
    """
    import cv2

    path = Path(path)
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    try:
        encoded, data = cv2.imencode(path.suffix, image)
    except cv2.error as error:
        raise ValueError(f"{path}: OpenCV cannot write this format ({error})") from error
    if not encoded:
        raise ValueError(f"{path}: OpenCV cannot encode the picture as {path.suffix}")
    return write_atomically(path, data.tobytes())


def _create_temporary(path: Path) -> Path:
    # Hidden (a folder listing skips it) and unique; O_EXCL so that two writers never share one.
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode less the umask
            return temporary
        except FileExistsError:
            continue
