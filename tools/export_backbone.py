"""Export the network of a checkpoint as a plain state dict (torchvision/timm key names).

    python tools/export_backbone.py runs/resnet50_imagenet/lightning_logs/version_0/checkpoints/last.ckpt \\
        resnet50_in1k.pth
    python tools/export_backbone.py runs/resnet50d_imagenet_cosine/lightning_logs/version_0/checkpoints/last.ckpt \\
        r50d.pth --ema
    python tools/export_backbone.py runs/mask_rcnn_r18_fpn_shapes/lightning_logs/version_0/checkpoints/last.ckpt \\
        r18_det.pth

A classification checkpoint (tools/train_cls.py) gives the whole classifier (`conv1.weight`, `bn1.*`,
`layer1.0.conv1.weight`, ..., `fc.weight`), which loads strictly into `backbones.create_model(name)`,
`create_backbone(name)` (the fc is dropped), detection's and segmentation's `backbone_weights=` and, for
the variants they have, torchvision's and timm's models. A detection (tools/train_det.py) or
segmentation (tools/train_seg.py) checkpoint gives its backbone (a detector's `backbone.body`, DeepLab's
`backbone`) under the plain backbone's names, which `create_backbone(name, weights=FILE)` loads strictly;
the tool prints that call. The checkpoint is read with `torch.load(weights_only=True)`; the output is
checked against a freshly built network and written atomically (temporary file, then rename). Errors
print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

from backbones.data.files import write_atomically
from backbones.registry import create_backbone, create_model
from backbones.training.tools import reports_errors
from backbones.weights import load_checkpoint, load_state_dict
from detection import models as detection_models
from segmentation import models as segmentation_models

MODEL_PREFIX = "model."
EMA_PREFIX = "ema.module."
# Where each task's model keeps the backbone: a detector's FPN wraps it as `body`; DC5 and DeepLab hold it as is.
BACKBONE_PREFIXES = ("model.backbone.body.", "model.backbone.")
# The task of a checkpoint, told by its `model` hyper-parameter; any other name is a classifier.
TASK_MODELS = {
    "detection": (detection_models, {*detection_models.PRESETS, *detection_models.ARCHITECTURES}),
    "segmentation": (segmentation_models, {*segmentation_models.PRESETS, *segmentation_models.ARCHITECTURES}),
}
BARE_ARCHITECTURE_BACKBONE = "resnet50"  # what both build_model()s take for "faster_rcnn", "deeplabv3", ...


class ExportError(ValueError):
    """The checkpoint cannot be exported."""


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Loads a Lightning checkpoint of one of our tasks (tensors and plain values only)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"checkpoint {str(path)!r} does not exist")
    checkpoint = load_checkpoint(path, "checkpoint")
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ExportError(f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict')")
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict) or not isinstance(hparams.get("model"), str) or not hparams.get("num_classes"):
        raise ExportError(
            f"{str(path)!r} has no task hyper-parameters (model, num_classes); was it written by "
            "tools/train_cls.py, train_det.py or train_seg.py?"
        )
    return checkpoint


def task_of(hparams: dict) -> str:
    """ "detection", "segmentation" or "classification", from the checkpoint's `model` name."""
    return next((task for task, (_, names) in TASK_MODELS.items() if hparams["model"] in names), "classification")


def network_state_dict(checkpoint: dict, *, ema: bool = False) -> dict[str, Tensor]:
    """The classifier's weights from the checkpoint: the trained ones, or with `ema` their moving average."""
    prefix = EMA_PREFIX if ema else MODEL_PREFIX
    state = _with_prefix(checkpoint["state_dict"], prefix)
    if not state:
        if ema:
            raise ExportError("the checkpoint holds no EMA weights (trained with ema_decay: null); drop --ema")
        raise ExportError(f"the checkpoint holds no '{MODEL_PREFIX}*' weights")
    return state


def backbone_state_dict(checkpoint: dict) -> dict[str, Tensor]:
    """A detector's or DeepLab's backbone weights, renamed to the plain backbone's names."""
    state = checkpoint["state_dict"]
    prefix = next((p for p in BACKBONE_PREFIXES if any(k.startswith(p) for k in state)), None)
    if prefix is None:
        raise ExportError(f"the checkpoint holds no backbone weights ({' or '.join(BACKBONE_PREFIXES)}*)")
    return _with_prefix(state, prefix)


def backbone_call(hparams: dict, task: str) -> tuple[str, dict]:
    """The registered backbone name and the `create_backbone` options that rebuild a task's backbone."""
    module, _ = TASK_MODELS[task]
    options = dict(hparams.get("model_options") or {})
    name = hparams.get("backbone") or options.get("backbone")  # the segmentation task has its own `backbone`
    name = name or module.PRESETS.get(hparams["model"], {}).get("backbone", BARE_ARCHITECTURE_BACKBONE)
    # Batch norm, frozen or not, has the same weights; group norm has other ones.
    return name, ({"norm": "gn"} if options.get("norm") == "gn" else {})


def check_fits(state: dict[str, Tensor], hparams: dict) -> None:
    """Loads `state` strictly into a freshly built classifier of the checkpoint's architecture."""
    options = dict(hparams.get("model_options") or {})
    try:
        model = create_model(hparams["model"], num_classes=int(hparams["num_classes"]), **options)
        load_state_dict(model, state, source="exported weights")
    except (KeyError, ValueError, TypeError) as error:
        raise ExportError(f"the weights do not fit {hparams['model']!r}: {error}") from error


def check_backbone_fits(state: dict[str, Tensor], name: str, options: dict) -> None:
    """Loads `state` strictly into `create_backbone(name, **options)`, as a user of the export would."""
    try:
        load_state_dict(create_backbone(name, **options), state, source="exported weights")
    except (KeyError, ValueError, TypeError) as error:
        raise ExportError(f"the backbone weights do not fit {_call(name, options, '...')}: {error}") from error


def export_backbone(
    checkpoint: str | os.PathLike, output: str | os.PathLike, *, ema: bool = False
) -> dict[str, Tensor]:
    """Reads `checkpoint`, checks the network's weights against a fresh model and writes them to `output`.

    Example:
        >>> state = export_backbone("last.ckpt", "resnet18_shapes.pth")
        >>> list(state)[:3]
        ['conv1.weight', 'bn1.weight', 'bn1.bias']
    """
    return _export(checkpoint, output, ema=ema)[0]


def _export(checkpoint: str | os.PathLike, output: str | os.PathLike, *, ema: bool) -> tuple[dict[str, Tensor], str]:
    """The exported weights, and the call that loads them (for the tool's last line)."""
    loaded = read_checkpoint(checkpoint)
    hparams, task = loaded["hyper_parameters"], task_of(loaded["hyper_parameters"])
    if task == "classification":
        state = _detached(network_state_dict(loaded, ema=ema))
        check_fits(state, hparams)
        load_call = f"create_model({hparams['model']!r}, weights={str(output)!r}) or create_backbone(...)"
    else:
        if ema:
            raise ExportError(f"{hparams['model']!r} is a {task} checkpoint, which holds no EMA weights; drop --ema")
        state = _detached(backbone_state_dict(loaded))
        name, options = backbone_call(hparams, task)
        check_backbone_fits(state, name, options)
        load_call = _call(name, options, repr(str(output)))
    write_atomically(output, lambda temporary: torch.save(state, temporary))
    return state, load_call


def _call(name: str, options: dict, weights: str) -> str:
    extra = "".join(f", {key}={value!r}" for key, value in options.items())
    return f"create_backbone({name!r}{extra}, weights={weights})"


def _with_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _detached(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


@reports_errors("export_backbone")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="export_backbone", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint of tools/train_cls.py, train_det.py or train_seg.py (.ckpt)")
    parser.add_argument("output", help="where to write the state dict (.pth)")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the trained ones")
    args = parser.parse_args(argv)
    state, load_call = _export(args.checkpoint, args.output, ema=args.ema)
    which = "EMA weights" if args.ema else "weights"
    print(f"wrote {len(state)} tensors ({which}) to {args.output}; load them with {load_call}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
