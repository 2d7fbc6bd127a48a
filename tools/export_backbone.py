"""Export the network of a checkpoint as a plain state dict (torchvision/timm key names).

    python tools/export_backbone.py runs/resnet50_imagenet/lightning_logs/version_0/checkpoints/last.ckpt \\
        resnet50_in1k.pth
    python tools/export_backbone.py runs/resnet50d_imagenet_cosine/lightning_logs/version_0/checkpoints/last.ckpt \\
        r50d.pth --ema
    python tools/export_backbone.py runs/mask_rcnn_r18_fpn_shapes/lightning_logs/version_0/checkpoints/last.ckpt \\
        r18_det.pth

Each task says which network its checkpoint holds (`TaskExport.network`, see `backbones.tasks`). A
classifier's checkpoint (tools/train_cls.py) gives the whole classifier (`conv1.weight`, `bn1.*`,
`layer1.0.conv1.weight`, ..., `fc.weight`), which loads strictly into `backbones.create_model(name)`,
`create_backbone(name)` (the fc is dropped), the detectors' and DeepLab's `backbone_weights=` and, for
the variants they have, torchvision's and timm's models. A detector's (tools/train_det.py) or DeepLab's
(tools/train_seg.py) checkpoint gives its backbone (a detector's `backbone.body`, DeepLab's `backbone`)
under the plain backbone's names, which `create_backbone(name, weights=FILE)` loads strictly; the tool
prints that call. The checkpoint is read with `torch.load(weights_only=True)`; the output is
checked against a freshly built network and written atomically (temporary file, then rename). Errors
print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import Tensor

from backbones.cli_utils import reports_errors
from backbones.data.files import write_atomically
from backbones.export import NetworkWeights
from backbones.tasks import read_task_checkpoint
from backbones.weights import load_state_dict


class ExportError(ValueError):
    """The checkpoint cannot be exported."""


def network_state_dict(checkpoint: dict, network: NetworkWeights) -> dict[str, Tensor]:
    """The network's weights in the checkpoint, under the names of the network itself (its prefix cut)."""
    state = checkpoint["state_dict"]
    prefix = next((p for p in network.prefixes if any(k.startswith(p) for k in state)), None)
    if prefix is None:
        raise ExportError(f"the checkpoint holds no {network.what} ({' or '.join(network.prefixes)}*)")
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def check_fits(state: dict[str, Tensor], network: NetworkWeights) -> None:
    """Loads `state` strictly into a freshly built network, as a user of the export would."""
    try:
        load_state_dict(network.build(), state, source="exported weights")
    except (KeyError, ValueError, TypeError) as error:
        raise ExportError(f"the {network.what} do not fit {network.fits}: {error}") from error


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
    entry, loaded = read_task_checkpoint(checkpoint)
    hparams, adapter = loaded["hyper_parameters"], entry.export_adapter()
    if ema and not adapter.has_ema:
        raise ExportError(f"{hparams['model']!r} is a {entry.name} checkpoint, which holds no EMA weights; drop --ema")
    network = adapter.network(hparams, ema=ema)
    try:
        state = _detached(network_state_dict(loaded, network))
    except ExportError:
        if ema:
            raise ExportError(
                "the checkpoint holds no EMA weights (trained with ema_decay: null); drop --ema"
            ) from None
        raise
    check_fits(state, network)
    write_atomically(output, lambda temporary: torch.save(state, temporary))
    return state, network.load_call.format(weights=repr(str(output)))


def _detached(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


@reports_errors("export_backbone")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="export_backbone", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint of a training tool (tools/train_*.py, .ckpt)")
    parser.add_argument("output", help="where to write the state dict (.pth)")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the trained ones")
    args = parser.parse_args(argv)
    state, load_call = _export(args.checkpoint, args.output, ema=args.ema)
    which = "EMA weights" if args.ema else "weights"
    print(f"wrote {len(state)} tensors ({which}) to {args.output}; load them with {load_call}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
