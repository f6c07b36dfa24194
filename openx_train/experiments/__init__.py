"""Experiments anyone can rerun: each module collects its data through the SDK (and, in time,
trains and evaluates on it). ``python -m openx_train.experiments.operators`` is issue 14's
Re-Mix experiment (workload W6)."""
