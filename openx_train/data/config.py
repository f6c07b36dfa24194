"""Option bundles of the data pipeline: what to read from a dataset, and how to batch it.

A :class:`Structure` maps the keys a dataset was logged with (step-relative paths such as
``"observation/state"`` or ``"action"``) onto the fixed batch format the trainer consumes:
``observation["state"]`` (the listed state keys, normalized and concatenated), one
``observation[<name>]`` per camera, ``action`` (the listed action keys, normalized and
concatenated) and ``language_instruction``. Datasets with different keys mix in one batch as long
as their structures give the same output names and sizes.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import types
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from openx_train.data.errors import ConfigError

#: The language key used when ``Structure.language == "auto"`` and the dataset has it.
LANGUAGE_KEY = "language_instruction"
#: ``LoaderConfig.remainder`` values.
REMAINDERS = ("partial", "pad", "drop")
#: Output names the batch format reserves inside ``observation``.
RESERVED_OBSERVATION_KEYS = frozenset({"state", "pad_mask", "pad_mask_dict"})
#: ``LoaderConfig.domain_key`` for one domain per dataset of the mixture.
DATASET_DOMAIN = "dataset"


class Normalization(str, enum.Enum):
    """How a state or action key is normalized with its dataset statistics.

    ``GAUSSIAN``: ``(x - mean) / std``. ``BOUNDS``: ``[min, max]`` to ``[-1, 1]``. ``BOUNDS_Q99``:
    ``[q01, q99]`` to ``[-1, 1]``, clipped. Dimensions without spread (``std`` or the range 0)
    are centred and left unscaled, so that the inverse is exact.
    """

    NONE = "none"
    GAUSSIAN = "gaussian"
    BOUNDS = "bounds"
    BOUNDS_Q99 = "bounds_q99"

    @classmethod
    def parse(cls, value: str | Normalization, *, key: str = "") -> Normalization:
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(
                f"normalization of {key or 'a key'}: expected one of "
                f"{[m.value for m in cls]}, given {value!r}") from None


def _pair(value: Sequence[int] | int, what: str) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    pair = tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise ConfigError(f"{what}: expected (height, width) of positive ints, given {value!r}")
    return pair  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class Camera:
    """One camera of the batch.

    Attributes:
      key: the logged step key holding the images (``"observation/image"``); None when this
        dataset has no such camera: its frames are zeros and ``pad_mask_dict`` marks them.
      size: ``(height, width)`` of the images in the batch (an int for square images).
    """

    key: str | None
    size: tuple[int, int] = (128, 128)

    def __post_init__(self):
        object.__setattr__(self, "size", _pair(self.size, f"camera {self.key!r} size"))


@dataclasses.dataclass(frozen=True)
class Structure:
    """Which logged keys form the state, the cameras, the action and the language.

    Attributes:
      state: step keys concatenated (in this order, each flattened) into ``observation["state"]``.
      images: output name (e.g. ``"image_primary"``) to :class:`Camera`.
      action: step keys concatenated into ``action``.
      language: the step key of the language instruction; ``"auto"`` takes
        ``"language_instruction"`` when the dataset has it; None leaves language out.
      normalization: per state or action key (as listed in ``state`` and ``action``), a
        :class:`Normalization` (or its string value); keys not listed use
        ``state_normalization`` or ``action_normalization``. Any other key is a ConfigError.
      state_normalization: default for state keys.
      action_normalization: default for action keys.
    """

    state: tuple[str, ...] = ()
    images: Mapping[str, Camera] = dataclasses.field(default_factory=dict)
    action: tuple[str, ...] = ("action",)
    language: str | None = "auto"
    normalization: Mapping[str, Normalization | str] = dataclasses.field(default_factory=dict)
    state_normalization: Normalization | str = Normalization.GAUSSIAN
    action_normalization: Normalization | str = Normalization.GAUSSIAN

    def __post_init__(self):
        for field in ("state", "action"):
            value = getattr(self, field)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, field, tuple(value))
        if not self.action:
            raise ConfigError("structure action: expected at least one action key, given ()")
        images = {}
        for name, camera in dict(self.images).items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ConfigError(f"structure images: expected identifier names, given {name!r}")
            if name in RESERVED_OBSERVATION_KEYS:
                raise ConfigError(f"structure images: {name!r} is reserved in observation "
                                  f"(reserved: {sorted(RESERVED_OBSERVATION_KEYS)})")
            if not isinstance(camera, Camera):
                raise ConfigError(f"structure images[{name!r}]: expected a Camera, given "
                                  f"{camera!r}")
            images[name] = camera
        object.__setattr__(self, "images", types.MappingProxyType(images))
        norms = {k: Normalization.parse(v, key=k) for k, v in dict(self.normalization).items()}
        known = {*self.state, *self.action}
        unknown = sorted(set(norms) - known)
        if unknown:
            # A misspelt key would otherwise be ignored and its key normalized by default.
            hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
            hint = "".join(f"; {k!r}: did you mean {m[0]!r}?" for k, m in hints.items() if m)
            raise ConfigError(f"structure normalization: keys {unknown} are not state or action "
                              f"keys of this structure; expected keys among {sorted(known)}"
                              f"{hint}")
        object.__setattr__(self, "normalization", types.MappingProxyType(norms))
        object.__setattr__(self, "state_normalization",
                           Normalization.parse(self.state_normalization, key="state"))
        object.__setattr__(self, "action_normalization",
                           Normalization.parse(self.action_normalization, key="action"))
        overlap = set(self.state) & set(self.action)
        if overlap:
            raise ConfigError(f"structure: keys {sorted(overlap)} are both state and action")

    def normalization_of(self, key: str) -> Normalization:
        """The normalization of one logged state or action key."""
        if key in self.normalization:
            return self.normalization[key]
        return self.action_normalization if key in self.action else self.state_normalization

    def normalized_keys(self) -> list[str]:
        """State and action keys that need statistics."""
        return [k for k in (*self.state, *self.action)
                if self.normalization_of(k) is not Normalization.NONE]

    def to_json(self) -> dict[str, Any]:
        """A JSON-serializable description; :meth:`from_json` reads it back."""
        return {"state": list(self.state),
                "images": {n: {"key": c.key, "size": list(c.size)}
                           for n, c in self.images.items()},
                "action": list(self.action), "language": self.language,
                "normalization": {k: v.value for k, v in self.normalization.items()},
                "state_normalization": Normalization(self.state_normalization).value,
                "action_normalization": Normalization(self.action_normalization).value}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Structure:
        """The structure :meth:`to_json` described.

        Raises:
          ConfigError: for a description that is not a structure (naming the field).
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"structure: expected a JSON object, given {data!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(f"structure: unknown fields {unknown}; expected fields among "
                              f"{sorted(fields)}")
        kwargs = dict(data)
        images = kwargs.get("images", {})
        if not isinstance(images, Mapping):
            raise ConfigError(f"structure images: expected {{name: {{'key', 'size'}}}}, given "
                              f"{images!r}")
        try:
            kwargs["images"] = {n: Camera(c["key"], tuple(c.get("size", (128, 128))))
                                for n, c in images.items()}
        except (KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"structure images: expected {{name: {{'key', 'size'}}}}, given "
                              f"{images!r}") from e
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Image augmentation of training batches. One crop and one set of colour factors are drawn
    per camera and sample, and applied to every frame of its history window.

    Attributes:
      crop_scale: range of the crop's area as a fraction of the image; None: no crop.
      crop_ratio: range of the crop's aspect ratio relative to the image's.
      brightness: maximum brightness delta (images in [0, 1]); 0 disables.
      contrast: range of the contrast factor; None disables.
      saturation: range of the saturation factor; None disables.
      hue: maximum hue delta (in [0, 0.5]); 0 disables.
    """

    crop_scale: tuple[float, float] | None = (0.8, 1.0)
    crop_ratio: tuple[float, float] = (0.9, 1.1)
    brightness: float = 0.1
    contrast: tuple[float, float] | None = (0.9, 1.1)
    saturation: tuple[float, float] | None = (0.9, 1.1)
    hue: float = 0.05

    def __post_init__(self):
        def check_range(name, value, lo, hi):
            if value is None:
                return
            a, b = value
            if not (lo <= a <= b <= hi):
                raise ConfigError(f"augment {name}: expected lo <= hi within [{lo}, {hi}], "
                                  f"given {value!r}")

        check_range("crop_scale", self.crop_scale, 1e-3, 1.0)
        check_range("crop_ratio", self.crop_ratio, 1e-2, 1e2)
        check_range("contrast", self.contrast, 0.0, 1e3)
        check_range("saturation", self.saturation, 0.0, 1e3)
        if not 0 <= self.brightness <= 1:
            raise ConfigError(f"augment brightness: expected in [0, 1], given {self.brightness!r}")
        if not 0 <= self.hue <= 0.5:
            raise ConfigError(f"augment hue: expected in [0, 0.5], given {self.hue!r}")


EpisodeFilter = Callable[[Mapping[str, Any]], Any]


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """One dataset of a mixture.

    Attributes:
      path: the dataset directory (``dataset_info.json`` inside).
      structure: which keys to read and how (:class:`Structure`).
      name: the dataset's name in weights and reports; default: the name in ``dataset_info.json``.
      split: the split trained on; statistics are computed on it.
      val_split: a split of the dataset used for validation, if it has one.
      val_fraction: otherwise, this fraction of the training split's episodes (drawn with
        ``LoaderConfig.seed``) is held out for validation and never trained on.
      filters: episode predicates run before anything else, on each episode as numpy
        (``{"steps": {...}, "episode_index", "episode_length", <episode fields>}``, the dict
        ``load_dataset`` gives, with the structure's keys); images are not loaded when they
        run. A predicate may return a Python, numpy or TensorFlow bool (or an array: all must
        hold).
      min_length: episodes with fewer RLDS steps are dropped (2 = at least one action).
      drop_invalid: drop episodes flagged ``invalid`` (cut short by a crash or close).
      statistics: precomputed statistics to use instead of ``compute_dataset_statistics``.
      episodes: train on these episodes only (their ids as ``DataLoader.episodes`` reports
        them, e.g. a data budget's selection); None: all. Applied after the validation
        hold-out, to the training split only, so a restricted run validates on the frames an
        unrestricted one does; an id that is not among the training episodes is a ConfigError.
    """

    path: str | os.PathLike
    structure: Structure
    name: str | None = None
    split: str = "train"
    val_split: str | None = None
    val_fraction: float = 0.0
    filters: tuple[EpisodeFilter, ...] = ()
    min_length: int = 2
    drop_invalid: bool = False
    statistics: Any = None
    episodes: Collection[str] | None = None

    def __post_init__(self):
        object.__setattr__(self, "path", os.fspath(self.path))
        object.__setattr__(self, "filters", tuple(self.filters))
        if self.episodes is not None:
            if isinstance(self.episodes, (str, bytes)):
                raise ConfigError(f"dataset {self.path}: episodes expected a collection of "
                                  f"episode ids, given the string {self.episodes!r}")
            object.__setattr__(self, "episodes", frozenset(
                e.decode() if isinstance(e, bytes) else str(e) for e in self.episodes))
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"dataset {self.path}: val_fraction expected in [0, 1), given "
                              f"{self.val_fraction!r}")
        if self.val_split is not None and self.val_fraction:
            raise ConfigError(f"dataset {self.path}: give val_split or val_fraction, not both")
        if self.min_length < 1:
            raise ConfigError(f"dataset {self.path}: min_length expected >= 1, given "
                              f"{self.min_length!r}")


MixtureWeights = str | Sequence[float] | Mapping[str, float]


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """How batches are made.

    Attributes:
      batch_size: samples per batch (per process).
      n_obs: history window: observations t-n_obs+1 .. t, padded at the episode start.
      n_action: action chunk: actions t .. t+n_action-1, padded past the episode end.
      goal_relabeling: add ``goal``: the observation of a uniformly drawn future step of the
        same episode.
      drop_final_step: the final RLDS step (its action is padding) is never a training frame.
      weights: ``"uniform"`` (each dataset equally), ``"size"`` (by number of frames), a
        sequence aligned with the datasets, a mapping from dataset name, or the path of a JSON
        weights file (as written by ``save_mixture_weights``, e.g. by a Re-Mix run). With a
        metadata ``domain_key`` the weights are per domain (named by ``domain_names``): the
        loader draws a domain by weight, then a frame of that domain.
      domain_key: what ``domain_id`` in a batch tells apart: ``"dataset"`` (one domain per
        dataset, in the order given) or an episode field such as
        ``"episode_metadata/operator"`` (a string, integer or bool field; the domains are its
        distinct values across the mixture, sorted; see ``make_dataloader``).
      augment: image augmentation of training batches; None disables.
      image_dtype: ``"uint8"`` (0..255) or ``"float32"`` (0..1).
      seed: seeds the shuffle, the mixture, the goals and the augmentation.
      deterministic: the same seed gives the same camera batches (parallel stages keep their
        order); state-only batches (numpy) always are.
      process_index: this process's index among ``process_count`` (multi-host training): each
        process reads a disjoint share of every dataset's frames.
      process_count: number of processes sharing the data.
      remainder: the validation pass's last batch, when the frames do not fill it (training
        never ends): ``"partial"`` a smaller batch, so every frame comes once (with several
        processes, their batch counts may differ by one); ``"pad"`` filled to ``batch_size``
        with copies of a frame marked ``valid=False``, and the same number of batches on every
        process: fixed shapes for a jitted step, also across hosts; ``"drop"`` full batches
        only, the same number on every process, the frames left over skipped (a ConfigError
        when that leaves no batch).
      prefetch: camera batches prepared ahead.
      num_parallel_calls: parallelism of image decoding; -1 lets tf.data tune it.
      start_batch: the training stream starts at this batch number (a resumed run passes its
        step): the batches are those an uninterrupted stream gives from there on (the batches
        before are drawn but not gathered, a few microseconds each).
    """

    batch_size: int = 256
    n_obs: int = 1
    n_action: int = 1
    goal_relabeling: bool = False
    drop_final_step: bool = True
    weights: MixtureWeights = "uniform"
    domain_key: str = DATASET_DOMAIN
    augment: AugmentConfig | None = dataclasses.field(default_factory=AugmentConfig)
    image_dtype: str = "uint8"
    seed: int = 0
    deterministic: bool = False
    process_index: int = 0
    process_count: int = 1
    remainder: str = "partial"
    prefetch: int = 2
    num_parallel_calls: int = -1
    start_batch: int = 0

    def __post_init__(self):
        if int(self.start_batch) < 0:
            raise ConfigError(f"loader start_batch: expected >= 0, given {self.start_batch!r}")
        for name in ("batch_size", "n_obs", "n_action", "process_count", "prefetch"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"loader {name}: expected >= 1, given {getattr(self, name)!r}")
        if not 0 <= self.process_index < self.process_count:
            raise ConfigError(f"loader process_index: expected in [0, {self.process_count}), "
                              f"given {self.process_index!r}")
        if not isinstance(self.domain_key, str) or not self.domain_key.strip("/"):
            raise ConfigError(f"loader domain_key: expected 'dataset' or an episode field, given "
                              f"{self.domain_key!r}")
        if self.remainder not in REMAINDERS:
            raise ConfigError(f"loader remainder: expected one of {list(REMAINDERS)}, given "
                              f"{self.remainder!r}")
        if self.image_dtype not in ("uint8", "float32"):
            raise ConfigError(f"loader image_dtype: expected 'uint8' or 'float32', given "
                              f"{self.image_dtype!r}")
        if self.num_parallel_calls != -1 and self.num_parallel_calls < 1:
            raise ConfigError(f"loader num_parallel_calls: expected -1 or >= 1, given "
                              f"{self.num_parallel_calls!r}")
