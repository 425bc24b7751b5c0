"""asgssd_jax.data: digits, synthetic, TFDS read offline, batching, augmentation, sharding."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest

from asgssd_jax import data


def _indexed_split(n=50, shape=(6, 6, 1), num_classes=5) -> data.ArraySplit:
    """Example i is the constant image i / 255 (uint8 i), label i % num_classes."""
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, *shape))
    return data.ArraySplit(np.ascontiguousarray(images), np.arange(n) % num_classes, num_classes)


def _ids(x: np.ndarray) -> np.ndarray:
    return np.round(x[:, 0, 0, 0] * 255).astype(int)


def _epoch(split, batch_size=8, **kwargs):
    return list(data.batches(split, batch_size, **kwargs))


def _assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


# ------------------------------------------------------------------------------- digits


def test_digits_shapes_ranges_and_fixed_split():
    ds = data.load("digits")
    assert (ds.name, ds.num_classes, ds.input_shape) == ("digits", 10, (8, 8, 1))
    assert (len(ds.train), len(ds.test)) == (1437, 360)
    for split in (ds.train, ds.test):
        assert split.images.dtype == np.float32 and split.images.shape[1:] == (8, 8, 1)
        assert split.images.min() == 0.0 and split.images.max() == 1.0
        assert split.labels.dtype == np.int32 and set(np.unique(split.labels)) == set(range(10))
    assert ds.augment == data.Augment(crop_padding=1, flip=False)  # digits are not mirrored

    again = data.load("digits")
    np.testing.assert_array_equal(ds.train.images, again.train.images)
    np.testing.assert_array_equal(ds.test.labels, again.test.labels)
    other = data.load("digits", split_seed=1)
    assert not np.array_equal(ds.test.labels, other.test.labels)
    assert np.bincount(ds.test.labels).min() >= 35  # stratified: 36 per class, give or take


def test_digits_upsampled_for_zoo_models():
    ds = data.load("digits", input_shape=(28, 28, 1))
    assert ds.input_shape == (28, 28, 1) and ds.train.images.shape == (1437, 28, 28, 1)
    assert 0.0 <= ds.train.images.min() and ds.train.images.max() <= 1.0
    small = data.load("digits")
    # Bilinear upsampling keeps each image's mean brightness (up to the border).
    np.testing.assert_allclose(ds.train.images.mean((1, 2, 3)), small.train.images.mean((1, 2, 3)),
                               atol=0.02)
    rgb = data.load("digits", input_shape=(28, 28, 3))
    np.testing.assert_array_equal(rgb.train.images[..., 2], ds.train.images[..., 0])


def test_resize_matches_jax_image_resize():
    jax = pytest.importorskip("jax")
    x = np.random.default_rng(0).random((2, 8, 11, 3)).astype(np.float32)
    for h, w in [(28, 28), (4, 5), (16, 3)]:
        expected = jax.image.resize(x, (2, h, w, 3), "bilinear")
        np.testing.assert_allclose(data.resize(x, h, w), expected, atol=1e-5)


# ------------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("shape,num_classes", [((32, 32, 3), 10), ((28, 28, 1), 10),
                                               ((8, 12, 2), 4)])
def test_synthetic_is_learnable(shape, num_classes):
    ds = data.load("synthetic", input_shape=shape, num_classes=num_classes, train_size=1000,
                   test_size=300)
    assert ds.input_shape == shape and ds.num_classes == num_classes
    assert ds.train.images.shape == (1000, *shape) and len(ds.test) == 300
    assert ds.train.images.min() >= 0 and ds.train.images.max() <= 1
    # The class is a texture at a random phase: nearest centroid on the (shift-invariant)
    # amplitude spectrum finds it.
    def spectrum(split):
        return np.abs(np.fft.fft2(split.images, axes=(1, 2))).reshape(len(split), -1)

    train, test = spectrum(ds.train), spectrum(ds.test)
    centroids = np.stack([train[ds.train.labels == k].mean(0) for k in range(num_classes)])
    distances = ((test[:, None] - centroids[None]) ** 2).sum(-1)
    accuracy = (distances.argmin(1) == ds.test.labels).mean()
    assert accuracy > 0.9, accuracy  # chance is 1 / num_classes
    np.testing.assert_array_equal(
        data.load("synthetic", input_shape=shape, num_classes=num_classes, train_size=1000,
                  test_size=300).train.images, ds.train.images)


# ------------------------------------------------------------------------------- batches


def test_batches_cover_an_epoch_once_and_are_deterministic():
    split = _indexed_split()
    epoch = _epoch(split, seed=3, epoch=1)
    assert len(epoch) == data.num_batches(split, 8) == 6
    x, y = epoch[0]
    assert x.shape == (8, 6, 6, 1) and x.dtype == np.float32 and y.dtype == np.int32
    ids = np.concatenate([_ids(x) for x, _ in epoch])
    assert len(set(ids)) == 48  # 50 // 8 full batches, no repeats
    np.testing.assert_array_equal(np.concatenate([y for _, y in epoch]), ids % 5)
    _assert_same(epoch, _epoch(split, seed=3, epoch=1))
    assert not np.array_equal(ids, np.concatenate([_ids(x) for x, _ in
                                                   _epoch(split, seed=3, epoch=2)]))

    full = _epoch(split, shuffle=False, drop_remainder=False)
    assert [len(y) for _, y in full] == [8] * 6 + [2]
    np.testing.assert_array_equal(np.concatenate([_ids(x) for x, _ in full]), np.arange(50))
    _assert_same(_epoch(split, seed=3, epoch=1, start_batch=4), epoch[4:])


def test_augment_keeps_shapes_and_is_deterministic_per_seed_and_epoch():
    ds = data.load("synthetic", input_shape=(16, 16, 3), train_size=64, test_size=8)
    augment = data.Augment(crop_padding=2, flip=True)
    epoch = _epoch(ds.train, 16, seed=0, epoch=5, augment=augment)
    assert all(x.shape == (16, 16, 16, 3) and x.dtype == np.float32 for x, _ in epoch)
    _assert_same(epoch, _epoch(ds.train, 16, seed=0, epoch=5, augment=augment))
    plain = _epoch(ds.train, 16, seed=0, epoch=5)
    assert not np.array_equal(epoch[0][0], plain[0][0])
    np.testing.assert_array_equal(epoch[0][1], plain[0][1])  # same order, same labels
    assert not np.array_equal(epoch[0][0], _epoch(ds.train, 16, seed=1, epoch=5,
                                                  augment=augment)[0][0])


def test_augment_is_a_padded_crop_and_a_mirror():
    rng = np.random.default_rng(0)
    images = rng.random((40, 5, 7, 2)).astype(np.float32)
    split = data.ArraySplit(images, np.zeros(40, np.int32), 1)
    (flipped, _), = _epoch(split, 40, shuffle=False, augment=data.Augment(0, flip=True))
    mirrored = np.all(flipped == images[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(mirrored | np.all(flipped == images, axis=(1, 2, 3)))
    assert 5 < mirrored.sum() < 35
    (cropped, _), = _epoch(split, 40, shuffle=False, augment=data.Augment(2, flip=False))
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    for i in range(40):
        windows = [padded[i, dy:dy + 5, dx:dx + 7] for dy in range(5) for dx in range(5)]
        assert any(np.array_equal(cropped[i], w) for w in windows)


def test_mixup_soft_labels_sum_to_one():
    split = _indexed_split(64)
    for x, y in _epoch(split, 16, seed=2, mixup_alpha=0.4, augment=data.Augment(1)):
        assert x.shape == (16, 6, 6, 1) and y.shape == (16, 5) and y.dtype == np.float32
        np.testing.assert_allclose(y.sum(1), 1.0, rtol=1e-6)
        assert np.all(y >= 0) and np.all(y.max(1) >= 0.5 - 1e-6)
    # Without augmentation, row i is lam * (example i) + (1 - lam) * (another batch member),
    # in images and labels alike, with one lam for the batch.
    (x, y), = _epoch(split, 64, seed=7, mixup_alpha=1.0)
    (plain, labels), = _epoch(split, 64, seed=7)
    lam = y[np.arange(64), labels].min()
    assert 0 < lam < 1
    partner_ids = np.round((_ids(x) - lam * _ids(plain)) / (1 - lam)).astype(int)
    assert set(partner_ids) <= set(_ids(plain))
    expected = lam * np.eye(5)[labels] + (1 - lam) * np.eye(5)[partner_ids % 5]
    np.testing.assert_allclose(y, expected, atol=1e-6)


@pytest.mark.parametrize("num_shards", [2, 4])
def test_shards_are_disjoint_slices_whose_union_is_the_global_batch(num_shards):
    ds = data.load("synthetic", input_shape=(8, 8, 3), train_size=70, test_size=8)
    kwargs = dict(seed=4, epoch=2, augment=data.Augment(2), mixup_alpha=0.3,
                  drop_remainder=False)
    whole = _epoch(ds.train, 16, **kwargs)
    shards = [_epoch(ds.train, 16, num_shards=num_shards, shard_index=i, **kwargs)
              for i in range(num_shards)]
    for b, (x, y) in enumerate(whole):
        np.testing.assert_array_equal(np.concatenate([s[b][0] for s in shards]), x)
        np.testing.assert_array_equal(np.concatenate([s[b][1] for s in shards]), y)
    assert [len(s[0][1]) for s in shards] == [16 // num_shards] * num_shards
    ids = [np.concatenate([_ids(x) for x, _ in _epoch(_indexed_split(), 8, seed=1,
                                                      num_shards=num_shards, shard_index=i)])
           for i in range(num_shards)]
    assert sum(map(len, ids)) == len(set(np.concatenate(ids))) == 48


def test_grain_threads_and_worker_processes_give_the_same_batches():
    split = _indexed_split()
    kwargs = dict(seed=5, epoch=3, augment=data.Augment(1), mixup_alpha=0.2)
    reference = _epoch(split, **kwargs)
    _assert_same(_epoch(split, num_threads=3, **kwargs), reference)
    it = data.batches(split, 8, num_workers=2, **kwargs)
    try:
        _assert_same(list(it), reference)
    finally:
        it.close()


def test_epoch_is_random_access_and_its_iterator_resumes_from_its_state():
    split = _indexed_split()
    kwargs = dict(seed=2, epoch=4, augment=data.Augment(1))
    reference = _epoch(split, **kwargs)
    dataset = data.epoch_dataset(split, 8, **kwargs)
    assert len(dataset) == len(reference)
    _assert_same([dataset[4], dataset[1]], [reference[4], reference[1]])
    it = data.batches(split, 8, **kwargs)
    _assert_same([next(it), next(it)], reference[:2])
    state = it.get_state()
    resumed = data.batches(split, 8, **kwargs)
    resumed.set_state(state)
    _assert_same(list(resumed), reference[2:])


def test_batches_reject_bad_arguments():
    split = _indexed_split()
    with pytest.raises(ValueError, match="multiple of num_shards"):
        data.batches(split, 10, num_shards=4)
    with pytest.raises(ValueError, match="shard_index"):
        data.batches(split, 8, num_shards=2, shard_index=2)
    with pytest.raises(ValueError, match="only 'synthetic'"):
        data.load("digits", num_classes=3)


# ------------------------------------------------------------------------------- TFDS


@pytest.fixture(scope="module")
def tfds_tiny():
    pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets is not installed")
    pytest.importorskip("PIL", reason="pillow is not installed")
    from tests import tfds_tiny

    return tfds_tiny


def _generated(tiny, name, indices):
    return {(tiny.image(name, i).tobytes(), tiny.label(name, i)) for i in indices}


def _read(split):
    return {(split.images[i].tobytes(), int(split.labels[i])) for i in range(len(split))}


def test_tfds_array_record_dataset_from_data_dir(tfds_tiny, tmp_path):
    tfds_tiny.build("tiny_rgb", str(tmp_path))
    imported_tf = "tensorflow" in sys.modules
    ds = data.load("tiny_rgb", data_dir=tmp_path)
    assert imported_tf or "tensorflow" not in sys.modules  # read without TensorFlow
    assert (ds.name, ds.num_classes, ds.input_shape) == ("tiny_rgb", 4, (8, 8, 3))
    assert isinstance(ds.train, data.ArraySplit) and ds.train.images.dtype == np.uint8
    assert _read(ds.train) == _generated(tfds_tiny, "tiny_rgb", range(20))
    assert _read(ds.test) == _generated(tfds_tiny, "tiny_rgb", range(1000, 1008))
    assert ds.augment == data.Augment(crop_padding=1, flip=True)
    x, y = next(data.batches(ds.train, 4, augment=ds.augment, mixup_alpha=0.2))
    assert x.shape == (4, 8, 8, 3) and x.dtype == np.float32 and y.shape == (4, 4)

    small = data.load("tiny_rgb", data_dir=tmp_path, input_shape=(16, 16, 3), train_size=5)
    assert small.input_shape == (16, 16, 3) and small.train.images.shape == (5, 16, 16, 3)
    assert len(small.test) == 8


def test_tfds_tfrecord_dataset_without_tensorflow(tfds_tiny, tmp_path):
    # tests/data/tfds/tiny_gray: TFDS's default TFRecord format, written by TensorFlow
    # (`python tests/tfds_tiny.py`); read here by data.py's own reader.
    shutil.copytree(tfds_tiny.FIXTURE_DIR, tmp_path / "tfds")
    imported_tf = "tensorflow" in sys.modules
    ds = data.load("tiny_gray", data_dir=tmp_path / "tfds")
    assert imported_tf or "tensorflow" not in sys.modules
    assert (ds.num_classes, ds.input_shape, len(ds.train), len(ds.test)) == (3, (6, 6, 1), 10, 4)
    assert _read(ds.train) == _generated(tfds_tiny, "tiny_gray", range(10))
    assert _read(ds.test) == _generated(tfds_tiny, "tiny_gray", range(1000, 1004))
    rgb = data.load("tiny_gray", data_dir=tmp_path / "tfds", input_shape=(6, 6, 3))
    np.testing.assert_array_equal(rgb.train.images[..., 1:2], ds.train.images)


def test_tfds_variable_size_images_decode_per_batch(tfds_tiny, tmp_path):
    tfds_tiny.build("tiny_varsize", str(tmp_path))
    ds = data.load("tiny_varsize", data_dir=tmp_path, input_shape=(8, 8, 3))
    assert isinstance(ds.train, data.RecordSplit) and ds.input_shape == (8, 8, 3)
    assert (len(ds.train), len(ds.test), ds.num_classes) == (12, 6, 5)  # test = validation
    assert ds.augment == data.Augment(crop_padding=0, flip=True)
    evaluation = _epoch(ds.test, 3, shuffle=False)
    x, y = evaluation[0]
    assert x.shape == (3, 8, 8, 3) and x.dtype == np.float32 and 0 <= x.min() <= x.max() <= 1
    _assert_same(evaluation, _epoch(ds.test, 3, shuffle=False))
    train = _epoch(ds.train, 4, seed=1, augment=ds.augment)
    _assert_same(train, _epoch(ds.train, 4, seed=1, augment=ds.augment))
    assert not np.array_equal(train[0][0], _epoch(ds.train, 4, seed=1)[0][0])
    halves = [_epoch(ds.train, 4, seed=1, augment=ds.augment, num_shards=2, shard_index=i)
              for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([h[0][0] for h in halves]), train[0][0])
    assert len(data.load("tiny_varsize", data_dir=tmp_path, train_size=7).train) == 7


def test_unavailable_dataset_says_how_to_provide_it(tfds_tiny, tmp_path, caplog):
    (tmp_path / "cifar10" / "9.9.9").mkdir(parents=True)
    (tmp_path / "cifar10" / "9.9.9" / "dataset_info.json").write_text("{}")
    (tmp_path / "cifar10" / "8.8.8").mkdir()  # an empty folder is no prepared version
    with pytest.raises(data.DatasetUnavailableError) as error:
        data.load("cifar10", data_dir=tmp_path)
    message = str(error.value)
    for words in ("'cifar10' is not prepared in", str(tmp_path), "download_and_prepare",
                  "DATA_DIR/cifar10", "--data-dir", "version(s) 9.9.9:", "cifar10:9.9.9"):
        assert words in message, (words, message)
    assert "8.8.8" not in message
    # the message alone: no TFDS warning about the folders before it
    assert not [r for r in caplog.records if "dataset_info.json" in r.getMessage()]
    with pytest.raises(data.DatasetUnavailableError, match="manual download"):
        data.load("imagenet", data_dir=tmp_path)
    with pytest.raises(data.DatasetUnavailableError, match="'svhn_cropped' is not prepared"):
        data.load("svhn", data_dir=tmp_path)
    with pytest.raises(data.DatasetUnavailableError, match="download_and_prepare"):
        data.load("no_such_dataset", data_dir=tmp_path)


def test_missing_tensorflow_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ModuleNotFoundError, match=r"asgssd-jax\[data\]"):
        data.load("fashion_mnist")
