"""Character-level data from the standard library's source: real text, disjoint splits,
batches a pure function of (seed, epoch)."""

import numpy as np
import pytest

from asgssd_jax import text


@pytest.fixture(scope="module")
def ds():
    return text.load_python_source(length=16, max_chars=20_000)


def test_windows_are_next_character_pairs(ds):
    x, y = next(text.batches(ds.train, 16, 4, seed=0, epoch=0))
    assert x.shape == y.shape == (4, 16) and x.dtype == np.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    assert x.max() < text.VOCAB_SIZE and "def " in text.decode(ds.train)


def test_batches_are_a_pure_function_of_seed_and_epoch(ds):
    def epoch(seed, e):
        return [x for x, _ in text.batches(ds.train, 16, 8, seed=seed, epoch=e)]

    a, b, c = epoch(0, 1), epoch(0, 1), epoch(0, 2)
    assert len(a) == len(c) == text.num_batches(ds.train, 16, 8)
    assert all((u == v).all() for u, v in zip(a, b))
    assert not all((u == v).all() for u, v in zip(a, c))


def test_evaluation_windows_cover_the_split_in_order(ds):
    xs = [x for x, _ in text.batches(ds.test, 16, 2, shuffle=False)]
    flat = np.concatenate([x.ravel() for x in xs])
    np.testing.assert_array_equal(flat, ds.test[:len(flat)])


def test_splits_are_different_modules(ds):
    assert not set(text.TRAIN_MODULES) & set(text.TEST_MODULES)
    assert text.decode(ds.train[:2000]) not in text.decode(ds.test)


def test_bad_arguments_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="standard library"):
        text.load_python_source(stdlib=tmp_path)
    with pytest.raises(ValueError, match="max_chars"):
        text.load_python_source(length=64, max_chars=10)


def test_evaluation_batches_keep_the_last_partial_batch(ds):
    full = list(text.batches(ds.test, 16, 3, shuffle=False, drop_remainder=False))
    windows = (len(ds.test) - 16) // 16
    assert sum(len(x) for x, _ in full) == windows
    assert len(full[-1][0]) == (windows % 3 or 3)
    kept = list(text.batches(ds.test, 16, 3, shuffle=False))
    assert len(kept) == windows // 3


def test_batches_from_runs_on_across_passes_and_resumes_anywhere(ds):
    import itertools

    per_pass = text.num_batches(ds.train, 16, 8)
    stream = [x for x, _ in itertools.islice(text.batches_from(ds.train, 16, 8, 0), 2 * per_pass)]
    second_pass = [x for x, _ in text.batches(ds.train, 16, 8, epoch=1)]
    assert all((a == b).all() for a, b in zip(stream[per_pass:], second_pass))
    start = per_pass + 3
    resumed = [x for x, _ in itertools.islice(text.batches_from(ds.train, 16, 8, start), 4)]
    assert all((a == b).all() for a, b in zip(resumed, stream[start:start + 4]))
    with pytest.raises(ValueError, match="fewer than"):
        next(text.batches_from(ds.train[:40], 16, 8, 0))
