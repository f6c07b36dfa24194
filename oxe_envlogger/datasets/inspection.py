"""Summaries of a dataset directory: what ``tools/inspect_rlds.py DIR`` prints.

:func:`summarize` reads the records without TensorFlow (only the small fields are decoded; the
size of every feature is taken from the serialized payloads). A dataset that our reader cannot
decode (another file format, a feature type it does not know) is read with
``tfds.builder_from_directory`` instead, imported only then, so any RLDS/TFDS dataset directory
can be inspected.
"""

from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from oxe_envlogger.errors import CorruptDatasetError, DamagedShardError
from oxe_envlogger.format import layout, reader, record, stats
from oxe_envlogger.format.specs import Group, Leaf

PathLike = str | os.PathLike
_HIST_BINS = 10


def language_keys(paths_and_kinds: list[tuple[str, str]]) -> list[str]:
    """The text features that hold language instructions (OXE names them ``language_instruction``
    or ``natural_language_instruction``; we take any text key naming language or instruction)."""
    return [p for p, kind in paths_and_kinds
            if kind == "text" and ("language" in p.rsplit("/", 1)[-1]
                                   or "instruction" in p.rsplit("/", 1)[-1])]


def _describe(values) -> dict[str, Any]:
    if not len(values):
        return {}
    a = np.asarray(values, dtype=np.float64)
    out = {"min": float(a.min()), "mean": float(a.mean()), "max": float(a.max()),
           "median": float(np.median(a))}
    for q in (5, 25, 75, 95):
        out[f"p{q:02d}"] = float(np.percentile(a, q))
    return out


def _histogram(values) -> dict[str, list]:
    if not len(values):
        return {}
    a = np.asarray(values, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    if lo == hi:
        return {"edges": [lo, hi], "counts": [int(a.size)]}
    counts, edges = np.histogram(a, bins=min(_HIST_BINS, max(1, len(np.unique(a)))))
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def _feature_row(path: str, leaf: Leaf, codecs: dict[str, str]) -> dict[str, Any]:
    row: dict[str, Any] = {"key": path, "kind": leaf.kind, "shape": list(leaf.shape),
                           "dtype": "string" if leaf.kind == "text" else leaf.dtype.name}
    if leaf.kind == "image":
        row["codec"] = codecs.get(path) or (leaf.codec.format if leaf.codec else "")
    elif leaf.kind == "tensor":
        row["encoding"] = leaf.encoding
    if leaf.doc:
        row["doc"] = leaf.doc
    return row


def _all_sessions(meta: dict) -> list[dict]:
    """The writer sessions of a dataset and, for a resharded one, of its sources."""
    out = list(meta.get("sessions", []))
    for source in meta.get("resharded_from") or []:
        out += _all_sessions(source.get("metadata") or {})
    return out


def _summed(sessions: list[dict], field: str) -> dict[str, int]:
    """Per-key counts (``{key: count}`` in each session) summed over the sessions."""
    out: collections.Counter = collections.Counter()
    for s in sessions:
        out.update(s.get(field) or {})
    return dict(out)


def _provenance(meta: dict, info: dict) -> dict[str, Any]:
    sessions = _all_sessions(meta)
    envs = collections.Counter()
    for s in sessions:
        env = s.get("env") or {}
        if env.get("id"):
            kwargs = ", ".join(f"{k}={v}" for k, v in sorted((env.get("kwargs") or {}).items()))
            envs[f"{env['id']}({kwargs})"] += 1
    versions: dict[str, set] = collections.defaultdict(set)
    for s in sessions:
        for k, v in (s.get("versions") or {}).items():
            versions[k].add(str(v))
    created = sorted(s.get("created") or s.get("started") for s in sessions
                     if s.get("created") or s.get("started"))
    out = {
        "description": info.get("description", ""),
        "version": info.get("version", ""),
        "sessions": len(sessions),
        "envs": dict(envs),
        "hosts": sorted({s["host"] for s in sessions if s.get("host")}),
        "git_commits": sorted({s["git_commit"] for s in sessions if s.get("git_commit")}),
        "versions": {k: sorted(v) for k, v in sorted(versions.items())},
        "created": [created[0], created[-1]] if created else [],
        "ended": dict(collections.Counter(s.get("ended", "open") for s in sessions)),
        "stalls_seconds": round(sum((s.get("stalls") or {}).get("seconds", 0.0)
                                    for s in sessions), 3),
        "nonfinite_values": _summed(sessions, "nonfinite_values"),
        "out_of_bounds_values": _summed(sessions, "out_of_bounds_values"),
    }
    if meta.get("resharded_from"):
        out["resharded_from"] = [s.get("directory") for s in meta["resharded_from"]]
    if info.get("citation"):
        out["citation"] = info["citation"]
    return out


def _stored_statistics(directory: str) -> dict[str, Any] | None:
    loaded = stats.load(directory)
    if loaded is None:
        return None
    keys = {}
    for k, st in loaded[0].keys.items():
        summary = st.summary()
        keys[k] = {m: summary[m] for m in ("mean", "std", "min", "max", "q05", "q50", "q95")
                   if m in summary}
    return keys


def summarize(directory: PathLike, split: str | None = None) -> dict[str, Any]:
    """Episodes, steps, episode length distribution, features (shape, dtype, codec, bytes),
    provenance, stored statistics and language instructions with counts.

    Args:
      directory: any RLDS/TFDS dataset directory (falls back to tfds where our reader cannot
        decode it).
      split: one split, or every split when None.

    Raises:
      FileNotFoundError: when the directory holds no dataset_info.json.
      NotADirectoryError: when ``directory`` is a file.
      DamagedShardError: when a shard is damaged, naming the file and the damage.
    """
    directory = os.fspath(directory)
    layout.check_directory(directory)
    info = layout.read_json(os.path.join(directory, layout.DATASET_INFO))
    if info is None:
        raise layout.no_dataset_error(directory)
    splits = [split] if split else layout.list_splits(info)
    try:
        if not layout.is_tfrecord(info):
            raise ValueError("not tfrecord")
        spec = reader.read_spec(directory)
        episodes = _scan_ours(directory, splits, spec)
        backend = "oxe_envlogger"
    except DamagedShardError:  # the records themselves: tfds could not read them either
        raise
    except Exception as e:
        spec = None
        episodes = _scan_tfds(directory, splits)
        backend = f"tensorflow_datasets ({type(e).__name__}: {e})"[:200]
    meta = layout.read_json(os.path.join(directory, layout.METADATA)) or {}
    codecs = dict(meta.get("image_codecs") or {})
    lengths, returns = episodes["lengths"], episodes["returns"]
    if spec is not None:
        rows = [_feature_row(f"steps/{p}", leaf, codecs) for p, leaf in reader.step_leaves(spec)]
        rows += [_feature_row(p, leaf, codecs) for p, leaf in reader.episode_leaves(spec)]
    else:
        rows = episodes["feature_rows"]
    total_feature_bytes = sum(episodes["feature_bytes"].values()) or 1
    n_eps = max(len(lengths), 1)
    for row in rows:
        nbytes = episodes["feature_bytes"].get(row["key"])
        if nbytes is not None:
            row["bytes"] = nbytes
            row["bytes_per_episode"] = nbytes / n_eps
            row["share"] = nbytes / total_feature_bytes
    num_bytes = sum(int(e.get("numBytes", 0) or 0) for e in info.get("splits", [])
                    if e["name"] in splits)
    shard_counts = {}
    for s in splits:
        entry = layout.split_entry(info, s) or {}
        shard_counts[s] = sum(int(n) for n in entry.get("shardLengths", []))
    out = {
        "directory": directory,
        "name": info.get("name"),
        "reader": backend,
        "splits": shard_counts,
        "episodes": len(lengths),
        "steps": int(np.sum(lengths)) if lengths else 0,
        "episode_length": _describe(lengths),
        "episode_length_histogram": _histogram(lengths),
        "episode_return": _describe(returns),
        "invalid_episodes": episodes["invalid"],
        "bytes": num_bytes,
        "features": {r["key"]: _row_text(r) for r in rows},
        "feature_table": rows,
        "image_codecs": codecs,
        "language_instructions": dict(episodes["languages"].most_common()),
        "sessions": len(meta.get("sessions", [])),
        "provenance": _provenance(meta, info),
        "statistics_current": stats.is_current(directory),
    }
    stored = _stored_statistics(directory)
    if stored is not None:
        out["statistics"] = stored
    return out


def _row_text(row: dict[str, Any]) -> str:
    if row["kind"] == "text":
        return "a str"
    what = f"shape {tuple(row['shape'])} {row['dtype']}"
    if row["kind"] == "image":
        return f"{what} image ({row.get('codec', '')})"
    return what


def _empty_scan() -> dict[str, Any]:
    return {"lengths": [], "returns": [], "invalid": 0, "languages": collections.Counter(),
            "feature_bytes": collections.Counter(), "feature_rows": []}


def _scan_ours(directory: str, splits: list[str], spec: Group) -> dict[str, Any]:
    """One pass over the raw records: payload sizes of every key; step count, return,
    invalid flag and instructions decoded from their payloads only."""
    out = _empty_scan()
    step_leaves = dict(reader.step_leaves(spec))
    lang = language_keys([(f"steps/{p}", leaf.kind) for p, leaf in step_leaves.items()]
                         + [(p, leaf.kind) for p, leaf in reader.episode_leaves(spec)])
    for split in splits:
        for _, _, data in layout.iter_serialized(directory, split):
            raw = record.split_example(data)
            for key, payload in raw.items():
                out["feature_bytes"][key] += len(payload)
            _, first = record.decode_feature(raw["steps/is_first"])
            n = len(first)
            out["lengths"].append(n)
            if "steps/reward" in raw and "reward" in step_leaves:
                kind, values = record.decode_feature(raw["steps/reward"])
                reward = reader.decode_leaf(kind, values, step_leaves["reward"], n,
                                            key="steps/reward")
                out["returns"].append(float(np.sum(reward[:-1])))
            if "invalid" in raw:
                _, values = record.decode_feature(raw["invalid"])
                out["invalid"] += bool(len(values) and values[0])
            texts = set()
            for key in lang:
                if key in raw:
                    kind, values = record.decode_feature(raw[key])
                    if kind == "bytes":
                        texts.update(v.decode("utf-8", "replace") for v in values)
            out["languages"].update(texts)
    return out


# ---------------------------------------------------------------------------------------------
# The tfds fallback


def tfds_builder(directory: str):
    import tensorflow_datasets as tfds

    return tfds.builder_from_directory(directory)


def tfds_feature_rows(features, prefix: str = "") -> list[dict[str, Any]]:
    """Flattened ``{key, kind, shape, dtype, ...}`` of a tfds FeaturesDict (or Dataset)."""
    import tensorflow_datasets as tfds

    rows = []
    if isinstance(features, tfds.features.Dataset):
        return tfds_feature_rows(features.feature, prefix)
    if isinstance(features, tfds.features.FeaturesDict):
        for k, f in features.items():
            rows += tfds_feature_rows(f, f"{prefix}/{k}" if prefix else k)
        return rows
    kind = "tensor"
    if isinstance(features, tfds.features.Image):
        kind = "image"
    elif isinstance(features, tfds.features.Text):
        kind = "text"
    dtype = getattr(features, "np_dtype", None)
    dtype = getattr(dtype, "name", str(dtype))
    if kind == "tensor" and dtype in ("object", "string", "str"):
        kind = "text"
    row = {"key": prefix, "kind": kind,
           "shape": [d if d is not None else -1 for d in (getattr(features, "shape", ()) or ())],
           "dtype": "string" if kind == "text" else dtype,
           "class": type(features).__name__}
    if kind == "image":
        row["codec"] = getattr(features, "_encoding_format", None) or "png"
    return [*rows, row]


@contextlib.contextmanager
def tfds_damage_reported(directory: str) -> Iterator[None]:
    """Turns the ``DataLossError`` that TensorFlow raises for a damaged shard into a
    :class:`DamagedShardError` naming the file and the damage (found by reading the records
    without TensorFlow), or a :class:`CorruptDatasetError`."""
    import tensorflow as tf

    try:
        yield
    except tf.errors.DataLossError as e:
        info = layout.read_json(os.path.join(directory, layout.DATASET_INFO)) or {}
        if layout.is_tfrecord(info):
            layout.verify_records(directory)  # raises, naming the file
        raise CorruptDatasetError(f"{directory}: tfds found a damaged shard: {e.message}") from e


def tfds_episodes(directory: str, split: str) -> Iterator[dict[str, Any]]:
    """Episodes as nested numpy dicts, ``steps`` stacked over steps (tfds decodes).

    Raises:
      DamagedShardError: for a damaged shard (see :func:`tfds_damage_reported`).
    """
    import tensorflow_datasets as tfds

    builder = tfds_builder(directory)
    ds = builder.as_dataset(split=split, read_config=tfds.ReadConfig(interleave_cycle_length=1),
                            shuffle_files=False)
    with tfds_damage_reported(directory):
        for episode in tfds.as_numpy(ds):
            episode = dict(episode)
            steps = list(episode.pop("steps"))
            episode["steps"] = _stack(steps) if steps else {}
            yield episode


def _stack(values: list) -> Any:
    if isinstance(values[0], dict):
        return {k: _stack([v[k] for v in values]) for k in values[0]}
    return np.stack([np.asarray(v) for v in values])


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}/{k}" if prefix else k))
        return out
    return {prefix: tree}


def _scan_tfds(directory: str, splits: list[str]) -> dict[str, Any]:
    out = _empty_scan()
    builder = tfds_builder(directory)
    rows = tfds_feature_rows(builder.info.features)
    out["feature_rows"] = rows
    lang = language_keys([(r["key"], r["kind"]) for r in rows])
    info = layout.read_json(os.path.join(directory, layout.DATASET_INFO))
    if layout.is_tfrecord(info):
        try:  # payload sizes straight from the records, whatever the features
            for split in splits:
                for _, _, data in layout.iter_serialized(directory, split):
                    for key, payload in record.split_example(data).items():
                        out["feature_bytes"][key] += len(payload)
        except Exception:
            out["feature_bytes"].clear()
    for split in splits:
        for episode in tfds_episodes(directory, split):
            flat = _flat(episode)
            steps = episode["steps"]
            n = len(steps["is_first"]) if "is_first" in steps else len(
                next(iter(_flat(steps).values()), []))
            out["lengths"].append(n)
            if "reward" in steps:
                out["returns"].append(float(np.sum(np.asarray(steps["reward"])[:-1])))
            if "invalid" in episode:
                out["invalid"] += bool(episode["invalid"])
            texts = set()
            for key in lang:
                value = flat.get(key)
                if value is not None:
                    for v in np.asarray(value).reshape(-1):
                        texts.add(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
            out["languages"].update(texts)
    return out


# ---------------------------------------------------------------------------------------------
# Text


def format_summary(summary: dict[str, Any]) -> str:
    """A human-readable multi-line rendering of :func:`summarize`."""
    lines = [f"dataset {summary['name']} at {summary['directory']}",
             f"  episodes: {summary['episodes']} ({summary['invalid_episodes']} invalid), "
             f"steps: {summary['steps']}, bytes: {summary['bytes'] / 1e6:.2f} MB",
             f"  splits: {summary['splits']}"]
    if summary.get("reader", "oxe_envlogger") != "oxe_envlogger":
        lines.append(f"  read with: {summary['reader']}")
    if summary["episode_length"]:
        el = summary["episode_length"]
        lines.append(f"  episode length: min {el['min']:.0f}, median {el['median']:.0f}, "
                     f"max {el['max']:.0f}" + (f", p05 {el['p05']:.0f}, p95 {el['p95']:.0f}"
                                               if "p05" in el else ""))
        hist = summary.get("episode_length_histogram") or {}
        if len(hist.get("counts", [])) > 1:
            top = max(hist["counts"])
            edges = hist["edges"]
            for i, c in enumerate(hist["counts"]):
                bar = "#" * max(1 if c else 0, round(30 * c / top))
                lines.append(f"    {edges[i]:8.0f} - {edges[i + 1]:<8.0f} {c:6d} {bar}")
    if summary["episode_return"]:
        er = summary["episode_return"]
        lines.append(f"  episode return (steps but the last): min {er['min']:.3f}, "
                     f"mean {er['mean']:.3f}, max {er['max']:.3f}")
    lines.append("  features:")
    table = summary.get("feature_table")
    if table:
        for row in table:
            extra = row.get("codec") or ("" if row.get("encoding") in (None, "none")
                                         else f"encoding={row['encoding']}")
            size = ""
            if "bytes" in row:
                size = (f"{row['bytes'] / 1e6:10.2f} MB {100 * row['share']:5.1f}% "
                        f"({row['bytes_per_episode'] / 1e3:.1f} kB/episode)")
            shape = "scalar" if not row["shape"] else "x".join(map(str, row["shape"]))
            lines.append(f"    {row['key']:<40} {row['kind']:<6} {shape:<12} "
                         f"{row['dtype']:<8} {extra:<10} {size}")
    else:
        lines += [f"    {k}: {v}" for k, v in summary["features"].items()]
    prov = summary.get("provenance") or {}
    if prov:
        lines.append("  provenance:")
        if prov.get("envs"):
            lines.append(f"    envs: {prov['envs']}")
        lines.append(f"    sessions: {prov.get('sessions', 0)} ({prov.get('ended', {})}), "
                     f"hosts: {prov.get('hosts', [])}")
        if prov.get("created"):
            lines.append(f"    created: {prov['created'][0]} .. {prov['created'][-1]}")
        if prov.get("git_commits"):
            lines.append(f"    git: {prov['git_commits']}")
        interesting = {k: v for k, v in prov.get("versions", {}).items()
                       if k in ("oxe_envlogger", "gymnasium", "mujoco", "numpy", "python")}
        if interesting:
            lines.append(f"    versions: {interesting}")
        if prov.get("resharded_from"):
            lines.append(f"    resharded from: {prov['resharded_from']}")
        if prov.get("nonfinite_values"):
            lines.append(f"    non-finite values logged: {prov['nonfinite_values']}")
        if prov.get("out_of_bounds_values"):
            lines.append(f"    values outside the declared spaces logged: "
                         f"{prov['out_of_bounds_values']}")
    if summary.get("statistics"):
        current = "current" if summary.get("statistics_current") else "NOT current"
        lines.append(f"  statistics ({current}; every step but the last of each episode):")
        with np.printoptions(precision=3, suppress=True, linewidth=200, threshold=12):
            for key, st in summary["statistics"].items():
                lines.append(f"    {key}:")
                for m, v in st.items():
                    lines.append(f"      {m:<5} {np.asarray(v)}")
    if summary["language_instructions"]:
        lines.append("  language instructions (episodes):")
        lines += [f"    {n:5d}  {t}" for t, n in list(summary["language_instructions"].items())[:20]]
        rest = len(summary["language_instructions"]) - 20
        if rest > 0:
            lines.append(f"    ... and {rest} more")
    return "\n".join(lines)
