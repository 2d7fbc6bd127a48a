"""The shape contract between a backbone and whatever reads its features."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .layers import keep_frozen_norms_in_eval

__all__ = ["OUTPUT_STRIDES", "Backbone", "FeatureInfo", "feature_name", "feature_stride", "output_shape"]

OUTPUT_STRIDES = (8, 16, 32)


@dataclass(frozen=True)
class FeatureInfo:
    """One output of a backbone: its dict key, channel count and stride w.r.t. the input."""

    name: str
    channels: int
    stride: int


def output_shape(feature_info: list[FeatureInfo]) -> dict[str, FeatureInfo]:
    """The outputs a backbone's `forward` returns, by name, known before it runs."""
    return {info.name: info for info in feature_info}


class Backbone(nn.Module):
    """A module whose `forward` returns an ordered dict of features, described by `feature_info`.

    Subclasses set `feature_info` (a list of `FeatureInfo`, in output order) while they build. Batch
    norms frozen with `backbones.layers.freeze_module` (the frozen stages) stay in eval mode in training.
    """

    feature_info: list[FeatureInfo]

    def train(self, mode: bool = True):
        super().train(mode)
        keep_frozen_norms_in_eval(self)
        return self

    def output_shape(self) -> dict[str, FeatureInfo]:
        """The outputs `forward` returns, by name, known before it runs (detectron2's `output_shape`)."""
        return output_shape(self.feature_info)


def feature_stride(index: int, output_stride: int = 32) -> int:
    """The stride of output `index` (0 = stem at 2, 1..4 = c2..c5 at 4..32); past `output_stride` the
    strides stop growing and become dilation."""
    return min(2 ** (index + 1), output_stride)


def feature_name(index: int) -> str:
    """The key of output `index`: 0 is the stem (`stem`), 1 to 4 are the stages (`c2` to `c5`)."""
    return "stem" if index == 0 else f"c{index + 1}"


def check_out_indices(out_indices: tuple[int, ...], num_outputs: int = 5) -> tuple[int, ...]:
    out_indices = tuple(out_indices)
    if (
        not out_indices
        or any(not 0 <= i < num_outputs for i in out_indices)
        or sorted(set(out_indices)) != list(out_indices)
    ):
        raise ValueError(
            f"out_indices={out_indices}; choose increasing indices in 0..{num_outputs - 1} "
            "(0 = stem, 1..4 = stages c2..c5)"
        )
    return out_indices


def check_output_stride(output_stride: int) -> int:
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride={output_stride}; choose 8, 16 or 32")
    return output_stride
