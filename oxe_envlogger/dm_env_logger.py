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

from oxe_envlogger.envlogger import LoggerMixin
from oxe_envlogger.errors import UnsupportedSpaceError
from oxe_envlogger.format import provenance, specs
from oxe_envlogger.format.codecs import ImageCodec
from oxe_envlogger.format.specs import Spec
from oxe_envlogger.options import LoggerOptions

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
      options, **keywords: the options (:class:`oxe_envlogger.LoggerOptions`), as for
        :class:`oxe_envlogger.OXEEnvLogger`; metadata not declared, and whether there is a
        language instruction, are inferred from the first episode. ``reward_dtype`` defaults
        to the dtype of the env's ``reward_spec()``.

    Raises:
      UnknownOptionError: for a keyword that is not an option, naming the valid ones.
    """

    def __init__(self, env: dm_env.Environment, dataset_name: str, directory: str | os.PathLike, *,
                 options: LoggerOptions | None = None, **keywords: Any):
        opts = LoggerOptions.from_keywords("DmEnvLogger", keywords, options=options)
        self._env = env
        opts = opts.with_defaults(
            reward_dtype=np.dtype(getattr(env.reward_spec(), "dtype", np.float64)))
        codecs = {specs.step_key(k): v for k, v in (opts.image_codecs or {}).items()}
        made = specs.check_float64_storage(opts.float64 or "float32")
        self._recorder = opts.build_recorder(
            directory, dataset_name,
            observation=dm_spec_to_spec(env.observation_spec(), path="observation",
                                        image_codec=opts.image_codec, image_codecs=codecs,
                                        float64=made),
            action=dm_spec_to_spec(env.action_spec(), path="action", image_codec=opts.image_codec,
                                   image_codecs=codecs, float64=made),
            discount_dtype=_discount_dtype(env), image_codecs=codecs,
            session=provenance.session_info(env, {"front": "DmEnvLogger"}),
            description="RLDS episodes of a dm_env environment logged by oxe_envlogger.")

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
        """Writes the last episode, commits the dataset, then closes the env. Idempotent."""
        self._close_logger_and_env(self._env)

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
      discount_dtype: dtype of ``discount``.
      scheduler, metadata: as for envlogger's ``BackendWriter``.
      options, **keywords: the options (:class:`oxe_envlogger.LoggerOptions`), as for
        :class:`oxe_envlogger.OXEEnvLogger`; metadata not declared, and whether there is a
        language instruction, are inferred from the first episode.

    Raises:
      UnknownOptionError: for a keyword that is not an option, naming the valid ones.
    """

    def __init__(self, data_directory: str | os.PathLike, dataset_name: str, *,
                 observation_info: Any = None, action_info: Any = None,
                 discount_dtype: Any = np.float32, scheduler: Any = None,
                 metadata: dict[str, Any] | None = None, options: LoggerOptions | None = None,
                 **keywords: Any):
        opts = LoggerOptions.from_keywords("RLDSBackendWriter", keywords, options=options)
        if _BackendBase is not object:
            super().__init__(metadata=metadata, scheduler=scheduler)
        opts = opts.with_defaults(reward_dtype=np.float64)
        codecs = {specs.step_key(k): v for k, v in (opts.image_codecs or {}).items()}
        made = specs.check_float64_storage(opts.float64 or "float32")

        def declared(info, path):
            if _has_dm_spec(info):
                return dm_spec_to_spec(info, path=path, image_codec=opts.image_codec,
                                       image_codecs=codecs, float64=made)
            return info

        self._recorder = opts.build_recorder(
            data_directory, dataset_name, observation=declared(observation_info, "observation"),
            action=declared(action_info, "action"), discount_dtype=discount_dtype,
            image_codecs=codecs,
            session=provenance.session_info(None, {"front": "RLDSBackendWriter",
                                                   "envlogger_metadata": provenance.json_safe(metadata)}),
            description="RLDS episodes logged through envlogger.EnvLogger by oxe_envlogger.")

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
