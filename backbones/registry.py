"""The doors to the backbones: `register_backbone`, `list_backbones`, `create_backbone`, `create_model`."""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import types
import warnings
from collections.abc import Callable, Iterable, Sequence
from importlib.metadata import entry_points

from torch import nn

__all__ = [
    "ENTRY_POINT_GROUP",
    "UnknownNameError",
    "backbone_options",
    "check_name",
    "check_options",
    "closest_names",
    "create_backbone",
    "create_model",
    "list_backbones",
    "register_backbone",
]  # fmt: skip

ENTRY_POINT_GROUP = "resbone.backbones"
TIMM_PREFIX = "timm/"

# name -> builder(*, features_only, num_classes, out_indices, output_stride, norm, frozen_stages, ...) -> nn.Module
_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_plugins_loaded = False


class UnknownNameError(KeyError, ValueError):
    """A name or option that is not among the allowed ones; the message names the closest.

    A KeyError for the registry's callers, a ValueError for the builders', and printed as its
    message (a KeyError would print quoted).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def closest_names(name: str, choices: Iterable[str], *, otherwise: str = "choose one of") -> str:
    """The hint of an unknown-name error: `"; closest: a, b"` (difflib), or all choices when none is close."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=5, cutoff=0.5)
    return f"; closest: {', '.join(close)}" if close else f"; {otherwise}: {', '.join(choices)}"


def check_name(name: str, choices: Iterable[str], *, what: str, where: str) -> None:
    """Raises `UnknownNameError` when `name` is not among `choices`: `unknown <what> 'x'; closest: ... (<where>)`."""
    choices = list(choices)
    if name not in choices:
        raise UnknownNameError(f"unknown {what} {name!r}{closest_names(name, choices)} ({where})")


def check_options(options: Iterable[str], allowed: Iterable[str], *, where: str) -> None:
    """Raises `UnknownNameError` for the first of `options` not in `allowed`; `where` says where the list is."""
    allowed = set(allowed)
    for key in options:
        if key not in allowed:
            raise UnknownNameError(f"unknown option {key!r}{closest_names(key, allowed)} (the options: {where})")


def register_backbone(name: str | None = None) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Registers a builder under `name` (default: the function's name); a taken name is an error.

    The builder takes keyword arguments and must accept `features_only`, `out_indices`,
    `output_stride`, `norm`, `frozen_stages` and `num_classes`; with `features_only=True` it returns a
    module whose `forward` gives an ordered dict of features and whose `feature_info` lists them.

    Example:
        >>> @register_backbone("my_resnet")
        ... def my_resnet(**kwargs):
        ...     return ResNet(block=Bottleneck, layers=(2, 2, 2, 2), **kwargs)
    """

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or builder.__name__
        if key in _BUILDERS:
            raise ValueError(f"backbone {key!r} is already registered (by {_BUILDERS[key]!r})")
        if key.startswith(TIMM_PREFIX) or "." in key:
            raise ValueError(f"backbone name {key!r} may not start with {TIMM_PREFIX!r} or contain '.'")
        _BUILDERS[key] = builder
        return builder

    return decorator


def load_plugins(reload: bool = False) -> None:
    """Imports the entry points of group `resbone.backbones` from installed packages.

    An entry point names either a builder (registered under the entry point's name) or a module
    whose import registers its own builders.
    """
    global _plugins_loaded
    if _plugins_loaded and not reload:
        return
    _plugins_loaded = True
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry.load()
        except Exception as error:  # a broken plugin must not break the registry
            warnings.warn(f"backbone plugin {entry.name!r} ({entry.value}) failed to load: {error}", stacklevel=2)
            continue
        if not isinstance(loaded, types.ModuleType) and entry.name not in _BUILDERS:
            register_backbone(entry.name)(loaded)


def list_backbones(pattern: str | None = None) -> list[str]:
    """Registered names, sorted, optionally filtered by a shell-style pattern such as `"resnet*"`.

    Any timm model is reachable too, as `timm/<name>` (not listed here; see `timm.list_models`).
    """
    load_plugins()
    names = sorted(_BUILDERS)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def _builder(name: str) -> Callable[..., nn.Module]:
    load_plugins()
    if name not in _BUILDERS:
        hint = closest_names(name, _BUILDERS, otherwise="registered")
        raise UnknownNameError(f"unknown backbone {name!r}{hint} (or use 'timm/<model>' for any timm model)")
    return _BUILDERS[name]


def _split_tag(name: str, weights: str | None) -> tuple[str, str | None]:
    # "resnet50.tv_in1k" is the architecture resnet50 with the weights tag resnet50.tv_in1k
    if "." in name and not name.startswith(TIMM_PREFIX):
        if weights is not None:
            raise ValueError(f"name {name!r} carries a weights tag and weights={weights!r} was given too")
        return name.split(".", 1)[0], name
    return name, weights


def backbone_options(name: str) -> frozenset[str] | None:
    """The keyword options the builder of `name` takes; None when it takes any (`**kwargs`, timm models)."""
    name, _ = _split_tag(name, None)
    if name.startswith(TIMM_PREFIX):
        return None
    parameters = inspect.signature(_builder(name)).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))


def create_backbone(
    name: str,
    *,
    weights: str | None = None,
    out_indices: Sequence[int] = (1, 2, 3, 4),
    output_stride: int = 32,
    norm: str | Callable[[int], nn.Module] = "bn",
    frozen_stages: int = -1,
    **kwargs,
) -> nn.Module:
    """Builds a feature extractor: `forward(x)` returns an ordered dict of the outputs in `out_indices`.

    Args:
        name: a registered name (`list_backbones()`), a name with a weights tag (`resnet50.tv_in1k`),
            or `timm/<model>` for any timm model.
        weights: a weights tag, a local file or a URL (see `backbones.weights.load_weights`).
        out_indices: 0 is the stem (stride 2, key `stem`), 1 to 4 the stages (keys `c2` to `c5`).
        output_stride: 8, 16 or 32; the later strides become dilation.
        norm: "bn", "frozen_bn", "sync_bn", "gn" or a callable `norm(num_channels)`.
        frozen_stages: -1 none; k freezes the stem and the first k stages (no gradient, BN
            statistics fixed even in training mode).
        **kwargs: options of the variant, e.g. `stride_in_1x1`, `multi_grid`, `zero_init_last`,
            `drop_path_rate`, `in_chans`.

    Example:
        >>> backbone = create_backbone("resnet50", output_stride=16)
        >>> [(f.name, f.channels, f.stride) for f in backbone.feature_info]
        [('c2', 256, 4), ('c3', 512, 8), ('c4', 1024, 16), ('c5', 2048, 16)]
        >>> backbone(torch.randn(1, 3, 224, 224))["c5"].shape
        torch.Size([1, 2048, 14, 14])
    """
    from .weights import load_weights

    name, weights = _split_tag(name, weights)
    if (norm == "frozen_bn" or frozen_stages >= 0) and weights is None:
        warnings.warn(
            f"create_backbone({name!r}): norm={norm!r}, frozen_stages={frozen_stages} freeze randomly initialised "
            "weights; pass weights=... or train from scratch with norm='bn' or 'gn' and frozen_stages=-1",
            stacklevel=2,
        )
    options = dict(
        out_indices=tuple(out_indices), output_stride=output_stride, norm=norm, frozen_stages=frozen_stages, **kwargs
    )
    if name.startswith(TIMM_PREFIX):
        from .timm_backbone import TimmBackbone

        return TimmBackbone(name[len(TIMM_PREFIX) :], weights=weights, **options)
    model = _builder(name)(features_only=True, **options)
    if weights is not None:
        load_weights(model, weights)
    return model


def create_model(name: str, *, num_classes: int = 1000, weights: str | None = None, **kwargs) -> nn.Module:
    """Builds the whole classification network (stem, stages, global pool, fc) for the same names.

    With `weights` whose classifier has another number of classes, the fc stays freshly initialised
    and the mismatch is reported as a warning (fine-tuning); anything else that does not fit is an error.
    """
    from .weights import class_layer_prefixes, load_weights
    from .weights_table import CLASS_LAYERS

    name, weights = _split_tag(name, weights)
    if name.startswith(TIMM_PREFIX):
        import timm

        from .timm_backbone import check_timm_name

        check_timm_name(name[len(TIMM_PREFIX) :])
        model = timm.create_model(name[len(TIMM_PREFIX) :], num_classes=num_classes, **kwargs)
    else:
        model = _builder(name)(num_classes=num_classes, **kwargs)
    if weights is not None:
        load_weights(model, weights, head_prefixes=class_layer_prefixes(CLASS_LAYERS))
    return model
