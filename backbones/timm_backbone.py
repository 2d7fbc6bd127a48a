"""Any timm model as a backbone, with the same dict-and-shapes interface as ours."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import timm
from torch import Tensor, nn

from .features import FeatureInfo, check_out_indices, check_output_stride, feature_name
from .layers import NormLayer, freeze_module, get_norm_layer, keep_frozen_norms_in_eval


class TimmBackbone(nn.Module):
    """Wraps `timm.create_model(..., features_only=True)`.

    Outputs are chosen and named by stride, as for our ResNets: index i is the feature at stride
    2**(i+1), named `stem` or `c{i+1}`, whatever timm's own numbering of that model.
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
        probe = timm.create_model(model_name, pretrained=False, features_only=True)
        by_level = {int(math.log2(r)) - 1: i for i, r in enumerate(probe.feature_info.reduction())}
        missing = [i for i in out_indices if i not in by_level]
        if missing:
            raise ValueError(
                f"timm model {model_name!r} has no output at out_indices {missing}; it has {sorted(by_level)}"
            )
        timm_indices = tuple(by_level[i] for i in out_indices)
        if norm != "bn":
            kwargs["norm_layer"] = get_norm_layer(norm)
        pretrained = weights == "timm"
        self.model = timm.create_model(
            model_name,
            pretrained=pretrained,
            features_only=True,
            out_indices=timm_indices,
            output_stride=output_stride,
            **kwargs,
        )
        self.feature_info = [
            FeatureInfo(feature_name(i), channels, min(2 ** (i + 1), output_stride))
            for i, channels in zip(out_indices, self.model.feature_info.channels())
        ]
        if frozen_stages >= 0:
            freeze_module(self)  # timm's module layouts differ; freezing is all or nothing here
        if weights is not None and not pretrained:
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

    def output_shape(self) -> dict[str, FeatureInfo]:
        return {info.name: info for info in self.feature_info}

    def train(self, mode: bool = True) -> TimmBackbone:
        super().train(mode)
        keep_frozen_norms_in_eval(self)
        return self

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return OrderedDict((info.name, f) for info, f in zip(self.feature_info, self.model(x)))
