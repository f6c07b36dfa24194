"""The reference's losses computed once per training frame, instead of once per drawn sample.

The Re-Mix step needs the reference's per-example loss of every sample (eval mode: no dropout;
its parameters frozen). When that loss is a function of the frame alone, computing it in every
step repeats the same forward pass each time a frame is drawn again: a Re-Mix run of ``S``
steps at batch ``B`` over ``F`` training frames draws each frame ``S * B / F`` times. So the run
computes it once per frame up front (one pass over the training frames,
``DataLoader.frame_pass``), keeps it on the host indexed by the loader's ``row``, and gives each
batch its examples' losses (``reference_loss``); the step then runs only the proxy.

That is valid only when the reference's loss of a sample is a function of its frame:

* the head's loss draws no noise (the diffusion head's draws a noise level and the noise: its
  reference loss differs at every draw, and the step pairs it with the proxy's draw);
* the loader's inputs of a frame are the same at every draw: no goal drawn per batch
  (``goal_relabeling``) and no image augmentation.

Otherwise the step computes the reference's losses itself, as without the cache. The cache is
not part of the train state: a resumed run computes it again, the same numbers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from openx_train.data.config import LoaderConfig
from openx_train.data.errors import ConfigError
from openx_train.models.policy import Policy
from openx_train.models.spec import InputSpec, model_inputs
from openx_train.remix.step import REFERENCE_LOSS

log = logging.getLogger(__name__)

#: ``remix.cache_reference`` settings: ``"auto"`` caches when valid and when the run draws at
#: least as many samples as there are training frames (else the pass costs more than it
#: saves); ``"on"`` caches whenever valid (a ConfigError saying why when not); ``"off"``
#: never.
CACHE_SETTINGS = ("auto", "on", "off")


def cache_refusal(policy: Policy, loader: LoaderConfig, spec: InputSpec) -> str | None:
    """Why the reference's loss of a training sample is not a function of its frame, or None
    when it is (and the losses may be computed once per frame).

    Args:
      policy: the reference policy.
      loader: the training loader's options.
      spec: the policy's input spec.
    """
    reasons = []
    if not policy.deterministic_loss():
        reasons.append(f"the {policy.config.head.kind} head's loss draws noise")
    if loader.goal_relabeling:
        reasons.append("goals are drawn per batch (goal_relabeling)")
    if loader.augment is not None and any(spec.is_image(p) for p, _ in spec.inputs):
        reasons.append("images are augmented per batch (augment)")
    return "; ".join(reasons) or None


def use_cache(setting: str, refusal: str | None, *, samples: int, frames: int) -> bool:
    """Whether a Re-Mix run caches its reference's losses.

    Args:
      setting: ``remix.cache_reference`` (see :data:`CACHE_SETTINGS`).
      refusal: :func:`cache_refusal`.
      samples: samples the run will draw (steps left times the global batch).
      frames: training frames.

    Raises:
      ConfigError: for an unknown setting, or ``"on"`` where the cache is not valid.
    """
    if setting not in CACHE_SETTINGS:
        raise ConfigError(f"remix.cache_reference: expected one of {list(CACHE_SETTINGS)}, "
                          f"given {setting!r}")
    if setting == "off":
        return False
    if refusal is not None:
        if setting == "on":
            raise ConfigError(f"remix.cache_reference='on': the reference's loss of a sample is "
                              f"not a function of its frame here: {refusal}")
        return False
    return setting == "on" or samples >= frames


def reference_losses(policy: Policy, params: Any, frame_pass: Any, spec: InputSpec
                     ) -> np.ndarray:
    """The reference's eval-mode loss of every frame of a loader's frame pass.

    Each process computes every frame's (a process's training batches may draw any frame), on
    its first local device, one batch of the pass at a time.

    Args:
      policy: the reference policy (its loss a function of the frame: see
        :func:`cache_refusal`).
      params: its parameters (host arrays).
      frame_pass: ``DataLoader.frame_pass()`` of the training loader.
      spec: the policy's input spec.

    Returns:
      float32 ``[rows]``, indexed by the loader's ``row``; NaN at rows that are no frame.
    """
    t0 = time.perf_counter()
    device = jax.local_devices()[0]
    params = jax.device_put(params, device)
    loss = jax.jit(lambda p, b: policy.apply({"params": p}, b, train=False,
                                             method=Policy.loss))
    rows, values = [], []
    for batch in frame_pass:
        valid = np.asarray(batch["valid"], bool)
        inputs = jax.device_put(model_inputs(batch, spec, train=True), device)
        values.append(np.asarray(loss(params, inputs))[valid])
        rows.append(np.asarray(batch["row"])[valid])
    rows_all = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    out = np.full(int(rows_all.max()) + 1 if len(rows_all) else 0, np.nan, np.float32)
    if len(rows_all):
        out[rows_all] = np.concatenate(values)
    log.info("reference losses of %d training frames computed in %.2f s", len(rows_all),
             time.perf_counter() - t0)
    return out


def with_reference_losses(batch: Mapping[str, Any], losses: np.ndarray) -> dict[str, Any]:
    """The loader batch (or stacked block) with ``reference_loss``: each example's cached
    loss, by its ``row``.

    Raises:
      ConfigError: for a row the cache does not hold (a frame outside the pass).
    """
    rows = np.asarray(batch["row"])
    if len(rows) and rows.max() >= len(losses):
        raise ConfigError(f"remix reference cache: a batch drew row {rows.max()}, the frame "
                          f"pass gave rows below {len(losses)} (rows of the training loader "
                          "and of its frame_pass differ)")
    return {**batch, REFERENCE_LOSS: losses[rows]}


__all__ = ["CACHE_SETTINGS", "cache_refusal", "reference_losses", "use_cache",
           "with_reference_losses"]
