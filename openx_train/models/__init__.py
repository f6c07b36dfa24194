"""Policies for behaviour cloning (Flax linen): encoders, task conditioning, heads.

::

    from openx_train import models

    spec = models.input_spec(config.model, loader_batch)   # the keys the policy consumes
    policy = models.make_policy(config.model, spec)
    params = models.init_params(policy, jax.random.PRNGKey(0))
    batch = models.model_inputs(loader_batch, spec)         # host side: tokenizes language

``config.model`` is described in :mod:`openx_train.models.config`; the forward pass and the
losses in :mod:`openx_train.models.policy`.
"""

from openx_train.models.config import model_config, resolve_model_config
from openx_train.models.errors import InputSpecError, ModelConfigError, ModelError
from openx_train.models.heads import bin_edges, decode_bins, encode_bins
from openx_train.models.language import tokenize
from openx_train.models.policy import (
    Policy,
    example_weights,
    init_params,
    make_policy,
    masked_mean,
)
from openx_train.models.spec import (
    EXAMPLE_MASK,
    ArraySpec,
    InputSpec,
    input_spec,
    model_inputs,
)

__all__ = [
    "EXAMPLE_MASK",
    "ArraySpec",
    "InputSpec",
    "InputSpecError",
    "ModelConfigError",
    "ModelError",
    "Policy",
    "bin_edges",
    "decode_bins",
    "encode_bins",
    "example_weights",
    "init_params",
    "input_spec",
    "make_policy",
    "masked_mean",
    "model_config",
    "model_inputs",
    "resolve_model_config",
    "tokenize",
]
