"""The offline default dataset: Fashion-MNIST built into a tfds dataset from its four IDX files.

The tfds builder `fashion_mnist_idx` (class `FashionMnistIdx`; named so that it does not clash with
tfds's registered `fashion_mnist`) writes the real 60,000 training and 10,000 test images into
`<data_dir>/fashion_mnist_idx/1.0.0/` in the array_record format, in the order of the IDX files.
Nothing of it needs TensorFlow: images are stored as `tfds.features.Tensor` (uint8 [28, 28, 1]),
labels as a `ClassLabel` with the ten class names. It is built once; later runs find it and reuse
it.

Where the IDX files come from, in order:
  1. the directory the user names (`source_dir`);
  2. the files of Debian's `dataset-fashion-mnist` package
     (`apt-get install dataset-fashion-mnist`), found through `dpkg -L`;
  3. tfds's download of the files from the Fashion-MNIST site, when the machine is online.
Preparing it needs no extra: tensorflow-datasets, numpy and array_record are enough.

Building is atomic: tfds writes into a sibling `incomplete.XXXXXX_1.0.0` directory and renames it to
`1.0.0` only when everything is written (it deletes the temporary directory on an error). A build
killed outright can leave such a temporary directory behind but never a `1.0.0` directory; the next
build removes the leftovers, under a file lock that also keeps concurrent builds (several processes
on one machine, or hosts sharing a file system) from racing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator, Mapping
from urllib.parse import urlparse

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jackpots_jax.data import idx

BUILDER_NAME = "fashion_mnist_idx"
BUILDER_VERSION = "1.0.0"
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILE_NAMES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# The address tfds's own `fashion_mnist` builder downloads from (its `URL` attribute).
DOWNLOAD_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

HOW_TO_GET = (
    "Get the Fashion-MNIST IDX files in one of these ways: "
    "(1) `$(command -v sudo) apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu, as root "
    "or with sudo; the files are found automatically); "
    "(2) put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
    "t10k-labels-idx1-ubyte.gz (raw or .gz) in a directory and name it with the config field "
    "`dataset.source_dir` (`--config.dataset.source_dir=/path/to/dir`, or "
    "`jackpots_jax.data.prepare('fashion_mnist', data_dir, source_dir='/path/to/dir')`); "
    "(3) run once on a machine that is online, which downloads them."
)


class FashionMnistIdx(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST from its IDX files, written without TensorFlow (array_record).

    Takes the keyword `idx_files` (the four IDX files by role, as `idx.find_idx_files` returns;
    None downloads them with tfds's download manager) besides the usual builder arguments
    (`data_dir`, `file_format`).

    Example:
      >>> FashionMnistIdx(idx_files=idx.find_idx_files(src), data_dir=d,
      ...                 file_format="array_record").download_and_prepare()
    """

    name = BUILDER_NAME
    VERSION = tfds.core.Version(BUILDER_VERSION)
    RELEASE_NOTES = {BUILDER_VERSION: "Fashion-MNIST from the IDX files, images as uint8 tensors."}
    # tfds looks for a checksums file next to a builder's source through `code_path`, which for a
    # builder inside a package imports `importlib_resources`, a module tfds 4.9 does not install
    # on Python >= 3.9 (tensorflow/datasets#11212). There is no checksums file: skip the lookup.
    code_path = None

    def __init__(self, *, idx_files: Mapping[str, str | os.PathLike] | None = None, **kwargs):
        self._idx_files = dict(idx_files) if idx_files is not None else None
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Fashion-MNIST (Zalando): 28x28 grey-scale images of 10 kinds of garment, "
                "60,000 for training and 10,000 for testing, in the order of the IDX files."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://github.com/zalandoresearch/fashion-mnist",
            # Keeps the records in IDX order, so that the first N examples are the files' first N.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        files = self._idx_files
        if files is None:
            files = dl_manager.download({k: DOWNLOAD_URL + v for k, v in _FILE_NAMES.items()})
        arrays = idx.load_fashion_mnist_arrays(files)
        return {
            "train": self._generate_examples(arrays["train_images"], arrays["train_labels"]),
            "test": self._generate_examples(arrays["test_images"], arrays["test_labels"]),
        }

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray) -> Iterator:
        for i in range(len(images)):
            yield i, {"image": images[i][:, :, None], "label": int(labels[i])}


def dataset_dir(data_dir: str | os.PathLike) -> epath.Path:
    """Where the built dataset lives: `<data_dir>/fashion_mnist_idx/1.0.0`."""
    return epath.Path(data_dir).expanduser() / BUILDER_NAME / BUILDER_VERSION


def is_built(data_dir: str | os.PathLike) -> bool:
    """Whether a complete copy is in `data_dir` (tfds's final rename makes it all or nothing)."""
    return (dataset_dir(data_dir) / "dataset_info.json").exists()


def _online(url: str, timeout: float = 3.0) -> bool:
    """Whether the download host answers, so an offline machine fails fast, not after retries."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def locate_sources(source_dir: str | os.PathLike | None = None) -> dict[str, epath.Path] | None:
    """Finds the IDX files to build from.

    Args:
      source_dir: a directory the user names; when given it must hold the four files.

    Returns:
      The four files by role, or None when they are to be downloaded (no local copy, but online).

    Raises:
      FileNotFoundError: `source_dir` lacks a file, or there is no local copy and no network; the
        message says how to get the files.
    """
    if source_dir is not None:
        try:
            return idx.find_idx_files(source_dir)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}. {HOW_TO_GET}") from None
    debian = idx.debian_idx_files()
    if debian is not None:
        return debian
    if _online(DOWNLOAD_URL):
        return None
    raise FileNotFoundError(
        "Fashion-MNIST is not built in the data directory and its IDX files are nowhere to be "
        f"found: no `source_dir` was given, Debian's package `{idx.DEBIAN_PACKAGE}` is not "
        f"installed, and {DOWNLOAD_URL} cannot be reached. {HOW_TO_GET}"
    )


@contextlib.contextmanager
def _build_lock(directory: epath.Path) -> Iterator[None]:
    """An exclusive lock on a file in `directory` (skipped where that is not a local path)."""
    if not isinstance(directory, epath.Path) or "://" in os.fspath(directory):
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    with open(os.fspath(directory / ".build.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build(
    data_dir: str | os.PathLike,
    source_dir: str | os.PathLike | None = None,
) -> epath.Path:
    """Builds the dataset into `data_dir` unless it is there already.

    Args:
      data_dir: the tfds data directory.
      source_dir: a directory holding the four IDX files (optional; see the module docstring for
        where they are looked for otherwise).

    Returns:
      The directory of the built dataset (`<data_dir>/fashion_mnist_idx/1.0.0`).

    Raises:
      FileNotFoundError: the IDX files cannot be found (the message says how to get them).
      ValueError: the IDX files are malformed.
    """
    if is_built(data_dir):
        return dataset_dir(data_dir)
    files = locate_sources(source_dir)
    root = dataset_dir(data_dir).parent
    with _build_lock(root):
        # Another process may have finished the build while this one waited for the lock.
        if is_built(data_dir):
            return dataset_dir(data_dir)
        # Holding the lock, no other build is running: these are leftovers of a killed one.
        for stale in root.glob(f"incomplete.*_{BUILDER_VERSION}"):
            stale.rmtree()
        builder = FashionMnistIdx(
            idx_files=files,
            data_dir=os.fspath(epath.Path(data_dir).expanduser()),
            file_format="array_record",
        )
        builder.download_and_prepare()
    return dataset_dir(data_dir)
