"""Arturo in Hugging Face ``transformers.Trainer`` and ``accelerate``.

- :func:`trainer_optimizer_kwargs`: the keyword arguments that make a ``Trainer`` use Arturo,
  with one param group or the Trainer's split;
- :class:`ArturoStatsCallback` and :func:`add_stats_callback`: Arturo's :meth:`~arturo.Arturo.stats`
  (η, KL, its bound, skipped steps) in the Trainer's logs, read only at logging steps;
- :func:`~arturo.integrations.unwrap_optimizer`: the Arturo inside Accelerate's
  ``AcceleratedOptimizer`` (which forwards ``step()`` but not ``stats()``) or a ``Trainer``.

Importing this module imports ``transformers``; ``import arturo`` never does. Recipes:
docs/integrations.md.
"""

from __future__ import annotations

from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "arturo.integrations.hf needs transformers; install it with pip install 'arturo[hf]'"
    ) from exc

from ..optimizer import DEFAULT_UNITS, Arturo
from . import stats_for_logging, unwrap_optimizer

__all__ = [
    "ArturoStatsCallback",
    "add_stats_callback",
    "trainer_optimizer_kwargs",
    "unwrap_optimizer",
]


def trainer_optimizer_kwargs(
    model: Any = None, *, one_group: bool | None = None, **arturo_kwargs: Any
) -> dict[str, Any]:
    """Keyword arguments for ``Trainer(...)`` that make it train with Arturo::

        Trainer(model=model, args=args, train_dataset=data,
                **trainer_optimizer_kwargs(model))

    ``arturo_kwargs`` go to :class:`~arturo.Arturo`; its ``lr`` is the KL bound ε, and
    ``TrainingArguments.learning_rate`` is not used. The Trainer's LR scheduler (with its
    warmup) drives ε.

    How many trust regions: each param group is one. The Trainer's own split (weights with
    ``TrainingArguments.weight_decay`` as Arturo's κ, biases and norms without) is right in
    relative units, where each group's bound is ε times its size, so the two bounds add up to
    the one a single group would have. In absolute units each group would get the whole ε, so
    there the default is one group. ``one_group``: ``None`` (default) chooses by the units;
    ``True`` returns ``optimizers=(Arturo(...), None)`` with all trainable parameters of
    ``model`` in one group (with Arturo's own ``weight_decay``), which needs ``model``;
    ``False`` lets the Trainer split (``optimizer_cls_and_kwargs``, new in transformers
    4.47, this extra's floor). docs/integrations.md has the recipes.
    """
    if one_group is None:
        one_group = arturo_kwargs.get("units", DEFAULT_UNITS) != "relative"
    if not one_group:
        return {"optimizer_cls_and_kwargs": (Arturo, dict(arturo_kwargs))}
    if model is None:
        raise TypeError(
            "pass the model: this builds the optimizer itself (optimizers=(Arturo(...), None))"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    return {"optimizers": (Arturo(params, **arturo_kwargs), None)}


class ArturoStatsCallback(TrainerCallback):
    """Adds Arturo's statistics to each training log of a ``Trainer``.

    At each logging step (``TrainingArguments.logging_steps``) it adds ``arturo/eta``,
    ``arturo/kl``, ``arturo/kl_bound`` and ``arturo/skipped_steps`` (per group,
    ``arturo/group{i}/...``, when there are several) to the logs, and to the entry the Trainer
    just put in ``state.log_history``. Only then does it read the device; other steps cost
    nothing. ``kl`` is the KL of the last step; ``kl_bound`` is the group's current ``lr``,
    which the LR scheduler has already moved on to the next step's bound.

    Callbacks run in order, and the Trainer puts the ``report_to`` ones (TensorBoard, W&B, ...)
    before those passed as ``callbacks=``; :func:`add_stats_callback` puts this one first, so
    that they record the statistics too.
    """

    def __init__(self, prefix: str = "arturo/") -> None:
        self.prefix = prefix

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):  # noqa: ANN001
        if optimizer is not None:
            unwrap_optimizer(optimizer)  # TypeError now, not at the first logging step

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):  # noqa: ANN001
        if logs is None or optimizer is None or "loss" not in logs:
            return  # not a training log (evaluation, the end-of-training summary)
        stats = stats_for_logging(optimizer, self.prefix)
        logs.update(stats)
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and "loss" in last:
            last.update(stats)


def add_stats_callback(trainer: Any, prefix: str = "arturo/") -> ArturoStatsCallback:
    """Add an :class:`ArturoStatsCallback` to ``trainer`` ahead of its other callbacks, so
    that the reporting callbacks (``report_to``) see the statistics. Returns the callback."""
    callback = ArturoStatsCallback(prefix)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
