"""Summaries of a dataset directory, read without TensorFlow."""

from __future__ import annotations

import collections
import os
from typing import Any

import numpy as np

from oxe_envlogger import layout, reader, stats


def summarize(directory: str | os.PathLike, split: str | None = None) -> dict[str, Any]:
    """Episodes, steps, length distribution, features, bytes, provenance, statistics and
    language instructions of a dataset (every split, or one)."""
    directory = os.fspath(directory)
    info = layout.read_json(os.path.join(directory, layout.DATASET_INFO))
    if info is None:
        raise FileNotFoundError(f"{directory}: no {layout.DATASET_INFO}; not a dataset directory")
    spec = reader.read_spec(directory)
    splits = [split] if split else layout.list_splits(info)
    lengths, returns, invalid, languages = [], [], 0, collections.Counter()
    has_lang = any(p == "language_instruction" for p, _ in reader.step_leaves(spec))
    keys = {"reward"} | ({"language_instruction"} if has_lang else set())
    for s in splits:
        for ep in reader.read_episodes(directory, s, keys=keys, decode_images=False):
            steps = ep["steps"]
            n = len(steps["is_first"])
            lengths.append(n)
            if "reward" in steps:
                returns.append(float(np.sum(steps["reward"][:-1])))
            invalid += bool(ep.get("invalid", False))
            if has_lang:
                languages.update(x.decode("utf-8", "replace") for x in set(steps["language_instruction"]))
    features = {f"steps/{p}": leaf.describe() for p, leaf in reader.step_leaves(spec)}
    features.update({p: leaf.describe() for p, leaf in reader.episode_leaves(spec)})
    meta = layout.read_json(os.path.join(directory, layout.METADATA)) or {}
    loaded = stats.load(directory)
    num_bytes = sum(int(e.get("numBytes", 0)) for e in info.get("splits", []) if e["name"] in splits)
    out = {
        "directory": directory,
        "name": info.get("name"),
        "splits": {s: sum(n for _, n in layout.shard_paths(directory, info, s)) for s in splits},
        "episodes": len(lengths),
        "steps": int(np.sum(lengths)) if lengths else 0,
        "episode_length": _describe(lengths),
        "episode_return": _describe(returns),
        "invalid_episodes": invalid,
        "bytes": num_bytes,
        "features": features,
        "image_codecs": meta.get("image_codecs", {}),
        "language_instructions": dict(languages.most_common()),
        "sessions": len(meta.get("sessions", [])),
        "statistics_current": stats.is_current(directory),
    }
    if loaded is not None:
        out["statistics"] = {k: {m: st.summary()[m] for m in ("mean", "std", "min", "max")}
                             for k, st in loaded[0].keys.items()}
    return out


def _describe(values) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values, dtype=np.float64)
    return {"min": float(a.min()), "mean": float(a.mean()), "max": float(a.max()),
            "median": float(np.median(a))}


def format_summary(summary: dict[str, Any]) -> str:
    """A human-readable multi-line rendering of :func:`summarize`."""
    lines = [f"dataset {summary['name']} at {summary['directory']}",
             f"  episodes: {summary['episodes']} ({summary['invalid_episodes']} invalid), "
             f"steps: {summary['steps']}, bytes: {summary['bytes'] / 1e6:.2f} MB",
             f"  splits: {summary['splits']}"]
    if summary["episode_length"]:
        el = summary["episode_length"]
        lines.append(f"  episode length: min {el['min']:.0f}, median {el['median']:.0f}, "
                     f"max {el['max']:.0f}")
    if summary["episode_return"]:
        er = summary["episode_return"]
        lines.append(f"  episode return: min {er['min']:.3f}, mean {er['mean']:.3f}, "
                     f"max {er['max']:.3f}")
    lines.append("  features:")
    lines += [f"    {k}: {v}" for k, v in summary["features"].items()]
    if summary["language_instructions"]:
        lines.append("  language instructions:")
        lines += [f"    {n:5d}  {t}" for t, n in list(summary["language_instructions"].items())[:20]]
    return "\n".join(lines)
