"""ImageNet-style input pipeline: JPEG decoding with random-resized crops, images per second.

    python benchmarks/data_loading.py [--images 512] [--batch 64] [--workers 1 2] [--repeats 2]

Generates ``--images`` JPEG records of ImageNet's typical sizes (shorter side 300-500 pixels,
aspect 3:4 to 4:3, smooth random content at quality 90), writes them as TFRecord files and
reads them back through the library's random-access TFRecord reader, as a prepared
``imagenet2012`` is read. Then times ``data.batches`` on that split with training
augmentation (Inception random-resized crop to 224x224x3, flip): one epoch, the best of
``--repeats``, for each number of ``--workers``: decoding threads of the library's own pool
before the pipeline moved onto grain; grain's threads (``num_threads``) and grain's worker
processes (``num_workers``, one thread each) after.

Measured with ``--images 1024`` on a 2-core x86_64 CPU shared with other jobs (load average
about 8, so the figures are noisy and a second worker cannot help), Python 3.11, grain 0.2.18:

    pipeline          workers   images/s
    thread pool             1      158.0    (before: the library's own thread pool)
    thread pool             2      141.2
    grain threads           1      169.7    (after)
    grain threads           2      132.3
    grain processes         1       88.5    (each worker process starts per epoch and imports
    grain processes         2       63.8     JAX: worth it only for epochs much longer than here)
"""

from __future__ import annotations

import argparse
import inspect
import io
import struct
import tempfile
import time
from pathlib import Path

import numpy as np

from asgssd_jax import data


def _jpeg(rng: np.random.Generator) -> bytes:
    from PIL import Image

    short = int(rng.integers(300, 501))
    long = int(short * rng.uniform(1.0, 4 / 3))
    h, w = (short, long) if rng.random() < 0.5 else (long, short)
    coarse = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((w, h), Image.BILINEAR)  # smooth, like photos
    noise = rng.integers(-12, 13, (h, w, 3))
    pixels = np.clip(np.asarray(image, np.int16) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_tfrecords(records: list[bytes], directory: Path, shards: int = 4) -> list[Path]:
    """TFRecord framing (length, CRC, data, CRC; CRCs left zero: the reader skips them)."""
    paths = []
    for s in range(shards):
        path = directory / f"train.tfrecord-{s:05d}-of-{shards:05d}"
        with open(path, "wb") as f:
            for r in records[s::shards]:
                f.write(struct.pack("<QI", len(r), 0) + r + struct.pack("<I", 0))
        paths.append(path)
    return paths


def _deserialize(raw: bytes) -> dict:
    """Record layout of this benchmark: int32 label, then the JPEG."""
    return {"label": int.from_bytes(raw[:4], "little"), "image": raw[4:]}


def make_split(num_images: int, directory: Path, seed: int = 0) -> data.RecordSplit:
    rng = np.random.default_rng(seed)
    records = [int(rng.integers(0, 1000)).to_bytes(4, "little") + _jpeg(rng)
               for _ in range(num_images)]
    paths = _write_tfrecords(records, directory)
    source = data._TFRecordRecords(paths, _deserialize)
    return data.RecordSplit(source, (224, 224, 3), 1000)


def epoch_seconds(split: data.RecordSplit, batch: int, workers: int, mode: str) -> float:
    """One epoch of training batches with ``workers`` decoding threads or processes."""
    augment = data.Augment(crop_padding=0, flip=True)
    t0 = time.perf_counter()
    if mode != "thread pool":  # grain
        kwargs = ({"num_threads": workers} if mode == "grain threads"
                  else {"num_threads": 1, "num_workers": workers})
        it = data.batches(split, batch, seed=0, epoch=0, augment=augment, **kwargs)
        n = sum(len(x) for x, _ in it)
        if hasattr(it, "close"):
            it.close()
    else:  # the library's own thread pool (before grain), sized to `workers`
        import concurrent.futures

        pool = concurrent.futures.ThreadPoolExecutor(workers)
        original = data._thread_pool
        data._thread_pool = lambda: pool
        try:
            n = sum(len(x) for x, _ in data.batches(split, batch, seed=0, epoch=0,
                                                    augment=augment))
        finally:
            data._thread_pool = original
            pool.shutdown()
    assert n == data.num_batches(split, batch) * batch
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        split = make_split(args.images, Path(tmp))
        mib = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 2**20
        print(f"{args.images} JPEG records ({mib:.1f} MiB) written in "
              f"{time.perf_counter() - t0:.1f} s")
        images = data.num_batches(split, args.batch) * args.batch
        modes = (["grain threads", "grain processes"]
                 if "num_workers" in inspect.signature(data.batches).parameters
                 else ["thread pool"])
        print(f"{'pipeline':<16} {'workers':>8} {'images/s':>10} {'epoch (s)':>10}")
        for mode in modes:
            for w in args.workers:
                best = min(epoch_seconds(split, args.batch, w, mode)
                           for _ in range(args.repeats))
                print(f"{mode:<16} {w:>8} {images / best:>10.1f} {best:>10.2f}")


if __name__ == "__main__":
    main()
