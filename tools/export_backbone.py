"""Export the network of a classification checkpoint as a plain state dict (torchvision/timm key names).

    python tools/export_backbone.py runs/resnet50_imagenet/lightning_logs/version_0/checkpoints/last.ckpt resnet50_in1k.pth
    python tools/export_backbone.py runs/resnet50d_imagenet_cosine/lightning_logs/version_0/checkpoints/last.ckpt r50d.pth --ema

The output (`conv1.weight`, `bn1.*`, `layer1.0.conv1.weight`, ..., `fc.weight`) loads strictly into
`backbones.create_model(name)`, `create_backbone(name)` (the fc is dropped), detection's and
segmentation's `backbone_weights=` and, for the variants they have, torchvision's and timm's models.
The checkpoint is read with `torch.load(weights_only=True)`; the output is checked against a freshly
built network and written atomically (temporary file, then rename). Errors exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from backbones.registry import create_model
from backbones.weights import WeightsError, load_checkpoint, load_state_dict

MODEL_PREFIX = "model."
EMA_PREFIX = "ema.module."


class ExportError(ValueError):
    """The checkpoint cannot be exported."""


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Loads a Lightning checkpoint of `ClassificationTask` (tensors and plain values only)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = load_checkpoint(path, "checkpoint")
    except WeightsError as error:
        raise ExportError(str(error)) from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ExportError(f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict')")
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict) or "model" not in hparams or not hparams.get("num_classes"):
        raise ExportError(
            f"{str(path)!r} has no ClassificationTask hyper-parameters (model, num_classes); "
            "was it written by tools/train_cls.py?"
        )
    return checkpoint


def network_state_dict(checkpoint: dict, *, ema: bool = False) -> dict[str, Tensor]:
    """The classifier's weights from the checkpoint: the trained ones, or with `ema` their moving average."""
    prefix = EMA_PREFIX if ema else MODEL_PREFIX
    state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    if not state:
        if ema:
            raise ExportError("the checkpoint holds no EMA weights (trained with ema_decay: null); drop --ema")
        raise ExportError(f"the checkpoint holds no '{MODEL_PREFIX}*' weights")
    return state


def check_fits(state: dict[str, Tensor], hparams: dict) -> None:
    """Loads `state` strictly into a freshly built classifier of the checkpoint's architecture."""
    options = dict(hparams.get("model_options") or {})
    try:
        model = create_model(hparams["model"], num_classes=int(hparams["num_classes"]), **options)
        load_state_dict(model, state, source="exported weights")
    except (KeyError, ValueError, TypeError) as error:
        raise ExportError(f"the weights do not fit {hparams['model']!r}: {error}") from error


def save_atomically(state: dict[str, Tensor], output: str | os.PathLike) -> None:
    """Writes `state` to a temporary file beside `output`, then renames it, so no partial file remains."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{output.name}.tmp-", dir=output.parent)
    os.close(handle)
    try:
        torch.save(state, temporary)
        os.replace(temporary, output)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def export_backbone(checkpoint: str | os.PathLike, output: str | os.PathLike, *, ema: bool = False) -> dict[str, Tensor]:
    """Reads `checkpoint`, checks the network's weights against a fresh model and writes them to `output`.

    Example:
        >>> state = export_backbone("last.ckpt", "resnet18_shapes.pth")
        >>> list(state)[:3]
        ['conv1.weight', 'bn1.weight', 'bn1.bias']
    """
    loaded = read_checkpoint(checkpoint)
    state = {k: v.detach().clone().contiguous() for k, v in network_state_dict(loaded, ema=ema).items()}
    check_fits(state, loaded["hyper_parameters"])
    save_atomically(state, output)
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint of tools/train_cls.py (.ckpt)")
    parser.add_argument("output", help="where to write the state dict (.pth)")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the trained ones")
    args = parser.parse_args(argv)
    try:
        state = export_backbone(args.checkpoint, args.output, ema=args.ema)
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    which = "EMA weights" if args.ema else "weights"
    print(f"wrote {len(state)} tensors ({which}) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
