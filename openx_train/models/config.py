"""The model part of a training config: ``config.model`` (an ``ml_collections.ConfigDict``).

:func:`model_config` returns every field with its default; a config file changes what it needs::

    config.model = model_config()
    config.model.head.kind = "diffusion"
    config.model.trunk.hidden_dims = (256, 256)

The schema (every field, its type and meaning)::

    observation_keys: tuple[str]   observation keys the policy reads ("state" and camera names);
                                   () reads every state and camera key of the batch
    activation: str                "relu" | "gelu" | "swish" | "tanh", for every MLP
    history: str                   how the n_obs history window is combined:
                                   "stack": per-step features concatenated, with the pad mask;
                                   "mix": a learned softmax mix over the valid steps
    state_encoder:
      hidden_dims: tuple[int]      MLP applied to each step's state; () passes the state through
      layer_norm: bool             LayerNorm after each hidden layer
      dropout: float               dropout after each hidden layer (training only)
    image_encoder:
      kind: str                    "resnet18" | "resnet34" | "conv" (a small CNN for small images)
      stem: str                    resnet stem: "imagenet" (7x7/2 conv + max pool, for >= 96 px)
                                   or "small" (3x3/1 conv, for small images)
      width: int                   filters of the first stage (resnet 64, conv 32 are typical)
      pooling: str                 "spatial_softmax" (2 x num_keypoints features) | "avg"
      num_keypoints: int           keypoints of the spatial softmax
      shared: bool                 one encoder for every camera (and the goal images), or one
                                   per camera
      film: bool                   FiLM every stage's feature map with the task embedding
    task:
      goal: bool                   condition on batch["goal"] (the loader's goal_relabeling)
      language: str                "none" | "tokens" (hashed word and bigram tokens of the
                                   instruction into a learned embedding bag, see ``tokenize``)
                                   | "embedding" (a precomputed batch["language_embedding"])
      vocab_size: int              hash buckets of the token embedding (token 0 is padding)
      max_tokens: int              tokens kept per instruction
      embedding_dim: int           width of the language embedding
      conditioning: str            how the task enters the trunk: "concat" (appended to its
                                   input) or "film" (scales and shifts every trunk layer)
    trunk:
      hidden_dims: tuple[int]      MLP over the observation (and task) features
      layer_norm: bool             LayerNorm after each layer (off by default, as OpenX's MLP:
                                   at 512x3 it costs about 15% of a state step on the CPU)
      dropout: float
    head:
      kind: str                    "mse" | "l1" | "discrete" | "diffusion"
      action_range: (float, float) the normalized action range: the discrete head's bin range
                                   and the diffusion head's sample clip; (-1, 1) fits "bounds"
                                   normalization, about (-3, 3) "gaussian"
      num_bins: int                discrete: bins per action dimension
      bin_type: str                discrete: "uniform" | "gaussian" (bins of equal mass under a
                                   normal of std bin_std, truncated to action_range)
      bin_std: float               discrete: std of the gaussian bins
      temperature: float           discrete: 0 predicts the most likely bin, > 0 samples
      diffusion_steps: int         diffusion: K denoising steps (cosine schedule)
      hidden_dim: int              diffusion: width of the MLP-ResNet denoiser
      num_blocks: int              diffusion: residual blocks of the denoiser
      time_dim: int                diffusion: width of the step embedding
      dropout: float               diffusion: dropout in the denoiser blocks
      clip_sample: bool            diffusion: clip each step's x0 estimate to action_range
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections

from openx_train.models.errors import ModelConfigError

ACTIVATIONS = ("relu", "gelu", "swish", "tanh")
HISTORY = ("stack", "mix")
IMAGE_KINDS = ("resnet18", "resnet34", "conv")
STEMS = ("imagenet", "small")
POOLINGS = ("spatial_softmax", "avg")
LANGUAGE = ("none", "tokens", "embedding")
CONDITIONING = ("concat", "film")
HEAD_KINDS = ("mse", "l1", "discrete", "diffusion")
BIN_TYPES = ("uniform", "gaussian")


def model_config() -> ml_collections.ConfigDict:
    """The default model config: every field of the schema above, with its default.

    Returns:
      A new, unlocked ``ConfigDict``.
    """
    return ml_collections.ConfigDict({
        "observation_keys": (),
        "activation": "relu",
        "history": "stack",
        "state_encoder": {"hidden_dims": (), "layer_norm": True, "dropout": 0.0},
        "image_encoder": {"kind": "resnet18", "stem": "imagenet", "width": 64,
                          "pooling": "spatial_softmax", "num_keypoints": 64, "shared": False,
                          "film": False},
        "task": {"goal": False, "language": "none", "vocab_size": 4096, "max_tokens": 16,
                 "embedding_dim": 128, "conditioning": "concat"},
        "trunk": {"hidden_dims": (512, 512, 512), "layer_norm": False, "dropout": 0.0},
        "head": {"kind": "discrete", "action_range": (-1.0, 1.0), "num_bins": 48,
                 "bin_type": "uniform", "bin_std": 1.0, "temperature": 0.0,
                 "diffusion_steps": 20, "hidden_dim": 256, "num_blocks": 3, "time_dim": 32,
                 "dropout": 0.0, "clip_sample": True},
    })


_CHOICES = {
    "activation": ACTIVATIONS, "history": HISTORY, "image_encoder.kind": IMAGE_KINDS,
    "image_encoder.stem": STEMS, "image_encoder.pooling": POOLINGS, "task.language": LANGUAGE,
    "task.conditioning": CONDITIONING, "head.kind": HEAD_KINDS, "head.bin_type": BIN_TYPES,
}
_POSITIVE = ("image_encoder.width", "image_encoder.num_keypoints", "task.vocab_size",
             "task.max_tokens", "task.embedding_dim", "head.diffusion_steps",
             "head.hidden_dim", "head.time_dim")
_DROPOUT = ("state_encoder.dropout", "trunk.dropout", "head.dropout")


def _plain(value: Any) -> Any:
    """A ConfigDict (or FrozenConfigDict) as nested dicts, sequences as tuples."""
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def _merge(defaults: dict, given: dict, prefix: str) -> dict:
    out = dict(defaults)
    for key, value in given.items():
        path = f"{prefix}{key}"
        if key not in defaults:
            raise ModelConfigError(f"model.{path}: unknown field; expected one of "
                                   f"{sorted(defaults)}")
        if isinstance(defaults[key], dict):
            if not isinstance(value, dict):
                raise ModelConfigError(f"model.{path}: expected a dict of fields, given "
                                       f"{value!r}")
            out[key] = _merge(defaults[key], value, f"{path}.")
        else:
            out[key] = value
    return out


def _get(tree: dict, path: str) -> Any:
    for part in path.split("."):
        tree = tree[part]
    return tree


def _ints(tree: dict, path: str, *, minimum: int) -> tuple[int, ...]:
    value = _get(tree, path)
    if not isinstance(value, Sequence) or isinstance(value, str) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value):
        raise ModelConfigError(f"model.{path}: expected a sequence of ints >= {minimum}, "
                               f"given {value!r}")
    return tuple(value)


def resolve_model_config(config: Any) -> ml_collections.FrozenConfigDict:
    """Checks a model config and fills the fields it leaves out with their defaults.

    Args:
      config: a ``ConfigDict`` or a dict with any subset of the fields of
        :func:`model_config`.

    Returns:
      The complete config, frozen (hashable, so that a policy built from it is a static jit
      argument).

    Raises:
      ModelConfigError: for an unknown field or a value out of its range, naming the field.
    """
    given = _plain(config)
    if not isinstance(given, dict):
        raise ModelConfigError(f"model: expected a ConfigDict or dict, given {config!r}")
    c = _merge(_plain(model_config()), given, "")
    for path, choices in _CHOICES.items():
        if _get(c, path) not in choices:
            raise ModelConfigError(f"model.{path}: expected one of {choices}, given "
                                   f"{_get(c, path)!r}")
    for path in _POSITIVE:
        value = _get(c, path)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelConfigError(f"model.{path}: expected an int >= 1, given {value!r}")
    if not isinstance(c["head"]["num_blocks"], int) or c["head"]["num_blocks"] < 0:
        raise ModelConfigError(f"model.head.num_blocks: expected an int >= 0, given "
                               f"{c['head']['num_blocks']!r}")
    if not isinstance(c["head"]["num_bins"], int) or c["head"]["num_bins"] < 2:
        raise ModelConfigError(f"model.head.num_bins: expected an int >= 2, given "
                               f"{c['head']['num_bins']!r}")
    for path in _DROPOUT:
        value = _get(c, path)
        if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ModelConfigError(f"model.{path}: expected a float in [0, 1), given {value!r}")
    for path in ("state_encoder.hidden_dims", "trunk.hidden_dims"):
        _ints(c, path, minimum=1)
    lo_hi = c["head"]["action_range"]
    if (not isinstance(lo_hi, Sequence) or len(lo_hi) != 2
            or not all(isinstance(v, (int, float)) for v in lo_hi) or not lo_hi[0] < lo_hi[1]):
        raise ModelConfigError(f"model.head.action_range: expected (low, high) with low < high, "
                               f"given {lo_hi!r}")
    c["head"]["action_range"] = (float(lo_hi[0]), float(lo_hi[1]))
    for path, minimum in (("head.temperature", None), ("head.bin_std", 0.0)):
        value = _get(c, path)
        if not isinstance(value, (int, float)) or value < 0 or value == minimum:
            bound = ">= 0" if minimum is None else "> 0"
            raise ModelConfigError(f"model.{path}: expected a float {bound}, given {value!r}")
    keys = c["observation_keys"]
    if not isinstance(keys, Sequence) or isinstance(keys, str) or not all(
            isinstance(k, str) for k in keys):
        raise ModelConfigError(f"model.observation_keys: expected a tuple of key names, given "
                               f"{keys!r}")
    return ml_collections.FrozenConfigDict(c)
