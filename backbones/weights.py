"""Weight loading: named tags, URLs checked against their hash, local files and our own checkpoints."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import pickle
import re
import urllib.error
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .weights_table import WEIGHTS, WeightsSpec

__all__ = [
    "WEIGHTS",
    "WeightsError",
    "WeightsSpec",
    "builder_num_classes",
    "checkpoint_holds_weights",
    "class_layer_prefixes",
    "count_classes",
    "fetch_weights",
    "load_checkpoint",
    "load_state_dict",
    "load_task_checkpoint",
    "load_weights",
    "num_classes_of_weights",
    "weights_from_checkpoint",
]

logger = logging.getLogger(__name__)
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.\w+$")  # torch hub's convention: name-<sha256 prefix>.pth
_URL_SCHEMES = ("http://", "https://", "file://")
_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar", ".pkl", ".safetensors")


class WeightsError(ValueError):
    """Weights that cannot be found, read or fitted to the model."""


_CHECKPOINT_HOLDS_WEIGHTS = contextvars.ContextVar("checkpoint_holds_weights", default=False)


@contextlib.contextmanager
def weights_from_checkpoint():
    """Within it, `load_weights` loads nothing: a model built with a weights tag, URL or file gets the
    same architecture (norm policy, frozen stages) but keeps its initial weights, because the checkpoint
    about to be loaded into it strictly holds every one. Nothing is downloaded (offline inference of a
    model fine-tuned from pretrained weights).
    """
    token = _CHECKPOINT_HOLDS_WEIGHTS.set(True)
    try:
        yield
    finally:
        _CHECKPOINT_HOLDS_WEIGHTS.reset(token)


def checkpoint_holds_weights() -> bool:
    """Whether the code runs inside `weights_from_checkpoint()`: the checkpoint about to be loaded is the truth,
    also for the number of classes (a weights tag fetches nothing and decides nothing)."""
    return _CHECKPOINT_HOLDS_WEIGHTS.get()


def class_layer_prefixes(class_layers: Sequence[str]) -> tuple[str, ...]:
    """The state-dict key prefixes of the class layers (`load_state_dict`'s `head_prefixes`).

    Example:
        >>> class_layer_prefixes(("fc", "head.fc"))
        ('fc.', 'head.fc.')
    """
    return tuple(f"{layer}." for layer in class_layers)


def count_classes(state_dict: Mapping[str, Tensor], class_layers: Sequence[str]) -> int | None:
    """The number of classes of `state_dict`: the rows of the weight of the first of `class_layers` it holds.

    Keys match by suffix, so a Lightning checkpoint's (`model.fc.weight`) counts as a plain one's
    (`fc.weight`). None: no class layer found.

    Example:
        >>> count_classes({"model.fc.weight": torch.zeros(10, 512)}, ("fc", "head.fc"))
        10
    """
    for layer in class_layers:
        suffix = f"{layer}.weight"
        for key, value in state_dict.items():
            if key == suffix or key.endswith("." + suffix):
                return int(value.shape[0])
    return None


def num_classes_of_weights(
    num_classes: int | None,
    weights: str | os.PathLike | None,
    table: Mapping[str, WeightsSpec],
    *,
    fresh_heads: bool = False,
    argument: str = "weights",
) -> int | None:
    """`num_classes` filled from a weights tag, as torchvision's `weights=` fills it.

    A tag of `table` whose class layers are loaded (not `fresh_heads`) gives its `spec.num_classes`; a
    value given must be the same (inside `weights_from_checkpoint()` the given one wins: the checkpoint
    holds the class layers). Anything else (no weights, a file, fresh heads) returns `num_classes` as given.

    Raises:
        ValueError: `num_classes` differs from the tag's; the message names both values and the tag.

    Example:
        >>> num_classes_of_weights(None, "resnet50.tv_in1k", WEIGHTS)
        1000
    """
    spec = table.get(str(weights)) if weights is not None and not fresh_heads else None
    if spec is None:
        return num_classes
    if num_classes is None:
        return spec.num_classes
    if int(num_classes) != spec.num_classes and not checkpoint_holds_weights():
        raise ValueError(
            f"num_classes={num_classes}, but the {argument} {str(weights)!r} ({spec.source}) have "
            f"num_classes={spec.num_classes}; drop num_classes to use theirs, or set fresh_heads: true to train "
            "the class layers anew for another number of classes"
        )
    return int(num_classes)


def builder_num_classes(
    num_classes: int | None, weights: str | None, table: Mapping[str, WeightsSpec], *, fresh_heads: bool, where: str
) -> int:
    """A model builder's `num_classes`: the given one, else the weights tag's (`num_classes_of_weights`).

    Raises:
        ValueError: none given and `weights` is no tag of `table` (named by `where`), or a conflict with the tag.
    """
    resolved = num_classes_of_weights(num_classes, weights, table, fresh_heads=fresh_heads)
    if resolved is None:
        why = (
            "fresh_heads trains the class layers anew"
            if str(weights) in table
            else f"weights={weights!r} is no tag of {where}, whose tags give it"
        )
        raise ValueError(f"num_classes is not given and {why}; give num_classes, background included")
    return resolved


def cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def fetch_weights(weights: str | os.PathLike, table: dict[str, WeightsSpec] | None = None) -> Path:
    """Resolves a tag (of `table`, default `WEIGHTS`), URL or path to a local file.

    Tags and URLs are downloaded into the torch hub cache once and checked against their hash.
    """
    weights, table = str(weights), WEIGHTS if table is None else table
    if weights in table:
        return _download(table[weights].url, tag=weights)
    if weights.startswith(_URL_SCHEMES):
        return _download(weights)
    path = Path(weights).expanduser()
    if path.is_file():
        return path
    if "." in weights and "/" not in weights and path.suffix not in _FILE_SUFFIXES:
        arch = weights.split(".", 1)[0]
        known = sorted(t for t in table if t.startswith(arch + "."))
        raise WeightsError(f"unknown weights tag {weights!r}; tags for {arch}: {', '.join(known) or 'none'}")
    raise FileNotFoundError(f"weights file {str(path)!r} does not exist (nor is it a known tag or a URL)")


def _download(url: str, tag: str | None = None) -> Path:
    file_name = url.rsplit("/", 1)[-1]
    match = _HASH_IN_NAME.search(file_name)
    if match is None:
        raise WeightsError(
            f"the URL {url!r} has no SHA-256 prefix in its file name (name-<hash>.pth), so it cannot be "
            "checked; download it yourself and pass the local path"
        )
    target = cache_dir() / file_name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s to %s", url, target)
    try:
        torch.hub.download_url_to_file(url, str(target), hash_prefix=match.group(1), progress=False)
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        what = f"weights {tag!r}" if tag else "weights"
        raise WeightsError(
            f"could not download {what} from {url} ({error}). Offline? Fetch that file on a machine with "
            f"internet and put it at {target}, or pass weights='/path/to/{file_name}'"
        ) from error
    except RuntimeError as error:  # torch hub's hash mismatch; it already removed the partial file
        raise WeightsError(f"{url}: {error}") from error
    return target


def timm_fetch_hint(model_name: str) -> str:
    """Where to get timm's pretrained weights for `model_name` by hand, and how to pass them."""
    import timm

    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is not None and cfg.hf_hub_id:
        url = f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/model.safetensors"
        return f"Fetch {url} on a machine with internet and pass weights='/path/to/model.safetensors'"
    if cfg is not None and cfg.url:
        return f"Fetch {cfg.url} on a machine with internet and pass weights='/path/to/{cfg.url.rsplit('/', 1)[-1]}'"
    return f"timm lists no download for {model_name!r}; pass a local weights file"


def load_checkpoint(path: str | os.PathLike, what: str = "weights file") -> object:
    """`torch.load(path, weights_only=True)` on the CPU; a file that could run code, or a corrupt one,
    is a `WeightsError` naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise WeightsError(_refused(path, error)) from error
    except Exception as error:  # torch's unpickler fails in many ways on a corrupt or foreign file
        raise WeightsError(
            f"cannot read {what} {str(path)!r}: {type(error).__name__}: {error} ({_UNREADABLE})"
        ) from error


def load_task_checkpoint(task_class: type, path: str | os.PathLike, **kwargs: object) -> nn.Module:
    """`task_class.load_from_checkpoint(path, weights_only=True, **kwargs)` for the tools.

    The task's model is built as it was trained, but its pretrained weights (`weights`,
    `backbone_weights`) are not fetched: the checkpoint holds them (`weights_from_checkpoint`).

    Raises:
        FileNotFoundError: no such file.
        WeightsError: the file could run code, is corrupt or truncated, or is not a checkpoint of
            `task_class` (another task's, another architecture's); the message names the file.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        with weights_from_checkpoint():  # the task's pretrained weights are in the checkpoint: fetch none
            return task_class.load_from_checkpoint(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as error:
        raise WeightsError(_refused(path, error)) from error
    except Exception as error:  # torch.load, the task's constructor or the strict state dict load
        unreadable = isinstance(error, (OSError, EOFError)) or "PytorchStreamReader" in str(error)
        raise WeightsError(
            f"cannot load {str(path)!r} as a {task_class.__name__} checkpoint: {type(error).__name__}: {error}"
            + (f" ({_UNREADABLE})" if unreadable else "")
        ) from error


_UNREADABLE = "the file is truncated or corrupt, or was not written by torch.save"


def _refused(path: str | os.PathLike, error: Exception) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    # torch's message opens with advice to load with weights_only=False; the line naming the object is the reason
    reason = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else "")
    return (
        f"refused to load {str(path)!r}: it is not a plain weights file (torch.load with weights_only=True "
        f"rejects objects that could run code): {reason}"
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Reads a state dict with `weights_only=True` (or a `.safetensors` file, as the Hugging Face hub
    serves timm's weights); unwraps Lightning and whole-model checkpoints."""
    if str(path).endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:
            raise WeightsError(f"cannot read weights file {str(path)!r}: {error} ({_UNREADABLE})") from error
    checkpoint = load_checkpoint(path)
    for key in ("state_dict", "model", "module"):  # Lightning, torchvision references, DDP wrappers
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, Tensor) for v in checkpoint.values()):
        raise WeightsError(f"{str(path)!r} holds no state dict of tensors")
    return checkpoint


def _align_prefix(state_dict: dict[str, Tensor], model_keys: list[str]) -> dict[str, Tensor]:
    """Strips or adds the prefix that separates checkpoint keys from model keys (`model.backbone.`, `body.`)."""
    if not model_keys or model_keys[0] in state_dict:
        return state_dict
    anchor = model_keys[0]
    parts = anchor.split(".")
    for cut in range(len(parts) - 1):  # the longest suffix of the anchor key found in the checkpoint
        suffix = ".".join(parts[cut:])
        hits = [k for k in state_dict if k == suffix or k.endswith("." + suffix)]
        if hits:
            ckpt_prefix = min(hits, key=len)[: -len(suffix)]
            model_prefix = anchor[: -len(suffix)]
            return {model_prefix + k[len(ckpt_prefix) :]: v for k, v in state_dict.items() if k.startswith(ckpt_prefix)}
    return state_dict


def load_state_dict(
    model: nn.Module,
    state_dict: dict[str, Tensor],
    *,
    head_prefixes: tuple[str, ...] = (),
    source: str = "weights",
    fresh_heads: bool = True,
) -> None:
    """Loads `state_dict` strictly, with errors that name every missing, unexpected or misshapen key.

    Keys under a top-level module the model does not have (a classifier's `fc` for a backbone, the
    stages a backbone left out) are dropped. Keys under `head_prefixes` (the class-specific layers)
    that are missing or of another shape leave the head as initialised, with a warning (fine-tuning
    to another number of classes); with `fresh_heads=False` they are errors too, whose message
    suggests `fresh_heads=True`.
    """
    if hasattr(model, "convert_state_dict"):
        state_dict = model.convert_state_dict(state_dict)
    own = model.state_dict()
    state_dict = _align_prefix(state_dict, list(own))
    top_level = {k.split(".", 1)[0] for k in own}
    state_dict = {k: v for k, v in state_dict.items() if k.split(".", 1)[0] in top_level}

    def is_head(key: str) -> bool:
        return key.startswith(head_prefixes) if head_prefixes and fresh_heads else False

    mismatched = [
        (k, tuple(v.shape), tuple(own[k].shape)) for k, v in state_dict.items() if k in own and v.shape != own[k].shape
    ]
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in own and not k.endswith("num_batches_tracked")]
    head_issues = [m[0] for m in mismatched if is_head(m[0])] + [k for k in missing if is_head(k)]
    mismatched = [m for m in mismatched if not is_head(m[0])]
    missing = [k for k in missing if not is_head(k)]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}")
    if mismatched:
        shapes = "; ".join(f"{k}: checkpoint {a} vs model {b}" for k, a, b in mismatched[:20])
        problems.append(f"shape mismatches ({len(mismatched)}): {shapes}")
    if problems:
        message = f"{source} do not fit {type(model).__name__}: " + " | ".join(problems)
        keys = [m[0] for m in mismatched] + missing
        if head_prefixes and not fresh_heads and not unexpected and all(k.startswith(head_prefixes) for k in keys):
            message += (
                f". Only the class-specific layers ({', '.join(head_prefixes)}) differ, as with another number of "
                "classes: pass fresh_heads=True (in a config: model.fresh_heads: true) to load everything else "
                "and start them fresh"
            )
        raise WeightsError(message)
    if head_issues:
        logger.warning("%s: head left as initialised for %s", source, ", ".join(head_issues))
        state_dict = {k: v for k, v in state_dict.items() if k not in head_issues}
    model.load_state_dict(state_dict, strict=False)


def load_weights(
    model: nn.Module,
    weights: str | os.PathLike,
    *,
    head_prefixes: tuple[str, ...] = (),
    fresh_heads: bool = True,
    table: dict[str, WeightsSpec] | None = None,
) -> nn.Module:
    """Loads a weights tag (`resnet50.tv_in1k`), a URL or a local file into `model`, strictly.

    Accepts torchvision and timm state dicts, whole-model classification checkpoints (the fc is
    dropped for a backbone) and Lightning checkpoints (the `state_dict`, with its prefix stripped).
    `table` resolves tags (default: the backbone table, `WEIGHTS`); `head_prefixes` and `fresh_heads`
    are `load_state_dict`'s. Inside `weights_from_checkpoint()` it loads nothing.
    """
    if _CHECKPOINT_HOLDS_WEIGHTS.get():
        return model
    path = fetch_weights(weights, table=table)
    load_state_dict(
        model, read_state_dict(path), head_prefixes=head_prefixes, fresh_heads=fresh_heads,
        source=f"weights {str(weights)!r}",
    )  # fmt: skip
    return model
