"""IDX files (the MNIST / Fashion-MNIST array format): reading them and finding them on disk.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions), one
big-endian uint32 per dimension, then the values in C order. Fashion-MNIST ships as four of them:
`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte` and
`t10k-labels-idx1-ubyte`, raw or gzip-compressed (`.gz`).

Where the files are looked for, in order (see `fashion_mnist.locate_sources`): a directory the
user names; the files of Debian's `dataset-fashion-mnist` package, found through `dpkg -L` (with
the directory that package uses as a fallback).
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

import numpy as np

# The four files by role; each may be named with `-idx3-ubyte` or `.idx3-ubyte` (both spellings
# are in circulation) and may carry a `.gz` suffix.
FILE_ROLES = ("train_images", "train_labels", "test_images", "test_labels")
_STEMS = {
    "train_images": ("train-images", "idx3-ubyte"),
    "train_labels": ("train-labels", "idx1-ubyte"),
    "test_images": ("t10k-images", "idx3-ubyte"),
    "test_labels": ("t10k-labels", "idx1-ubyte"),
}

DEBIAN_PACKAGE = "dataset-fashion-mnist"
# Where `dataset-fashion-mnist` puts the files; only used when `dpkg -L` cannot be asked.
DEBIAN_FALLBACK_DIRS = ("/usr/share/datasets/fashion-mnist",)

_TYPE_CODES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def parse_idx(data: bytes, what: str = "IDX data") -> np.ndarray:
    """Decodes the bytes of one (uncompressed) IDX file.

    Args:
      data: the whole file content.
      what: a name for error messages (usually the path).

    Returns:
      The array, in native byte order, with the shape the header declares.

    Raises:
      ValueError: a bad magic number, an unknown type code or a size that does not match the header.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{what} is not an IDX file: it must start with two zero bytes")
    code, ndim = data[2], data[3]
    if code not in _TYPE_CODES:
        raise ValueError(
            f"{what} has IDX type code {code:#04x}; known codes: "
            + ", ".join(f"{c:#04x}" for c in _TYPE_CODES)
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{what} is truncated inside its IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _TYPE_CODES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{what} holds {len(data) - header} bytes of values, but its header declares shape "
            f"{shape} of {dtype} ({expected} bytes)"
        )
    values = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return values.astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file, raw or gzip-compressed (detected from the content, not the name).

    Args:
      path: the file.

    Returns:
      The array it holds (see `parse_idx`).
    """
    data = Path(path).read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return parse_idx(data, what=str(path))


def find_idx_files(directory: str | os.PathLike) -> dict[str, Path]:
    """The four Fashion-MNIST IDX files in a directory, by role.

    Args:
      directory: a directory holding `train-images-idx3-ubyte[.gz]` and its three siblings (the
        `.idx3-ubyte` spelling is accepted too).

    Returns:
      A dict from each of `FILE_ROLES` to the path found.

    Raises:
      FileNotFoundError: the directory or one of the files is not there (names the missing ones).
    """
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST source directory {str(directory)!r} does not exist")
    found, missing = {}, []
    for role, (stem, kind) in _STEMS.items():
        candidates = [
            directory / f"{stem}{sep}{kind}{gz}" for sep in ("-", ".") for gz in ("", ".gz")
        ]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            missing.append(f"{stem}-{kind}[.gz]")
        else:
            found[role] = hit
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST source directory {str(directory)!r} lacks {', '.join(missing)}"
        )
    return found


def debian_idx_files() -> dict[str, Path] | None:
    """The IDX files of Debian's `dataset-fashion-mnist` package, if it is installed.

    Asks `dpkg -L` where the package put its files, so a change of layout in a later package
    version is followed; the package's usual directory is tried after that (for systems without
    `dpkg`, or files copied there by hand).

    Returns:
      A dict like `find_idx_files`'s, or None when the package (or one of its files) is not there.
    """
    dpkg = shutil.which("dpkg")
    directories: list[Path] = []
    if dpkg is not None:
        try:
            listing = subprocess.run(
                [dpkg, "-L", DEBIAN_PACKAGE],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            listing = None
        if listing is not None and listing.returncode == 0:
            directories = sorted(
                {Path(line).parent for line in listing.stdout.splitlines() if "-ubyte" in line}
            )
    directories += [Path(d) for d in DEBIAN_FALLBACK_DIRS if Path(d) not in directories]
    for directory in directories:
        try:
            return find_idx_files(directory)
        except FileNotFoundError:
            continue
    return None


def load_fashion_mnist_arrays(files: Mapping[str, str | os.PathLike]) -> dict[str, np.ndarray]:
    """Reads and checks the four IDX files.

    Args:
      files: a dict from each of `FILE_ROLES` to a path (as `find_idx_files` returns).

    Returns:
      `{"train_images": uint8 [n, 28, 28], "train_labels": uint8 [n], "test_images": ...,
      "test_labels": ...}`.

    Raises:
      ValueError: a role is missing, the arrays have the wrong rank, dtype or value range, or the
        images and labels of a split differ in number.
    """
    missing = [r for r in FILE_ROLES if r not in files]
    if missing:
        raise ValueError(f"IDX files lack the role(s) {missing}; expected all of {FILE_ROLES}")
    arrays = {role: read_idx(files[role]) for role in FILE_ROLES}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
            raise ValueError(
                f"{files[f'{split}_images']} must hold uint8 images [n, 28, 28], got "
                f"{images.dtype} {images.shape}"
            )
        if labels.dtype != np.uint8 or labels.ndim != 1:
            raise ValueError(
                f"{files[f'{split}_labels']} must hold uint8 labels [n], got "
                f"{labels.dtype} {labels.shape}"
            )
        if len(images) != len(labels):
            raise ValueError(
                f"the {split} split has {len(images)} images but {len(labels)} labels "
                f"({files[f'{split}_images']}, {files[f'{split}_labels']})"
            )
        if labels.size and labels.max() > 9:
            raise ValueError(
                f"{files[f'{split}_labels']} holds label {int(labels.max())}; allowed: 0..9"
            )
    return arrays
