"""Helpers for using :class:`~arturo.Arturo` inside training frameworks.

The framework-specific parts live in submodules that import their framework when they are
imported, never before: :mod:`arturo.integrations.hf` (Hugging Face ``transformers`` and
``accelerate``) and :mod:`arturo.integrations.lightning` (PyTorch Lightning). This module
needs no framework; docs/integrations.md has the recipes.
"""

from __future__ import annotations

from typing import Any

from ..optimizer import Arturo

__all__ = ["stats_for_logging", "unwrap_optimizer"]

# Attributes under which wrappers keep the optimizer they wrap: Accelerate's
# AcceleratedOptimizer and Lightning's LightningOptimizer use ``optimizer`` (Lightning also
# ``_optimizer``), and an HF Trainer keeps its (wrapped) optimizer under ``optimizer`` too.
_WRAPPED_ATTRIBUTES = ("optimizer", "_optimizer")


def unwrap_optimizer(obj: Any) -> Arturo:
    """The :class:`~arturo.Arturo` inside ``obj``: the optimizer itself, a wrapper around it
    (Accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``), or an object
    holding one (an HF ``Trainer``).

    Wrappers forward ``step()`` and ``state_dict()`` but not every attribute: Accelerate's
    has no ``stats()``, and Lightning's only imitates Arturo's class. Raises ``TypeError``
    if there is no Arturo inside.
    """
    current, depth = obj, 0
    # Descend first: a LightningOptimizer passes isinstance(..., Arturo) without being one.
    while depth < 8:  # wrappers nest a few levels at most; this also stops on a cycle
        inner = next(
            (v for name in _WRAPPED_ATTRIBUTES if (v := _own_attribute(current, name)) is not None),
            None,
        )
        if inner is None or inner is current:
            break
        current, depth = inner, depth + 1
    if not isinstance(current, Arturo):
        raise TypeError(f"no arturo.Arturo found inside {type(obj).__name__}")
    return current


def _own_attribute(obj: Any, name: str) -> Any:
    # getattr() alone would follow a wrapper's __getattr__ forwarding into the optimizer
    # (Lightning forwards unknown attributes), so look only at what the object itself has.
    try:
        return object.__getattribute__(obj, name)
    except AttributeError:
        return None


def stats_for_logging(optimizer: Any, prefix: str = "arturo/") -> dict[str, float]:
    """:meth:`Arturo.stats` as one flat dict of numbers, for a framework's logger.

    Keys are ``{prefix}{name}`` (``arturo/eta``, ``arturo/kl``, ...) for a single param group
    and ``{prefix}group{i}/{name}`` for several. Reading the values syncs with the device,
    so call this only at logging steps. ``optimizer`` may be wrapped (see
    :func:`unwrap_optimizer`).
    """
    stats = unwrap_optimizer(optimizer).stats()
    logs: dict[str, float] = {}
    for i, group_stats in enumerate(stats):
        group_prefix = prefix if len(stats) == 1 else f"{prefix}group{i}/"
        for name, value in group_stats.items():
            logs[f"{group_prefix}{name}"] = value
    return logs
