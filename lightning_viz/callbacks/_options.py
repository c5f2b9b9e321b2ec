"""Option handling shared by the callbacks' ``__init__``: one vocabulary, and deprecated aliases of renamed options.

Names used across callbacks: ``layers`` (one name or a list), ``chunk_size`` (images per forward), ``target``
(the class or score to explain), ``normalize`` (how heatmaps are scaled for display). A renamed option keeps its
old name as a deprecated alias: accepted with a :class:`DeprecationWarning` naming the new option.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Union

from .._warnings import LightningVizWarning

__all__ = [
    "LayersSpec",
    "VizDeprecationWarning",
    "renamed_option",
    "as_layer_list",
    "single_layer",
    "reject_options",
    "refuse_non_finite",
    "index_list",
    "instance_label",
]


class VizDeprecationWarning(LightningVizWarning, DeprecationWarning):
    """A deprecated lightning-viz option; shown by default (plain DeprecationWarnings are hidden outside
    ``__main__``, e.g. when LightningCLI builds the callbacks), as Lightning does for its own."""


warnings.simplefilter("default", category=VizDeprecationWarning)

#: The type of every ``layers`` option: one layer name, a list of names, or ``None`` (the callback's default).
LayersSpec = Optional[Union[str, list[str]]]


def renamed_option(owner: str, old: str, new: str, old_value: Any, new_value: Any, new_default: Any) -> Any:
    """``new_value``, or ``old_value`` of the deprecated alias ``old`` (with a DeprecationWarning naming ``new``).

    Giving both (the new one not at its default) is an error: which one is meant is unclear.
    """
    if old_value is None:
        return new_value
    from lightning.pytorch.utilities import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:  # DDP builds the callbacks on every rank: one line, not one per rank
        warnings.warn(
            f"{owner}: option {old!r} is deprecated and will be removed; use {new!r} instead ({new}={old_value!r})",
            VizDeprecationWarning,
            stacklevel=4,  # the caller of the callback's __init__ (wrapped by VisualizationCallback.__init_subclass__)
        )
    if new_value is not None and new_value != new_default and new_value != old_value:
        raise ValueError(
            f"{owner}: got both {new}={new_value!r} and its deprecated alias {old}={old_value!r}; use only {new!r}"
        )
    return old_value


def as_layer_list(owner: str, layers: LayersSpec, option: str = "layers") -> Optional[list[str]]:
    """``layers`` as a list of unique names (one name is a one-element list); ``None`` stays ``None``."""
    if layers is None:
        return None
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(
            f"{owner}: {option} must name at least one layer (a name or a list of names from "
            f"model.named_modules()), or be None for the default; got {layers!r}"
        )
    return list(dict.fromkeys(names))


def single_layer(owner: str, layers: LayersSpec) -> Optional[str]:
    """The one layer of a callback that shows one layer per instance (``layers`` a name or a one-element list)."""
    names = as_layer_list(owner, layers)
    if names is None:
        return None
    if len(names) != 1:
        raise ValueError(
            f"{owner} shows one layer per instance; got layers={names}. Attach one {owner} per layer "
            "(with name=... to tell them apart if needed)."
        )
    return names[0]


def reject_options(owner: str, kwargs: dict[str, Any], unused: tuple[str, ...], why: str) -> None:
    """A clear error for base-class options this callback does not use (instead of Python's TypeError)."""
    given = [k for k in unused if k in kwargs]
    if given:
        raise TypeError(f"{owner} takes no {', '.join(given)}: {why}")


def refuse_non_finite(options: dict[str, Any], owner: str = "") -> None:
    """A float option (or a float in a list option) that is NaN or infinite is an error naming it: it would fail late,
    or silently give NaN images (an ``lr`` or ``epsilon`` of NaN), instead of at construction."""
    for option, value in options.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ValueError(f"{owner + ': ' if owner else ''}{option} must be a finite number; got {value!r}")


def unknown_option_error(cls: type, option: str, stop: type, name: Any = None) -> TypeError:
    """``cls(option=...)`` for an option no ``__init__`` of ``cls`` (up to ``stop``) takes: a message naming the option,
    the closest option names and every option (was Python's ``VisualizationCallback.__init__() got an unexpected
    keyword argument``, naming another class than the user's)."""
    import difflib
    import inspect

    options: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            for p in inspect.signature(init).parameters.values():
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in options:
                    options.append(p.name)
        if klass is stop:
            break
    close = difflib.get_close_matches(option, options, n=2, cutoff=0.6)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    listed = ", ".join(sorted(options))
    return TypeError(f"{instance_label(cls.__name__, name)}: unknown option {option!r}{hint}; its options: {listed}.")


def index_list(owner: str, option: str, values: Any, what: str) -> list[int]:
    """``values`` (one index, a list, a range, an integer tensor or array) as a non-empty list of ints ``>= 0``; a
    clear error for anything else. Was: ``[0.5, 2]`` silently became ``[0, 2]``, ``3`` or a tensor a bare TypeError."""
    items = values.tolist() if hasattr(values, "tolist") else values
    items = [items] if isinstance(items, int) else items
    ok = isinstance(items, (list, tuple, range)) and len(items) > 0
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in items)
    if not ok:
        raise ValueError(
            f"{owner}: {option} must be one {what} index or a non-empty list of them, e.g. [0, 1, 2]: {what} indices "
            f">= 0 (at least one); got {values!r}"
        )
    return [int(v) for v in items]


def instance_label(owner: str, name: Any = None) -> str:
    """A callback in messages: its class, and its ``name=`` when given (``CAMCallback 'b'``: which of several)."""
    return owner if name is None else f"{owner} {name!r}"
