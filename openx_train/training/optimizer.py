"""The optimizer part of a training config (``config.optimizer``) and the optax optimizer it
makes: AdamW with weight decay on kernels only, a warmup-cosine learning rate, global-norm
gradient clipping (as the OpenX configs).

Schema::

    learning_rate: float       peak learning rate, reached after warmup
    init_learning_rate: float  learning rate at step 0
    end_learning_rate: float   learning rate at decay_steps (and after)
    warmup_steps: int          linear warmup from init_learning_rate
    decay_steps: int | None    steps of the whole schedule (warmup included); None: the
                               run's total steps
    weight_decay: float        AdamW decoupled weight decay, applied to kernels only (Dense and
                               Conv weights; never biases, norms, embeddings or FiLM biases)
    clip_gradient: float       global-norm clipping of the gradients; 0 disables
    b1, b2, eps: float         Adam moments
    ema_decay: float | None    keep an exponential moving average of the parameters with this
                               decay (e.g. 0.999); None keeps none
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax

from openx_train.models.errors import ModelConfigError


def optimizer_config() -> ml_collections.ConfigDict:
    """The default optimizer config (every field of the schema above).

    Returns:
      A new, unlocked ``ConfigDict``.
    """
    return ml_collections.ConfigDict({
        "learning_rate": 3e-4,
        "init_learning_rate": 0.0,
        "end_learning_rate": 1e-6,
        "warmup_steps": 1000,
        "decay_steps": ml_collections.config_dict.placeholder(int),
        "weight_decay": 1e-4,
        "clip_gradient": 1.0,
        "b1": 0.9,
        "b2": 0.999,
        "eps": 1e-8,
        "ema_decay": ml_collections.config_dict.placeholder(float),
    })


def weight_decay_mask(params: Any) -> Any:
    """True for the leaves that are decayed: those named ``kernel``."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def _check(config: Any) -> dict[str, Any]:
    defaults = optimizer_config().to_dict()
    given = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ModelConfigError(f"optimizer: unknown fields {unknown}; expected some of "
                               f"{sorted(defaults)}")
    c = {**defaults, **given}
    for key in ("learning_rate", "init_learning_rate", "end_learning_rate", "weight_decay",
                "clip_gradient", "eps"):
        if not isinstance(c[key], (int, float)) or c[key] < 0:
            raise ModelConfigError(f"optimizer.{key}: expected a float >= 0, given {c[key]!r}")
    for key in ("b1", "b2"):
        if not isinstance(c[key], (int, float)) or not 0 <= c[key] < 1:
            raise ModelConfigError(f"optimizer.{key}: expected a float in [0, 1), given "
                                   f"{c[key]!r}")
    if not isinstance(c["warmup_steps"], int) or c["warmup_steps"] < 0:
        raise ModelConfigError(f"optimizer.warmup_steps: expected an int >= 0, given "
                               f"{c['warmup_steps']!r}")
    ema = c["ema_decay"]
    if ema is not None and (not isinstance(ema, (int, float)) or not 0 <= ema < 1):
        raise ModelConfigError(f"optimizer.ema_decay: expected None or a float in [0, 1), "
                               f"given {ema!r}")
    return c


def make_optimizer(config: Any, *, total_steps: int
                   ) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
    """The optimizer and its learning-rate schedule.

    Args:
      config: ``config.optimizer`` (any subset of :func:`optimizer_config`).
      total_steps: the run's steps (the schedule's length when ``decay_steps`` is None).

    Returns:
      ``(tx, schedule)``: the optax transformation (clipping, then AdamW) and the schedule
      (step -> learning rate).

    Raises:
      ModelConfigError: for an unknown field or a value out of range, naming the field.
    """
    c = _check(config)
    decay_steps = c["decay_steps"] if c["decay_steps"] is not None else int(total_steps)
    if not isinstance(decay_steps, int) or decay_steps <= c["warmup_steps"]:
        raise ModelConfigError(f"optimizer.decay_steps: expected an int > warmup_steps "
                               f"({c['warmup_steps']}), given {decay_steps!r} (decay_steps "
                               "or the run's total steps)")
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=float(c["init_learning_rate"]), peak_value=float(c["learning_rate"]),
        warmup_steps=c["warmup_steps"], decay_steps=decay_steps,
        end_value=float(c["end_learning_rate"]))
    adamw = optax.adamw(schedule, b1=c["b1"], b2=c["b2"], eps=c["eps"],
                        weight_decay=float(c["weight_decay"]), mask=weight_decay_mask)
    if c["clip_gradient"] > 0:
        return optax.chain(optax.clip_by_global_norm(float(c["clip_gradient"])), adamw), schedule
    return adamw, schedule


def ema_decay(config: Any) -> float | None:
    """``config.optimizer.ema_decay`` checked (None when the run keeps no EMA)."""
    value = _check(config)["ema_decay"]
    return None if value is None else float(value)
