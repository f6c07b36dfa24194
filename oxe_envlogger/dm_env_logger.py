"""The dm_env world: log a ``dm_env.Environment``, or use our writer behind ``envlogger.EnvLogger``.

``DmEnvLogger`` wraps a dm_env environment the way the gymnasium wrappers wrap gymnasium ones.
``RLDSBackendWriter`` is an envlogger ``BackendWriter``: ``envlogger.EnvLogger(env,
backend=RLDSBackendWriter(...))`` writes the same RLDS datasets (envlogger's own TFDS writer was
removed after envlogger 1.3; this is the replacement). A dm_env LAST timestep with discount 0 is a
termination, any other LAST a truncation; the env's discounts are logged as given.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import dm_env
import numpy as np
from dm_env import specs as dm_specs

from oxe_envlogger.collect import lifecycle
from oxe_envlogger.collect.recorder import EpisodeRecorder
from oxe_envlogger.collect.writer import WriterOptions
from oxe_envlogger.envlogger import DocField, LoggerMixin, MetadataInfo, _writer_options
from oxe_envlogger.errors import UnsupportedSpaceError
from oxe_envlogger.format import layout, provenance, specs
from oxe_envlogger.format.specs import ImageCodec, Spec

try:
    from envlogger.backends import backend_writer as _backend_writer

    _BackendBase: type = _backend_writer.BackendWriter
except ImportError:  # envlogger is optional outside Linux
    _BackendBase = object


def dm_spec_to_spec(spec: Any, *, path: str = "", image_codec: str | ImageCodec = "png",
                    image_codecs: Mapping[str, str | ImageCodec] | None = None,
                    float64: str = "float32") -> Spec:
    """Maps a (nested) dm_env spec to a spec: Array/BoundedArray (uint8 HxWxC as images),
    DiscreteArray, StringArray (scalar), dicts, lists and tuples. ``float64``: see
    :func:`oxe_envlogger.format.specs.tensor`."""
    image_codecs = image_codecs or {}
    if isinstance(spec, Mapping):
        return specs.Group({k: dm_spec_to_spec(v, path=specs.join(path, k), image_codec=image_codec,
                                               image_codecs=image_codecs, float64=float64)
                            for k, v in spec.items()})
    if isinstance(spec, (list, tuple)):
        return specs.Group({str(i): dm_spec_to_spec(v, path=specs.join(path, str(i)),
                                                    image_codec=image_codec,
                                                    image_codecs=image_codecs, float64=float64)
                            for i, v in enumerate(spec)}, "tuple")
    if isinstance(spec, dm_specs.StringArray):
        if spec.shape != ():
            raise UnsupportedSpaceError(f"{path}: only scalar StringArray specs are supported")
        return specs.text()
    if isinstance(spec, dm_specs.Array):
        shape, dtype = tuple(spec.shape), np.dtype(spec.dtype)
        codec = image_codecs.get(path)
        if codec is not None or specs.is_image_shape(shape, dtype):
            return specs.image(shape, codec or image_codec)
        leaf = specs.tensor(shape, dtype, float64=float64)
        if isinstance(spec, dm_specs.BoundedArray):  # (DiscreteArray too)
            return specs.with_bounds(leaf, spec.minimum, spec.maximum)
        return leaf
    raise UnsupportedSpaceError(f"{path or '<root>'}: dm_env spec {spec!r} is not supported")


def _has_dm_spec(x: Any) -> bool:
    if isinstance(x, dm_specs.Array):
        return True
    if isinstance(x, Mapping):
        return any(_has_dm_spec(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return any(_has_dm_spec(v) for v in x)
    return False


def _discount_dtype(env: dm_env.Environment) -> Any:
    try:
        return np.dtype(env.discount_spec().dtype)
    except Exception:
        return np.float32


class DmEnvLogger(dm_env.Environment, LoggerMixin):
    """Logs a dm_env environment to RLDS; a ``dm_env.Environment`` itself.

    Args:
      env: the dm_env environment.
      dataset_name, directory: as for :class:`oxe_envlogger.OXEEnvLogger`.
      step_metadata_info, episode_metadata_info: declarations, or None to infer them.
      **options: the keyword options of :class:`oxe_envlogger.OXEEnvLogger`.
    """

    def __init__(self, env: dm_env.Environment, dataset_name: str, directory: str | os.PathLike, *,
                 step_metadata_info: MetadataInfo | None = None,
                 episode_metadata_info: MetadataInfo | None = None,
                 language_instruction: bool | None = None, doc_field: DocField | None = None,
                 version: str = layout.DEFAULT_VERSION, max_episodes_per_file: int | None = None,
                 shard_bytes: int | None = None, image_codec: str | ImageCodec = "png",
                 image_codecs: Mapping[str, str | ImageCodec] | None = None,
                 float64: str | None = None,
                 strict_finite: bool = False, strict_bounds: bool = False,
                 incomplete: str = "keep", overwrite: bool = False,
                 fsync: bool | None = None, writer_options: WriterOptions | None = None,
                 handle_signals: bool = True):
        self._env = env
        codecs = {EpisodeRecorder._step_path(k): v for k, v in (image_codecs or {}).items()}
        reward_spec = env.reward_spec()
        made = specs.check_float64_storage(float64 or "float32")
        self._recorder = EpisodeRecorder(
            directory, dataset_name,
            observation=dm_spec_to_spec(env.observation_spec(), path="observation",
                                        image_codec=image_codec, image_codecs=codecs,
                                        float64=made),
            action=dm_spec_to_spec(env.action_spec(), path="action", image_codec=image_codec,
                                   image_codecs=codecs, float64=made),
            reward_dtype=np.dtype(getattr(reward_spec, "dtype", np.float64)),
            discount_dtype=_discount_dtype(env),
            step_metadata=step_metadata_info, episode_metadata=episode_metadata_info,
            language=language_instruction, image_codec=image_codec, image_codecs=codecs,
            float64=float64, docs=doc_field, strict_finite=strict_finite, strict_bounds=strict_bounds,
            incomplete=incomplete,
            options=_writer_options(writer_options, shard_bytes, max_episodes_per_file, fsync),
            overwrite=overwrite, session=provenance.session_info(env, {"front": "DmEnvLogger"}),
            description="RLDS episodes of a dm_env environment logged by oxe_envlogger.",
            version=version)
        lifecycle.register(self._recorder, handle_signals=handle_signals)

    def reset(self) -> dm_env.TimeStep:
        ts = self._env.reset()
        self._recorder.begin(ts.observation)
        return ts

    def step(self, action) -> dm_env.TimeStep:
        if self._recorder.episode_ended or not self._recorder.in_episode:
            return self.reset()  # dm_env's contract: step() after LAST starts a new episode
        flat = self._recorder.check_action(action)
        ts = self._env.step(action)
        if ts.first():  # the env reset itself
            self._recorder.begin(ts.observation)
            return ts
        terminated = ts.last() and ts.discount is not None and float(ts.discount) == 0.0
        self._recorder.step(flat, ts.reward if ts.reward is not None else 0.0, ts.observation,
                            terminated=terminated, truncated=ts.last() and not terminated,
                            discount=ts.discount if ts.discount is not None else None)
        return ts

    def observation_spec(self):
        return self._env.observation_spec()

    def action_spec(self):
        return self._env.action_spec()

    def reward_spec(self):
        return self._env.reward_spec()

    def discount_spec(self):
        return self._env.discount_spec()

    def close(self) -> None:
        try:
            self.close_logger()
        finally:
            if not getattr(self, "_env_closed", False):
                self._env_closed = True
                self._env.close()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._env, name)


class RLDSBackendWriter(_BackendBase, LoggerMixin):
    """An ``envlogger`` backend that writes RLDS with our writer.

    ``envlogger.EnvLogger(env, backend=RLDSBackendWriter(dir, name, ...), step_fn=...,
    episode_fn=...)``: ``step_fn`` results become step metadata of the timestep's step,
    ``episode_fn`` results episode metadata.

    Args:
      data_directory: dataset directory.
      dataset_name: TFDS dataset name.
      observation_info, action_info: dm_env specs, gymnasium spaces or other declarations; None to
        infer them from the first values.
      step_metadata_info, episode_metadata_info: declarations, or None to infer.
      **options: as for :class:`oxe_envlogger.OXEEnvLogger`.
    """

    def __init__(self, data_directory: str | os.PathLike, dataset_name: str, *,
                 observation_info: Any = None, action_info: Any = None,
                 reward_dtype: Any = np.float64, discount_dtype: Any = np.float32,
                 step_metadata_info: MetadataInfo | None = None,
                 episode_metadata_info: MetadataInfo | None = None,
                 max_episodes_per_file: int | None = None, shard_bytes: int | None = None,
                 image_codec: str | ImageCodec = "png", float64: str | None = None,
                 strict_finite: bool = False,
                 strict_bounds: bool = False, incomplete: str = "keep",
                 overwrite: bool = False, writer_options: WriterOptions | None = None,
                 scheduler: Any = None, metadata: dict[str, Any] | None = None,
                 handle_signals: bool = True):
        if _BackendBase is not object:
            super().__init__(metadata=metadata, scheduler=scheduler)

        made = specs.check_float64_storage(float64 or "float32")

        def declared(info, path):
            if _has_dm_spec(info):
                return dm_spec_to_spec(info, path=path, image_codec=image_codec, float64=made)
            return info

        self._recorder = EpisodeRecorder(
            data_directory, dataset_name, observation=declared(observation_info, "observation"),
            action=declared(action_info, "action"), reward_dtype=reward_dtype,
            discount_dtype=discount_dtype, step_metadata=step_metadata_info,
            episode_metadata=episode_metadata_info, image_codec=image_codec, float64=float64,
            strict_finite=strict_finite, strict_bounds=strict_bounds, incomplete=incomplete,
            options=_writer_options(writer_options, shard_bytes, max_episodes_per_file, None),
            overwrite=overwrite,
            session=provenance.session_info(None, {"front": "RLDSBackendWriter",
                                                   "envlogger_metadata": provenance.json_safe(metadata)}),
            description="RLDS episodes logged through envlogger.EnvLogger by oxe_envlogger.")
        lifecycle.register(self._recorder, handle_signals=handle_signals)

    def _record_step(self, data, is_new_episode: bool) -> None:
        rec = self._recorder
        ts = data.timestep
        if is_new_episode or ts.first():
            rec.begin(ts.observation)
        else:
            flat = rec.check_action(data.action)
            terminated = ts.last() and ts.discount is not None and float(ts.discount) == 0.0
            rec.step(flat, ts.reward if ts.reward is not None else 0.0, ts.observation,
                     terminated=terminated, truncated=ts.last() and not terminated,
                     discount=ts.discount)
        if data.custom_data is not None:
            if not isinstance(data.custom_data, Mapping):
                raise UnsupportedSpaceError(
                    "step_fn must return a dict of step metadata, given "
                    f"{type(data.custom_data).__name__}")
            rec.set_step_metadata(data.custom_data)

    def set_episode_metadata(self, data: Any) -> None:
        if not isinstance(data, Mapping):
            raise UnsupportedSpaceError(
                f"episode_fn must return a dict of episode metadata, given {type(data).__name__}")
        self._recorder.set_episode_metadata(data)

    def close(self) -> None:
        self.close_logger()

    def __del__(self):  # envlogger's base class closes in __del__; we never rely on it
        pass
