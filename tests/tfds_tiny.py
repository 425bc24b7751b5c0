"""Tiny TFDS image datasets for the data tests, built offline (no TensorFlow needed).

`build(name, data_dir, file_format)` prepares one of `SPECS` the way `download_and_prepare`
prepares a real dataset; images are PNG-encoded here with PIL because TFDS encodes numpy
images with TensorFlow. Pixels are a function of the example index (`image(name, i)`), so tests
can check what they read back. `python tests/tfds_tiny.py` (with tensorflow installed, for the
TFRecord writer) regenerates the TFRecord fixture under tests/data/tfds.
"""

from __future__ import annotations

import functools
import io
import os
import shutil

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

# name: (image shape, num classes, train size, test split name, test size)
SPECS = {
    "tiny_rgb": ((8, 8, 3), 4, 20, "test", 8),
    "tiny_gray": ((6, 6, 1), 3, 10, "test", 4),
    "tiny_varsize": ((None, None, 3), 5, 12, "validation", 6),
}
FIXTURE_DIR = os.path.join(os.path.dirname(__file__), "data", "tfds")


def image(name: str, index: int) -> np.ndarray:
    shape, *_ = SPECS[name]
    h, w, c = (12 + index % 5, 16 + index % 3, shape[2]) if shape[0] is None else shape
    return ((np.arange(h * w * c).reshape(h, w, c) * 7 + index * 31) % 256).astype(np.uint8)


def label(name: str, index: int) -> int:
    return index % SPECS[name][1]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()


@functools.cache
def _builder_class(dataset_name: str):
    shape, num_classes, train_size, test_split, test_size = SPECS[dataset_name]

    # Registered like a real TFDS dataset (tfds.builder finds its code); the others are read
    # through TFDS's read-only builder, as a copied dataset of unknown code is.
    class Tiny(tfds.core.GeneratorBasedBuilder, skip_registration=dataset_name != "tiny_rgb"):
        name = dataset_name
        VERSION = tfds.core.Version("1.0.0")
        # No checksums file to look for; TFDS 4.9's lookup of it fails for builders defined
        # in a package unless the importlib_resources backport is installed.
        code_path = None

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=shape),
                    "label": tfds.features.ClassLabel(num_classes=num_classes),
                }),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, train_size),
                    test_split: self._generate_examples(1000, test_size)}

        def _generate_examples(self, start, size):
            for i in range(start, start + size):
                yield i, {"image": _png(image(dataset_name, i)), "label": label(dataset_name, i)}

    return Tiny


def build(name: str, data_dir: str, file_format: str = "array_record") -> None:
    builder = _builder_class(name)(data_dir=data_dir, file_format=file_format)
    builder.download_and_prepare()


if __name__ == "__main__":
    build("tiny_gray", FIXTURE_DIR, file_format="tfrecord")
    shutil.rmtree(os.path.join(FIXTURE_DIR, "downloads"), ignore_errors=True)
