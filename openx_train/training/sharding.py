"""Data parallelism over a 1-D ``batch`` mesh of every device (of every process): batches are
split along their first axis, the train state is replicated."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from openx_train.models.errors import InputSpecError
from openx_train.models.spec import InputSpec, model_inputs

BATCH_AXIS = "batch"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``batch`` over ``devices`` (default: ``jax.devices()``, every device
    of every process)."""
    return Mesh(np.asarray(list(devices) if devices is not None else jax.devices()),
                (BATCH_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays split along their first (batch) axis over the mesh."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays copied on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def put_state(state: Any, mesh: Mesh) -> Any:
    """The train state replicated over the mesh (every process must pass the same values)."""
    return jax.device_put(state, replicated_sharding(mesh))


def put_batch(batch: Mapping[str, Any], spec: InputSpec, mesh: Mesh, *, train: bool = True
              ) -> dict[str, Any]:
    """A loader batch as global device arrays split over the mesh.

    The host part (:func:`~openx_train.models.model_inputs`) selects the keys the policy
    consumes and tokenizes language; each process passes its own share of the global batch
    (the loader's ``process_index``/``process_count``), so the global batch is
    ``process_count`` times the loader's ``batch_size``.

    Args:
      batch: this process's loader batch (numpy).
      spec: the policy's input spec.
      mesh: from :func:`make_mesh`.
      train: keep the training targets (``action``, ``action_pad_mask``, ``dataset_id``,
        ``example_mask``).

    Returns:
      Nested dicts of ``jax.Array`` sharded along the batch axis.

    Raises:
      InputSpecError: for a batch that does not fit the spec, or whose size the process's
        devices do not divide.
    """
    host = model_inputs(batch, spec, train=train)
    size = len(jax.tree.leaves(host)[0])
    local = len(mesh.local_devices)
    if size % local:
        raise InputSpecError(f"batch size: expected a multiple of this process's {local} "
                             f"devices, given {size}")
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:  # one transfer call for the whole tree: half the time
        return jax.device_put(host, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), host)
