"""Build-once cache folders: written to a temporary folder beside the target, then renamed.

An interrupted run never leaves half a folder, and concurrent builders (DDP ranks) are safe: the
loser of the rename race finds the winner's complete copy.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["MARKER", "build_once", "default_cache_dir", "is_complete", "publish"]

MARKER = "COMPLETE"  # written last; holds the parameters the folder was built with


def default_cache_dir() -> Path:
    """`$RESBONE_CACHE` if set, else `~/.cache/resbone`."""
    return Path(os.environ.get("RESBONE_CACHE") or Path.home() / ".cache" / "resbone")


def _normalised(marker: dict) -> dict:
    return json.loads(json.dumps(marker))  # tuples become lists, as they come back from the file


def is_complete(root: Path, marker: dict) -> bool:
    """True if `root` was built with `marker`; a folder built with other parameters is an error."""
    path = root / MARKER
    if not path.is_file():
        return False
    found, wanted = json.loads(path.read_text()), _normalised(marker)
    if found != wanted:
        raise ValueError(
            f"{root} holds a dataset generated with {found}, but {wanted} was requested; "
            "choose another root or delete that folder"
        )
    return True


def publish(staging: Path, root: Path, marker: dict) -> None:
    """Marks the finished `staging` folder complete and renames it to `root`; tolerates losing a race."""
    (staging / MARKER).write_text(json.dumps(_normalised(marker)))
    try:
        os.replace(staging, root)
    except OSError:
        if not is_complete(root, marker):  # another process may have just won the race
            raise


def build_once(root: str | os.PathLike, marker: dict, write: Callable[[Path], None]) -> Path:
    """Returns `root`, calling `write(folder)` to build it unless a complete copy is already there."""
    root = Path(root)
    if is_complete(root, marker):
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):  # not ours to delete
        raise FileExistsError(
            f"{root} exists but is not a complete dataset (no {MARKER} marker); delete it or choose another root"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        write(staging)
        publish(staging, root, marker)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
