"""Any timm model as a backbone, with the same dict-and-shapes interface as ours."""

from __future__ import annotations

import difflib
import math
import warnings
from collections import OrderedDict
from collections.abc import Sequence

import timm
import torch
from torch import Tensor, nn

from .features import Backbone, FeatureInfo, check_out_indices, check_output_stride, feature_name
from .layers import NormLayer, freeze_module, replace_batch_norms

__all__ = ["TimmBackbone", "check_timm_name"]


class TimmBackbone(Backbone):
    """Wraps `timm.create_model(..., features_only=True)`.

    Outputs are chosen and named by stride, as for our ResNets: index i is the feature at stride
    2**(i+1), named `stem` or `c{i+1}`, whatever timm's own numbering of that model.

    The model is built with timm's own norms, then `norm` is applied to its batch norms
    (`backbones.layers.replace_batch_norms`; timm's fused norm + activation layers keep their
    activation); models without batch norms (ConvNeXt) keep their norms. `frozen_stages=k` freezes
    every module before the stride-4 stage (the stem) and the stages up to the one that outputs
    index k, found by the module names of timm's `feature_info`.
    """

    def __init__(
        self,
        model_name: str,
        *,
        weights: str | None = None,
        out_indices: Sequence[int] = (1, 2, 3, 4),
        output_stride: int = 32,
        norm: str | NormLayer = "bn",
        frozen_stages: int = -1,
        **kwargs,
    ):
        super().__init__()
        check_output_stride(output_stride)
        out_indices = check_out_indices(tuple(out_indices))
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages={frozen_stages}; choose -1 (none), 0 (stem) up to 4")
        check_timm_name(model_name)
        stage_modules = _stage_modules(model_name)  # our index -> timm's feature module name
        missing = [i for i in out_indices if i not in stage_modules]
        if missing:
            raise ValueError(
                f"timm model {model_name!r} has no output at out_indices {missing}; it has {sorted(stage_modules)}"
            )
        self.model = _create(
            model_name, pretrained=weights == "timm", features_only=True,
            out_indices=tuple(stage_modules[i][0] for i in out_indices), output_stride=output_stride, **kwargs,
        )  # fmt: skip
        # timm's own shapes of the built model, dilation included (its reductions stop at output_stride)
        timm_info = self.model.feature_info
        self.feature_info = [
            FeatureInfo(feature_name(i), channels, reduction)
            for i, channels, reduction in zip(out_indices, timm_info.channels(), timm_info.reduction(), strict=True)
        ]
        if norm != "bn" and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules()):
            warnings.warn(f"timm model {model_name!r} has no batch norm: norm={norm!r} changes nothing", stacklevel=3)
        self.model = replace_batch_norms(self.model, norm)
        self.frozen_stages = frozen_stages
        if frozen_stages >= 0:
            for module in _modules_to_freeze(self.model, model_name, stage_modules, frozen_stages, max(out_indices)):
                freeze_module(module, recurse=False)
        if weights is not None and weights != "timm":
            from .weights import load_weights

            load_weights(self, weights)

    def convert_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Maps a timm classifier's keys onto the features-only model, which flattens some names
        (`stem.0` becomes `stem_0`, `stages.1` becomes `stages_1`) and lives under `model.`."""
        own = set(self.state_dict())
        converted = {}
        for key, value in state_dict.items():
            candidates = (f"model.{key}", "model." + key.replace(".", "_", 1))
            converted[next((c for c in candidates if c in own), key)] = value
        return converted

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return OrderedDict((info.name, f) for info, f in zip(self.feature_info, self.model(x), strict=True))


def check_timm_name(model_name: str) -> None:
    """Raises a `KeyError` naming the closest timm models when `model_name` (tag allowed) is not one."""
    if timm.is_model(model_name):
        return
    close = difflib.get_close_matches(model_name.split(".", 1)[0], timm.list_models(), n=5, cutoff=0.6)
    hint = f"; closest: {', '.join('timm/' + c for c in close)}" if close else "; see timm.list_models()"
    raise KeyError(f"unknown timm model {model_name!r}{hint}")


def _stage_modules(model_name: str) -> dict[int, tuple[int, str]]:
    """Our output index -> (timm's feature index, its module name), from a model built on the meta
    device (no memory, no initialisation) at output stride 32, where the reductions are 2, 4, ... 32."""
    with torch.device("meta"):
        probe = timm.create_model(model_name, pretrained=False, features_only=True)
    return {
        int(math.log2(info["reduction"])) - 1: (i, info["module"]) for i, info in enumerate(probe.feature_info.info)
    }


def _create(model_name: str, *, pretrained: bool, **kwargs) -> nn.Module:
    """`timm.create_model`; a failed download is one `WeightsError` line saying what to fetch."""
    try:
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except OSError as error:  # huggingface_hub's and urllib's network errors are OSErrors
        if not pretrained:
            raise
        from .weights import WeightsError, timm_fetch_hint

        raise WeightsError(
            f"could not download timm weights for {model_name!r} ({type(error).__name__}). Offline? "
            + timm_fetch_hint(model_name)
        ) from error


def _modules_to_freeze(
    model: nn.Module, model_name: str, stage_modules: dict[int, tuple[int, str]], frozen_stages: int, last: int
) -> list[nn.Module]:
    """The modules that run before the end of stage `frozen_stages` (before stage 1 for 0), in build
    order, without their ancestors (whose other children run later)."""
    named = list(model.named_modules())
    index = {name: i for i, (name, _) in enumerate(named)}
    stage = min(frozen_stages, last)  # stages past the last output are not built: everything is frozen
    boundary = stage_modules.get(max(stage, 1), (None, None))[1]
    candidates = (boundary, boundary.replace(".", "_", 1), boundary.replace(".", "_")) if boundary else ()
    found = next((c for c in candidates if c in index), None)
    if found is None:
        raise ValueError(
            f"frozen_stages={frozen_stages}: cannot find the stages of timm model {model_name!r} (looked for module "
            f"{boundary!r} among {[n for n, _ in model.named_children()]}); use frozen_stages=-1 and freeze by hand"
        )
    inside = [i for name, i in index.items() if name == found or name.startswith(found + ".")]
    end = max(inside) + 1 if stage >= 1 else min(inside)
    return [module for name, module in named[:end] if not (name == "" or found.startswith(name + "."))]
