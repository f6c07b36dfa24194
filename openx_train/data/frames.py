"""Index arithmetic for windows, chunks and goals, frame gathering and normalization, written
once against an array module: numpy (:data:`NUMPY`, the state-only loader and policy, no
TensorFlow) or TensorFlow (``ops.TF``, the same functions inside ``tf.data`` graphs).

Step alignment (RLDS, as the logger writes it): an episode of ``L`` RLDS steps holds ``L - 1``
actions and a final step whose action is padding. Frame ``t`` (``0 <= t <= L - 2``) sees the
observations ``t - n_obs + 1 .. t`` (indices before 0 repeat step 0 and are masked) and the
actions ``t .. t + n_action - 1`` (indices past ``L - 2`` repeat the last action and are masked).

This module never imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from openx_train.data.config import Normalization

_EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class ArrayModule:
    """The few array operations the functions of this module need, for one array library.

    ``cast`` takes a dtype name (``"int64"``) or the library's own dtype; ``take`` gathers
    along the first axis; ``flatten_rows`` reshapes ``[T, ...]`` to ``[T, -1]``; ``length``
    is the size of the first axis; ``empty_strings(n)`` is ``n`` empty strings.
    """

    name: str
    asarray: Callable[[Any], Any]
    cast: Callable[[Any, Any], Any]
    arange: Callable[[int, int, Any], Any]
    maximum: Callable[[Any, Any], Any]
    minimum: Callable[[Any, Any], Any]
    clip: Callable[[Any, Any, Any], Any]
    floor: Callable[[Any], Any]
    take: Callable[[Any, Any], Any]
    concat: Callable[[list[Any]], Any]
    flatten_rows: Callable[[Any], Any]
    length: Callable[[Any], Any]
    zeros_like: Callable[[Any], Any]
    empty_strings: Callable[[Any], Any]


def _np_cast(x: Any, dtype: Any) -> np.ndarray:
    return np.asarray(x).astype(dtype, copy=False)


def _np_empty_strings(n: Any) -> np.ndarray:
    return np.full(int(n), b"", object)


NUMPY = ArrayModule(
    name="numpy",
    asarray=np.asarray,
    cast=_np_cast,
    arange=lambda start, stop, dtype: np.arange(start, stop, dtype=dtype),
    maximum=np.maximum,
    minimum=np.minimum,
    clip=np.clip,
    floor=np.floor,
    take=lambda a, i: np.take(a, i, axis=0),
    concat=lambda parts: np.concatenate(parts, axis=-1),
    flatten_rows=lambda x: np.reshape(x, (np.shape(x)[0], -1)),
    length=lambda x: np.shape(x)[0],
    zeros_like=np.zeros_like,
    empty_strings=_np_empty_strings,
)


# ---------------------------------------------------------------------------------------------
# Index arithmetic


def history_indices(step_index: Any, n_obs: int, *, xp: ArrayModule = NUMPY
                    ) -> tuple[Any, Any]:
    """Indices of the history window ``t - n_obs + 1 .. t`` of each step.

    Args:
      step_index: int array ``[...]`` of steps ``t`` within their episode.
      n_obs: window length (>= 1).
      xp: the array module.

    Returns:
      ``(indices, mask)``, both ``[..., n_obs]``: indices clamped at 0 (the first observation
      repeats), and True where the index is a real step (``t - k >= 0``).
    """
    t = xp.asarray(step_index)
    idx = t[..., None] + xp.arange(-(n_obs - 1), 1, t.dtype)
    return xp.maximum(idx, 0), idx >= 0


def chunk_indices(step_index: Any, num_actions: Any, n_action: int, *, xp: ArrayModule = NUMPY
                  ) -> tuple[Any, Any]:
    """Indices of the action chunk ``t .. t + n_action - 1`` of each step.

    Args:
      step_index: int array ``[...]`` of steps ``t``.
      num_actions: int array broadcastable to ``step_index``: the number of real actions of the
        episode (``L - 1`` when the final step's action is padding).
      n_action: chunk length (>= 1).
      xp: the array module.

    Returns:
      ``(indices, mask)``, both ``[..., n_action]``: indices clamped to ``num_actions - 1`` (the
      last real action repeats), and True where the index is a real action.
    """
    t = xp.asarray(step_index)
    n = xp.cast(num_actions, t.dtype)[..., None]
    idx = t[..., None] + xp.arange(0, n_action, t.dtype)
    return xp.clip(idx, 0, xp.maximum(n - 1, 0)), idx < n


def goal_indices(step_index: Any, episode_length: Any, uniform: Any, *,
                 xp: ArrayModule = NUMPY) -> Any:
    """A goal step drawn uniformly from the future of each step: ``t + 1 .. L - 1``.

    Args:
      step_index: int array ``[...]`` of steps ``t``.
      episode_length: int array broadcastable to it: ``L``, the episode's RLDS steps.
      uniform: float array like ``step_index`` of draws in ``[0, 1)``.
      xp: the array module.

    Returns:
      int array like ``step_index``; ``L - 1`` where ``t`` has no future step.
    """
    t = xp.asarray(step_index)
    last = xp.cast(episode_length, t.dtype) - 1
    span = xp.maximum(last - t, 1)
    offset = xp.cast(xp.floor(xp.cast(uniform, "float64") * xp.cast(span, "float64")), t.dtype)
    return xp.minimum(t + 1 + xp.minimum(offset, span - 1), last)


# ---------------------------------------------------------------------------------------------
# Normalization


def normalization_params(stats: Any, mode: Normalization | str, *, key: str = ""
                         ) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(shift, scale, clip)`` with ``normalized = (x - shift) / scale``, float32 arrays.

    ``stats`` is a :class:`~openx_train.data.statistics.KeyStatistics`. Dimensions without
    spread (or with non-finite statistics) get scale 1, so that the inverse is exact.
    """
    mode = Normalization.parse(mode, key=key)
    if mode is Normalization.NONE:
        return np.zeros(()), np.ones(()), False
    if mode is Normalization.GAUSSIAN:
        shift, scale = np.asarray(stats.mean), np.asarray(stats.std)
    else:
        lo, hi = ((stats.min, stats.max) if mode is Normalization.BOUNDS
                  else (stats.quantile("q01"), stats.quantile("q99")))
        lo, hi = np.asarray(lo), np.asarray(hi)
        shift, scale = (lo + hi) / 2.0, (hi - lo) / 2.0
    ok = np.isfinite(shift) & np.isfinite(scale)
    shift = np.where(ok, shift, 0.0)
    scale = np.where(ok & (scale > _EPS), scale, 1.0)
    return shift.astype(np.float32), scale.astype(np.float32), mode is Normalization.BOUNDS_Q99


def normalize(x: Any, stats: Any, mode: Normalization | str, *, key: str = "",
              xp: ArrayModule = NUMPY) -> Any:
    """Normalizes ``x`` (``[..., *shape]``, any float or int dtype) to float32.

    Args:
      x: values shaped like the statistics (with leading axes).
      stats: their :class:`~openx_train.data.statistics.KeyStatistics`.
      mode: ``none``, ``gaussian``, ``bounds`` or ``bounds_q99`` (clipped to [-1, 1]).
      key: the key, for error messages.
      xp: the array module.
    """
    shift, scale, clip = normalization_params(stats, mode, key=key)
    y = (xp.cast(x, "float32") - shift) / scale
    return xp.clip(y, -1.0, 1.0) if clip else y


def unnormalize(y: Any, stats: Any, mode: Normalization | str, *, key: str = "",
                xp: ArrayModule = NUMPY) -> Any:
    """The inverse of :func:`normalize` (exact except where ``bounds_q99`` clipped)."""
    shift, scale, _ = normalization_params(stats, mode, key=key)
    return xp.cast(y, "float32") * scale + shift


# ---------------------------------------------------------------------------------------------
# Frames


def gather_frames(
    table: Mapping[str, Any],
    rows: Any,
    episode_start: Any,
    episode_length: Any,
    *,
    n_obs: int,
    n_action: int,
    goal_uniform: Any | None = None,
    final_action_is_padding: bool = True,
    xp: ArrayModule = NUMPY,
) -> dict[str, Any]:
    """Training frames gathered from a table of steps: windows, chunks, masks and goals.

    The same function standardizes one episode (the table is the episode, ``rows`` are its
    steps, ``episode_start`` is 0) and a batch drawn from many episodes (the table holds every
    step of a dataset and ``rows`` index into it).

    Args:
      table: ``{"state": [S, D], "action": [S, A], "images": {name: [S, ...]},
        "language": [S]}``; ``state``, ``images`` and ``language`` are optional. Images may be
        encoded strings, byte-range references or pixels: they are only gathered.
      rows: int ``[B]`` table rows of the frames.
      episode_start: int ``[B]``: the table row of each frame's episode's first step.
      episode_length: int ``[B]``: each frame's episode's number of RLDS steps.
      n_obs: history window.
      n_action: action chunk.
      goal_uniform: float ``[B]`` draws in [0, 1) for goal relabelling; None: no goal.
      final_action_is_padding: the final step's action is not an action (RLDS).
      xp: the array module.

    Returns:
      ``{"observation": {"state": [B, n_obs, D], <image name>: [B, n_obs, ...],
      "pad_mask": bool [B, n_obs]}, "action": [B, n_action, A], "action_pad_mask":
      bool [B, n_action], "step_index": int32 [B], "language_instruction": [B] (with
      language), "goal": {"state": [B, D], <image name>: [B, ...]} and "goal_step_index":
      int32 [B] (with goals)}``.
    """
    rows = xp.cast(rows, "int64")
    start = xp.cast(episode_start, "int64")
    length = xp.cast(episode_length, "int64")
    t = rows - start
    hist, hist_mask = history_indices(t, n_obs, xp=xp)
    num_actions = length - 1 if final_action_is_padding else length
    chunk, chunk_mask = chunk_indices(t, num_actions, n_action, xp=xp)
    obs: dict[str, Any] = {"pad_mask": hist_mask, **_observation(table, start[:, None] + hist,
                                                                  xp)}
    out: dict[str, Any] = {
        "observation": obs,
        "action": xp.take(table["action"], start[:, None] + chunk),
        "action_pad_mask": chunk_mask,
        "step_index": xp.cast(t, "int32"),
    }
    if table.get("language") is not None:
        out["language_instruction"] = xp.take(table["language"], rows)
    if goal_uniform is not None:
        goal = goal_indices(t, length, goal_uniform, xp=xp)
        out["goal"] = _observation(table, start + goal, xp)
        out["goal_step_index"] = xp.cast(goal, "int32")
    return out


def _observation(table: Mapping[str, Any], rows: Any, xp: ArrayModule) -> dict[str, Any]:
    """The state and images of ``rows`` (any shape of indices)."""
    out = {}
    if table.get("state") is not None:
        out["state"] = xp.take(table["state"], rows)
    for name, column in table.get("images", {}).items():
        out[name] = xp.take(column, rows)
    return out
