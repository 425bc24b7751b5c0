"""Image classification data as numpy batches: TFDS datasets, scikit-learn's digits, synthetic.

    >>> from asgssd_jax import data
    >>> ds = data.load("digits", input_shape=(28, 28, 1))
    >>> for x, y in data.batches(ds.train, 64, seed=0, epoch=3, augment=ds.augment):
    ...     ...  # x: float32 [64, 28, 28, 1] in [0, 1]; y: int32 [64]

Datasets (``load(name)``):

* ``"digits"``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes, no
  download), split 1437 train / 360 test, stratified by ``split_seed``.
* ``"synthetic"``: class-conditional textures (coloured gratings at random phases, plus
  noise) of any HWC shape and number of classes; a small CNN learns them in a few hundred
  steps.
* Any TFDS image classification dataset prepared under ``data_dir`` (nothing is downloaded):
  the paper's ``"fashion_mnist"``, ``"cifar10"``, ``"svhn_cropped"`` (alias ``"svhn"``),
  ``"stl10"`` and ``"imagenet2012"`` (alias ``"imagenet"``). Both TFDS file formats are read
  without TensorFlow: ArrayRecord through ``tfds.data_source``, TFRecord (TFDS's default)
  through a small reader here. Datasets of fixed-size images are decoded into memory once;
  variable-size ones (ImageNet) are decoded per batch, with Inception-style random-resized
  crops for training and a centre crop (87.5%) for evaluation.

Batches are float32 NHWC in [0, 1] with int32 labels, or float32 soft labels ``[B, C]`` with
MixUp. They are a pure function of ``(seed, epoch)``: a resumed run passes the same two and
``start_batch``. With ``num_shards=k`` each of k processes gets its slice of every global
batch, exactly the rows it would get from the unsharded batch (augmentation included).

The pipeline runs on grain: ``epoch_dataset`` is a ``grain.MapDataset`` whose element ``b`` is
batch ``b`` of the epoch (random access, a function of its index alone), and ``batches`` reads
it through grain's prefetching threads (``num_threads``) and worker processes
(``num_workers``), returning grain's checkpointable iterator (``get_state``/``set_state``).
Splits are grain random-access sources: TFDS ArrayRecord through ``tfds.data_source``, the
TFRecord files through the reader here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import math
import os
import struct
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import grain
import numpy as np

__all__ = [
    "DATASETS",
    "ArraySplit",
    "Augment",
    "Dataset",
    "BUILTIN",
    "DatasetUnavailableError",
    "RecordSplit",
    "Split",
    "batches",
    "epoch_dataset",
    "load",
    "num_batches",
    "resize",
]

#: The datasets that are made here, with no download and no ``data_dir``.
BUILTIN = ("digits", "synthetic")
# The paper's datasets, plus the two that need no download.
DATASETS = ("digits", "synthetic", "fashion_mnist", "cifar10", "svhn_cropped", "stl10",
            "imagenet2012")
_ALIASES = {"svhn": "svhn_cropped", "imagenet": "imagenet2012"}
# Datasets whose classes change under a horizontal flip (digits, house numbers, patterns).
_NO_FLIP = ("digits", "synthetic", "svhn_cropped", "mnist")
_DEFAULT_RECORD_SHAPE = (224, 224, 3)  # variable-size images (ImageNet) are cropped to this


class DatasetUnavailableError(FileNotFoundError):
    """A dataset cannot be read here; the message says how to provide it."""


@dataclasses.dataclass(frozen=True)
class Augment:
    """Training augmentation of fixed-size images.

    Attributes:
      crop_padding: pad each side with this many zero pixels, then crop a random window of the
        original size (0: no crop).
      flip: flip horizontally with probability 1/2.
    """

    crop_padding: int = 4
    flip: bool = True


class Split(Protocol):
    """One split of a dataset: random access to examples."""

    num_classes: int

    def __len__(self) -> int: ...

    def take(
        self, indices: np.ndarray, keys: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Examples ``indices`` as (images ``[n, H, W, C]`` uint8 or float32, labels int32).

        ``keys`` (one integer per example) seed the example's random preprocessing, if the
        split has any; ``None`` means evaluation preprocessing.
        """
        ...


@dataclasses.dataclass(frozen=True, eq=False)
class ArraySplit:
    """A split held in memory: uint8 images (scaled by 1/255 when batched) or float32 in [0, 1]."""

    images: np.ndarray
    labels: np.ndarray
    num_classes: int

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices, keys=None):
        return self.images[indices], self.labels[indices]


@dataclasses.dataclass(frozen=True, eq=False)
class RecordSplit:
    """A prepared TFDS split decoded per batch (for datasets too large for memory).

    Images of any size become ``image_shape``: a random-resized crop when ``take`` is given
    keys (training), else the central 87.5% of the shorter side (evaluation).
    """

    records: Any  # __len__ and __getitems__(list[int]) -> list of {image: bytes, label: int}
    image_shape: tuple[int, int, int]
    num_classes: int
    image_key: str = "image"
    label_key: str = "label"
    size: int | None = None  # use only the first `size` records

    def __len__(self) -> int:
        n = len(self.records)
        return n if self.size is None else min(n, self.size)

    def take(self, indices, keys=None):
        examples = self.records.__getitems__([int(i) for i in indices])
        keys = [None] * len(examples) if keys is None else keys
        # grain decodes several batches at once (its threads and processes): one batch is
        # decoded in order
        images = [_decode_crop(e[self.image_key], k, self.image_shape)
                  for e, k in zip(examples, keys)]
        labels = np.asarray([e[self.label_key] for e in examples], np.int32)
        return np.stack(images), labels


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset ready to batch.

    Attributes:
      name: canonical name (``"cifar10"``, ``"digits"``, ...).
      train, test: the splits (TFDS's ``validation`` split when there is no ``test``).
      num_classes: number of classes.
      input_shape: per-example (H, W, C) of the batches.
      augment: the usual training augmentation for this dataset (``None``: none).
    """

    name: str
    train: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, int, int]
    augment: Augment | None


def load(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
    split_seed: int = 0,
) -> Dataset:
    """Loads a dataset; deterministic given its arguments.

    Args:
      name: ``"digits"``, ``"synthetic"``, or a TFDS name (``"cifar10"``, ``"svhn"``,
        ``"imagenet2012:5.1.0"``, ...).
      data_dir: where prepared TFDS datasets live (default: TFDS's, ``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``). Nothing is ever downloaded.
      input_shape: (H, W, C) of the batches. Images are resized bilinearly (grayscale may be
        repeated to 3 channels). Default: the dataset's own; (224, 224, 3) for variable-size
        images; (32, 32, 3) for synthetic.
      num_classes: synthetic only (default 10).
      train_size, test_size: use at most this many examples of each split (synthetic: generate
        exactly this many; default 2048 and 512).
      split_seed: the digits train/test split and the synthetic data.

    Returns:
      A :class:`Dataset`.

    Raises:
      DatasetUnavailableError: a TFDS dataset is not prepared in ``data_dir``.
    """
    name = _ALIASES.get(name, name)
    shape = None if input_shape is None else tuple(int(d) for d in input_shape)
    if shape is not None and len(shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got {input_shape}")
    if num_classes is not None and name != "synthetic":
        raise ValueError(f"num_classes is set by the data of {name!r}; only 'synthetic' takes it")
    if name == "digits":
        train, test = _digits(split_seed)
    elif name == "synthetic":
        shape = shape or (32, 32, 3)
        train, test = _synthetic(shape, num_classes or 10, train_size or 2048,
                                 test_size or 512, split_seed)
    else:
        return _load_tfds(name, data_dir, shape, train_size, test_size)
    train, test = (_fit(s, shape, n) for s, n in ((train, train_size), (test, test_size)))
    return Dataset(name, train, test, train.num_classes, train.images.shape[1:],
                   _default_augment(name, train.images.shape[1:]))


def num_batches(split: Split, batch_size: int, *, drop_remainder: bool = True) -> int:
    """Number of global batches :func:`batches` yields per epoch."""
    n = len(split)
    return n // batch_size if drop_remainder else -(-n // batch_size)


def epoch_dataset(
    split: Split,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    augment: Augment | None = None,
    mixup_alpha: float = 0.0,
    drop_remainder: bool = True,
    num_shards: int = 1,
    shard_index: int = 0,
) -> grain.MapDataset:
    """One epoch as a ``grain.MapDataset`` of ``(x, y)`` batches: element ``b`` is batch ``b``,
    a pure function of ``(seed, epoch, b)``. The arguments are those of :func:`batches`."""
    if batch_size <= 0 or batch_size % num_shards:
        raise ValueError(f"batch_size {batch_size} must be a positive multiple of "
                         f"num_shards {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} must be in [0, {num_shards})")
    if min(seed, epoch) < 0 or mixup_alpha < 0:
        raise ValueError("seed, epoch and mixup_alpha must be >= 0")
    n = len(split)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    count = num_batches(split, batch_size, drop_remainder=drop_remainder)
    return grain.MapDataset.range(count).map(_EpochBatch(
        split, batch_size, order, seed, epoch, augment, mixup_alpha, num_shards, shard_index))


def batches(
    split: Split,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    augment: Augment | None = None,
    mixup_alpha: float = 0.0,
    drop_remainder: bool = True,
    num_shards: int = 1,
    shard_index: int = 0,
    start_batch: int = 0,
    num_threads: int | None = None,
    num_workers: int = 0,
) -> grain.DatasetIterator:
    """One epoch of ``(x, y)`` batches; a pure function of ``(seed, epoch)``.

    Args:
      split: ``dataset.train`` or ``dataset.test``.
      batch_size: global batch size (all shards together).
      seed, epoch: the shuffle order and the augmentation draws.
      shuffle: visit the split in a random order (else in order, for evaluation).
      augment: crop/flip augmentation (``dataset.augment`` is the usual one); it also turns on
        a :class:`RecordSplit`'s random-resized crops.
      mixup_alpha: if > 0, MixUp (Zhang et al., 2017): each global batch is mixed with a
        permutation of itself, ``lam ~ Beta(alpha, alpha)``, and ``y`` becomes soft labels
        float32 ``[B, num_classes]``.
      drop_remainder: skip the last partial batch.
      num_shards, shard_index: this process's rows of every global batch: rows
        ``[i * B / k, (i + 1) * B / k)`` (the last partial batch is split as evenly as possible).
      start_batch: skip the first batches of the epoch (to resume a run mid-epoch).
      num_threads: grain threads preparing batches ahead (default: one for data in memory,
        ``min(16, cpus)`` for a :class:`RecordSplit`, whose images are decoded per batch).
      num_workers: grain worker processes (0: none), each with ``num_threads`` threads.

    Returns:
      grain's iterator of ``(x, y)``: ``x`` float32 ``[B / num_shards, H, W, C]`` in [0, 1];
      ``y`` int32 ``[B / num_shards]`` (float32 ``[B / num_shards, num_classes]`` with MixUp).
      The batches do not depend on ``num_threads`` or ``num_workers``.
    """
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    if num_workers < 0 or (num_threads is not None and num_threads < 1):
        raise ValueError(f"num_workers must be >= 0 and num_threads >= 1, got {num_workers} "
                         f"and {num_threads}")
    dataset = epoch_dataset(split, batch_size, seed=seed, epoch=epoch, shuffle=shuffle,
                            augment=augment, mixup_alpha=mixup_alpha,
                            drop_remainder=drop_remainder, num_shards=num_shards,
                            shard_index=shard_index)[start_batch:]
    if num_threads is None:
        num_threads = min(16, os.cpu_count() or 1) if isinstance(split, RecordSplit) else 1
    # a small buffer: batches of large images are big, and prefetching more buys nothing
    loader = dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=num_threads, prefetch_buffer_size=max(2, num_threads)))
    if num_workers:
        from absl import flags

        # grain 0.2.18's worker processes read an absl flag, which fails in a program that did
        # not parse absl flags (fixed in later grain): their defaults are what we want
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        loader = loader.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=2))
    return iter(loader)


def resize(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of NHWC images (half-pixel centres, antialiased when shrinking).

    Matches ``jax.image.resize(..., "bilinear")`` but stays in numpy, so loading data never
    touches an accelerator (or initialises JAX before ``jax.distributed.initialize``).
    Returns float32.
    """
    rows, cols = _interpolation(images.shape[1], height), _interpolation(images.shape[2], width)
    return np.einsum("oh,nhwc,pw->nopc", rows, images.astype(np.float32), cols)


# ---------------------------------------------------------------------------- batching


@dataclasses.dataclass(frozen=True, eq=False)
class _EpochBatch:
    """Batch ``b`` of an epoch, this shard's rows; picklable, for grain's worker processes."""

    split: Any
    batch_size: int
    order: np.ndarray
    seed: int
    epoch: int
    augment: Augment | None
    mixup_alpha: float
    num_shards: int
    shard_index: int

    def __call__(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        b = int(b)
        indices = self.order[b * self.batch_size:(b + 1) * self.batch_size]
        return _batch(self.split, indices, self.num_shards, self.shard_index,
                      np.random.default_rng([self.seed, self.epoch, b]), self.augment,
                      self.mixup_alpha)


def _batch(split, indices, num_shards, shard_index, rng, augment, mixup_alpha):
    """This shard's rows of the global batch `indices`; every random draw is for the global
    batch, so the shards together are the unsharded batch."""
    size = len(indices)
    rows = np.array_split(np.arange(size), num_shards)[shard_index]
    keys = rng.integers(0, 2**63, size=size) if augment is not None else None
    if augment is not None:
        offsets = rng.integers(0, 2 * augment.crop_padding + 1, size=(2, size))
        flips = rng.random(size) < 0.5 if augment.flip else np.zeros(size, bool)
    if mixup_alpha > 0:
        lam = np.float32(rng.beta(mixup_alpha, mixup_alpha))
        partner = rng.permutation(size)
        needed, where = np.unique(np.concatenate([rows, partner[rows]]), return_inverse=True)
    else:
        needed, where = rows, np.arange(len(rows))
    images, labels = split.take(indices[needed], None if keys is None else keys[needed])
    x = images.astype(np.float32) / 255 if images.dtype == np.uint8 else images
    x = x.astype(np.float32, copy=False)
    if augment is not None:
        x = _crop_flip(x, augment.crop_padding, offsets[:, needed], flips[needed])
    if mixup_alpha <= 0:
        return x, labels.astype(np.int32)
    mine, theirs = where[:len(rows)], where[len(rows):]
    onehot = np.eye(split.num_classes, dtype=np.float32)[labels]
    return (lam * x[mine] + (1 - lam) * x[theirs],
            lam * onehot[mine] + (1 - lam) * onehot[theirs])


def _crop_flip(x, padding, offsets, flips):
    """Random crop of the zero-padded images and horizontal flip, as one gather."""
    n, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    ys = offsets[0][:, None] + np.arange(h)
    xs = offsets[1][:, None] + np.arange(w)
    xs = np.where(flips[:, None], xs[:, ::-1], xs)
    return padded[np.arange(n)[:, None, None], ys[:, :, None], xs[:, None, :]]


def _interpolation(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] weights of a triangle kernel, widened when shrinking."""
    scale = max(size_in / size_out, 1.0)
    centres = (np.arange(size_out) + 0.5) * size_in / size_out
    weights = np.maximum(0, 1 - np.abs(np.arange(size_in) + 0.5 - centres[:, None]) / scale)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------------- in-memory data


def _fit(split: ArraySplit, shape, size) -> ArraySplit:
    """Limits a split to `size` examples and resizes it to `shape`."""
    images, labels = split.images[:size], split.labels[:size]
    if shape is not None and tuple(images.shape[1:3]) != shape[:2]:
        resized = resize(images, *shape[:2])
        if images.dtype == np.uint8:
            resized = np.clip(np.round(resized), 0, 255).astype(np.uint8)
        images = resized
    if shape is not None and images.shape[3] != shape[2]:
        if images.shape[3] != 1:
            raise ValueError(f"cannot turn {images.shape[3]}-channel images into "
                             f"{shape[2]} channels")
        images = np.repeat(images, shape[2], axis=3)
    return ArraySplit(np.ascontiguousarray(images), labels, split.num_classes)


def _default_augment(name: str, shape) -> Augment:
    return Augment(crop_padding=max(1, shape[0] // 8), flip=name not in _NO_FLIP)


def _digits(split_seed: int) -> tuple[ArraySplit, ArraySplit]:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise ModuleNotFoundError(
            "the 'digits' dataset needs scikit-learn: pip install 'asgssd-jax[data]'") from e
    digits = load_digits()
    images = (digits.images[..., None] / 16).astype(np.float32)
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=360, stratify=labels, random_state=split_seed)
    return ArraySplit(x_train, y_train, 10), ArraySplit(x_test, y_test, 10)


def _synthetic(shape, num_classes, train_size, test_size, seed):
    """Per class a texture: two coloured gratings (orientation, frequency, colour fixed per
    class; the first orientations evenly spread), at a random phase per example, plus noise.

    The class is in local, shift-invariant structure, which convolutions and global pooling
    pick up (a two-layer CNN reaches ~98% in 300 steps on 28x28x1); a linear template on pixels
    does not.
    """
    h, w, c = shape
    rng = np.random.default_rng([seed, 0])
    angles = np.stack([np.arange(num_classes) / num_classes, rng.random(num_classes)], 1) * np.pi
    frequencies = rng.uniform(0.08, 0.3, (num_classes, 2))  # cycles per pixel
    colours = rng.uniform(0.3, 1.0, (num_classes, 2, c))
    rows, cols = np.mgrid[0:h, 0:w]

    def split(size, stream):
        r = np.random.default_rng([seed, stream])
        labels = r.integers(0, num_classes, size=size).astype(np.int32)
        images = np.empty((size, h, w, c), np.float32)
        for start in range(0, size, 1024):  # bounded memory for large shapes
            k = labels[start:start + 1024]
            phases = r.uniform(0, 2 * np.pi, (len(k), 2, 1, 1))
            along = (np.cos(angles[k])[..., None, None] * cols
                     + np.sin(angles[k])[..., None, None] * rows)
            waves = np.cos(2 * np.pi * frequencies[k][..., None, None] * along + phases)
            texture = 0.5 + 0.25 * np.einsum("njhw,njc->nhwc", waves, colours[k])
            noisy = texture + r.normal(0, 0.1, texture.shape)
            images[start:start + len(k)] = np.clip(noisy, 0, 1)
        return ArraySplit(images, labels, num_classes)

    return split(train_size, 1), split(test_size, 2)


# ---------------------------------------------------------------------------- TFDS


def _load_tfds(name, data_dir, shape, train_size, test_size) -> Dataset:
    tfds = _import_tfds(name)
    builder = _prepared_builder(tfds, name, data_dir)
    info = builder.info
    image_key, label_key = _supervised_keys(info, name)
    image_feature, label_feature = info.features[image_key], info.features[label_key]
    num_classes = int(label_feature.num_classes)
    test_name = "test" if "test" in info.splits else "validation"
    splits = []
    for split_name, size in (("train", train_size), (test_name, test_size)):
        records = _records(tfds, builder, split_name, image_key)
        if None in tuple(image_feature.shape):
            record_shape = shape or _DEFAULT_RECORD_SHAPE
            splits.append(RecordSplit(records, record_shape, num_classes, image_key, label_key,
                                      size))
        else:
            in_memory = _read_all(records, image_key, label_key, image_feature.shape, size)
            splits.append(_fit(ArraySplit(*in_memory, num_classes), shape, None))
    train, test = splits
    base = name.split(":")[0]
    if isinstance(train, RecordSplit):
        input_shape, augment = train.image_shape, Augment(crop_padding=0, flip=True)
    else:
        input_shape = tuple(train.images.shape[1:])
        augment = _default_augment(base, input_shape)
    return Dataset(base, train, test, num_classes, input_shape, augment)


def _import_tfds(name):
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ModuleNotFoundError(
            f"reading the TFDS dataset {name!r} needs tensorflow-datasets and pillow: "
            "pip install 'asgssd-jax[data]' (TensorFlow itself is not needed)") from e
    return tfds


def _prepared_builder(tfds, name, data_dir):
    root = os.fspath(data_dir) if data_dir is not None else None
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    # TFDS warns about a missing dataset_info.json before our message says what to do
    absl_logger.setLevel(logging.ERROR)
    try:
        builder = tfds.builder(name, data_dir=root)
        prepared = builder.is_prepared()
    except Exception as e:  # unknown names and unreadable directories alike
        raise DatasetUnavailableError(_how_to_provide(name, root, found=None)) from e
    finally:
        absl_logger.setLevel(level)
    if not prepared:
        raise DatasetUnavailableError(_how_to_provide(name, root, found=_versions(name, root)))
    return builder


def _how_to_provide(name, data_dir, found):
    base = name.split(":")[0]
    where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    lines = [f"dataset {name!r} is not prepared in {where}, and it cannot be downloaded here "
             "(asgssd-jax never downloads)."]
    if found:
        lines.append(f"{where}/{base} holds version(s) {', '.join(found)}: "
                     f"load('{base}:{found[-1]}', ...) reads that one.")
    lines += [
        "To provide it: on a machine with network, run",
        "    pip install tensorflow tensorflow-datasets",
        f"    python -c \"import tensorflow_datasets as tfds; "
        f"tfds.builder('{base}', data_dir='DIR').download_and_prepare()\"",
        f"then copy DIR/{base} (or ~/tensorflow_datasets/{base}, if already prepared there) to "
        f"DATA_DIR/{base} on this machine and pass data_dir=DATA_DIR (--data-dir DATA_DIR on "
        "the command line). TensorFlow is not needed to read it.",
    ]
    if base == "imagenet2012":
        lines.append("ImageNet needs a manual download first: put ILSVRC2012_img_train.tar and "
                     "ILSVRC2012_img_val.tar in DIR/downloads/manual.")
    return "\n".join(lines)


def _versions(name, data_dir):
    base = name.split(":")[0]
    root = os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR")
                              or "~/tensorflow_datasets")
    path = os.path.join(root, base)
    if not os.path.isdir(path):
        return []
    return sorted(v for v in os.listdir(path) if v[:1].isdigit()
                  and os.path.exists(os.path.join(path, v, "dataset_info.json")))


def _supervised_keys(info, name):
    keys = info.supervised_keys
    if isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys):
        image_key, label_key = keys
    else:
        image_key, label_key = "image", "label"
    features = info.features
    if image_key not in features or label_key not in features or not hasattr(
            features[label_key], "num_classes"):
        raise ValueError(f"TFDS dataset {name!r} is not an image classification dataset "
                         f"(features: {', '.join(features.keys())})")
    return image_key, label_key


def _records(tfds, builder, split, image_key):
    """Random access to a split's examples, images left encoded."""
    decoders = {image_key: tfds.decode.SkipDecoding()}
    file_format = builder.info.file_format
    formats = tfds.core.file_adapters.FileFormat
    if file_format == formats.ARRAY_RECORD:
        return builder.as_data_source(split=split, decoders=decoders)
    if file_format == formats.TFRECORD:
        deserialize = functools.partial(builder.info.features.deserialize_example_np,
                                        decoders=decoders)
        return _TFRecordRecords(builder.info.splits[split].filepaths, deserialize)
    raise DatasetUnavailableError(
        f"{builder.name} is stored as {file_format.value}; asgssd-jax reads the tfrecord and "
        f"array_record formats: prepare it again with "
        f"tfds.builder('{builder.name}', file_format='array_record').download_and_prepare()")


def _read_all(records, image_key, label_key, image_shape, size):
    n = len(records) if size is None else min(len(records), size)
    images = np.empty((n, *image_shape), np.uint8)
    labels = np.empty((n,), np.int32)
    decode = functools.partial(_decode, channels=image_shape[-1])
    chunk = 4096
    for start in range(0, n, chunk):
        examples = records.__getitems__(list(range(start, min(n, start + chunk))))
        for i, e in enumerate(examples, start):  # small images: threads would only add overhead
            images[i], labels[i] = decode(e[image_key]), e[label_key]
    return images, labels


class _TFRecordRecords:
    """Random access to the examples of TFRecord shards, without TensorFlow.

    A TFRecord file is a sequence of (uint64 length, uint32 CRC, data, uint32 CRC); the index
    of record offsets is built on first use by reading the length fields only. CRCs are not
    checked.
    """

    def __init__(self, paths: Sequence[Any], deserialize: Callable[[bytes], dict]):
        self._paths = [os.fspath(p) for p in paths]
        self._deserialize = deserialize

    @functools.cached_property
    def _index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        files, offsets, lengths = [], [], []
        for i, path in enumerate(self._paths):
            with open(path, "rb") as f:
                while header := f.read(12):
                    if len(header) < 12:
                        raise ValueError(f"{path} is truncated (TFRecord header cut short)")
                    (length,) = struct.unpack("<Q", header[:8])
                    files.append(i)
                    offsets.append(f.tell())
                    lengths.append(length)
                    f.seek(length + 4, os.SEEK_CUR)
        return np.asarray(files), np.asarray(offsets), np.asarray(lengths)

    def __len__(self) -> int:
        return len(self._index[0])

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        files, offsets, lengths = self._index
        raw = []
        with contextlib.ExitStack() as stack:
            handles: dict[int, Any] = {}
            for i in indices:
                if files[i] not in handles:
                    handles[files[i]] = stack.enter_context(open(self._paths[files[i]], "rb"))
                f = handles[files[i]]
                f.seek(offsets[i])
                raw.append(f.read(lengths[i]))
        return [self._deserialize(r) for r in raw]

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]


# ---------------------------------------------------------------------------- image decoding


def _open_image(encoded: bytes, channels: int):
    from PIL import Image

    return Image.open(io.BytesIO(encoded)).convert("L" if channels == 1 else "RGB")


def _as_array(image, channels: int) -> np.ndarray:
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if channels == 1 else array


def _decode(encoded: bytes, channels: int) -> np.ndarray:
    return _as_array(_open_image(encoded, channels), channels)


def _decode_crop(encoded: bytes, key: int | None, shape) -> np.ndarray:
    """Decodes and crops to `shape`: random-resized crop if `key` is given, else centre crop."""
    from PIL import Image

    image = _open_image(encoded, shape[2])
    width, height = image.size
    box = _centre_box(width, height) if key is None else _random_box(
        width, height, np.random.default_rng(key))
    image = image.resize((shape[1], shape[0]), Image.BILINEAR, box=box)
    return _as_array(image, shape[2])


def _centre_box(width, height, fraction=0.875):
    side = fraction * min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def _random_box(width, height, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Inception-style crop: random area fraction and aspect ratio (10 tries, then centre)."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if w <= width and h <= height:
            left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
            return (left, top, left + w, top + h)
    return _centre_box(width, height, fraction=1.0)
