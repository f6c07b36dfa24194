"""Re-Mix (Hejna et al., CoRL 2024): data-mixture weights over domains, learned by a proxy
policy's excess loss over a reference policy, and the budgeted mixture they choose.

The parts that do not depend on the model:

* :mod:`~openx_train.remix.weights`: the domain-weight update, its average and the proxy
  objective, pure JAX (the per-domain statistics sum across devices and processes first)::

      stats = domain_statistics(excess, batch["domain_id"], K, valid=batch["valid"])
      weights = update_weights(weights, stats, step, RemixOptions(eta=0.2, smoothing=0.05))
      loss = proxy_objective(excess, batch["domain_id"], weights.alpha,
                             valid=batch["valid"], counts=stats.count)

* :mod:`~openx_train.remix.step`: the Re-Mix train step (proxy in train mode minus the frozen
  reference in eval mode, the weights updated in the state, one AdamW update of the proxy),
  jitted once per batch mesh::

      step = jit_remix_step(mesh)
      state, metrics = step(state, reference_params, put_remix_batch(batch, spec, mesh))

* :mod:`~openx_train.remix.reference_cache`: the reference's losses computed once per training
  frame (where they are a function of the frame) and given to the step in the batch
  (``reference_loss``), instead of a reference forward pass in every step.
* :mod:`~openx_train.remix.outputs`: ``alpha_<step>.json``, the final ``mixture_weights.json``
  and a plot of the weights over training.
* :mod:`~openx_train.remix.budget`: a data budget split across domains by weight with
  water-filling, whole episodes chosen by seed, and the kept list that restricts a loader.

The domains come from the loader: ``LoaderConfig(domain_key="dataset")`` or an episode field
(``"episode_metadata/operator"``); batches carry ``domain_id`` and the loader names the domains
(``domain_names``) and counts their frames (``domain_frames``).
"""

from openx_train.remix.budget import (
    BudgetSelection,
    load_kept_episodes,
    restrict_datasets,
    save_kept_episodes,
    select_episodes,
    water_fill,
)
from openx_train.remix.outputs import (
    AlphaHistory,
    plot_weights,
    read_alpha_history,
    write_alpha,
    write_final_weights,
)
from openx_train.remix.reference_cache import cache_refusal, reference_losses
from openx_train.remix.step import (
    DOMAIN_ID,
    REFERENCE_LOSS,
    RemixState,
    create_remix_state,
    jit_remix_block_step,
    jit_remix_step,
    put_remix_batch,
    remix_block_step,
    remix_inputs,
    remix_step,
)
from openx_train.remix.weights import (
    BRIDGE,
    DomainStats,
    RemixOptions,
    RemixWeights,
    domain_statistics,
    init_weights,
    initial_weights,
    proxy_objective,
    update_average,
    update_domain_weights,
    update_weights,
)

__all__ = [
    "BRIDGE",
    "DOMAIN_ID",
    "REFERENCE_LOSS",
    "AlphaHistory",
    "BudgetSelection",
    "DomainStats",
    "RemixOptions",
    "RemixState",
    "RemixWeights",
    "cache_refusal",
    "create_remix_state",
    "domain_statistics",
    "init_weights",
    "initial_weights",
    "jit_remix_block_step",
    "jit_remix_step",
    "load_kept_episodes",
    "plot_weights",
    "proxy_objective",
    "put_remix_batch",
    "read_alpha_history",
    "reference_losses",
    "remix_block_step",
    "remix_inputs",
    "remix_step",
    "restrict_datasets",
    "save_kept_episodes",
    "select_episodes",
    "update_average",
    "update_domain_weights",
    "update_weights",
    "water_fill",
    "write_alpha",
    "write_final_weights",
]
