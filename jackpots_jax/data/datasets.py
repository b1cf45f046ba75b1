"""The datasets by name, where their prepared tfds copies live, and how to prepare them.

Every dataset is a tfds dataset prepared in the array_record format in a tfds data directory
(`data_dir`; default `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`, tfds's convention), read
with `tfds.builder_from_directory(...).as_data_source(split)`: reading needs no TensorFlow.

  name           tfds directory read (under data_dir)     splits: train / eval   to prepare
  fashion_mnist  fashion_mnist/<v> if prepared there as   train / test           nothing extra:
                 array_record, else fashion_mnist_idx/1.0.0                      built by `prepare`
  mnist          mnist/<v>                                train / test           tensorflow-cpu
  cifar10        cifar10/<v>                              train / test           tensorflow-cpu
  cifar100       cifar100/<v>                             train / test           tensorflow-cpu
  imagenet2012   imagenet2012/<v>                         train / validation     tensorflow-cpu and
                                                                                 manual download
  imagenette     imagenette/<config>/<v> (default config  train / validation     tensorflow-cpu
                 full-size-v2; name another one as `imagenette/320px-v2`)

Preparing a tfds dataset runs its tfds builder, whose generation code uses TensorFlow
(`tf.io.gfile`, and image encoding from arrays): install `tensorflow-cpu` (or `tensorflow`) on the
machine that prepares it, once, and prepare in the array_record format. tfds 4.9 also needs
`importlib_resources` to run its own builders on Python >= 3.9 without declaring it
(tensorflow/datasets#11212). For example

    pip install tensorflow-cpu importlib_resources
    tfds build cifar10 --data_dir=$DATA_DIR --file_format=array_record

The prepared directory can then be copied to machines without TensorFlow. A copy prepared in tfds's
default tfrecord format cannot be read without TensorFlow; `prepare` says so and how to rebuild.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from collections.abc import Mapping

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jackpots_jax.data import augment, fashion_mnist


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the engine needs to know about a prepared dataset.

    Attributes:
      name: the name it was asked for (`"fashion_mnist"`, `"cifar10"`, `"imagenette/320px-v2"`).
      num_classes: the number of labels.
      image_shape: `(H, W, C)` of the images the iterators yield (after pre-processing).
      num_train: examples in the training split.
      num_eval: examples in the evaluation split.
      train_split: the tfds name of the training split.
      eval_split: the tfds name of the evaluation split (`test` or `validation`).
      split_sizes: examples in every split of the prepared copy.
      class_names: the label names, index by index.
      builder_dir: the tfds directory the data is read from.
      tfds_name: the tfds builder (and config) of that directory, e.g. `fashion_mnist_idx`.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    num_train: int
    num_eval: int
    train_split: str
    eval_split: str
    split_sizes: Mapping[str, int] = dataclasses.field(compare=False)
    class_names: tuple[str, ...] = ()
    builder_dir: str = ""
    tfds_name: str = ""


@dataclasses.dataclass(frozen=True)
class Spec:
    """The recipe of one dataset name.

    Attributes:
      tfds_name: the tfds builder name.
      train_split, eval_split: the splits used.
      recipe: `"small"` (fixed-size images, held decoded in memory, augmented a batch at a time)
        or `"imagenet"` (variable-size JPEGs, decoded and augmented image by image).
      mean, std: per-channel normalisation (of the [0, 1] scale).
      padding: zero padding of the random crop (`"small"` only).
      flip: whether training mirrors images at random.
      default_config: the tfds config read when the name gives none (None: no configs).
      prepare_hint: how to prepare it, for the error raised when it is not prepared.
    """

    tfds_name: str
    train_split: str
    eval_split: str
    recipe: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    padding: int = 0
    flip: bool = True
    default_config: str | None = None
    prepare_hint: str = ""


def _tfds_build_hint(name: str) -> str:
    return (
        "Prepare it once, in the array_record format, on a machine with TensorFlow "
        "(`pip install tensorflow-cpu importlib_resources`): "
        f"`tfds build {name} --data_dir={{data_dir}} --file_format=array_record`. "
        "Reading it afterwards needs no TensorFlow."
    )


_IMAGENET_HINT = (
    "ImageNet must be downloaded by hand (https://image-net.org/download-images, after accepting "
    "its terms): put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into "
    "{data_dir}/downloads/manual/ (tfds's manual directory; or name another one with "
    "--manual_dir), then on a machine with TensorFlow "
    "(`pip install tensorflow-cpu importlib_resources`) run "
    "`tfds build imagenet2012 --data_dir={data_dir} --file_format=array_record`. Reading it "
    "afterwards needs no TensorFlow."
)

SPECS: dict[str, Spec] = {
    "fashion_mnist": Spec(
        "fashion_mnist",
        "train",
        "test",
        "small",
        augment.FASHION_MNIST_MEAN,
        augment.FASHION_MNIST_STD,
        padding=2,
        flip=True,
        prepare_hint=fashion_mnist.HOW_TO_GET,
    ),
    "mnist": Spec(
        "mnist",
        "train",
        "test",
        "small",
        augment.MNIST_MEAN,
        augment.MNIST_STD,
        padding=2,
        flip=False,
        prepare_hint=_tfds_build_hint("mnist"),
    ),
    "cifar10": Spec(
        "cifar10",
        "train",
        "test",
        "small",
        augment.CIFAR_MEAN,
        augment.CIFAR_STD,
        padding=4,
        prepare_hint=_tfds_build_hint("cifar10"),
    ),
    "cifar100": Spec(
        "cifar100",
        "train",
        "test",
        "small",
        augment.CIFAR_MEAN,
        augment.CIFAR_STD,
        padding=4,
        prepare_hint=_tfds_build_hint("cifar100"),
    ),
    "imagenet2012": Spec(
        "imagenet2012",
        "train",
        "validation",
        "imagenet",
        augment.IMAGENET_MEAN,
        augment.IMAGENET_STD,
        prepare_hint=_IMAGENET_HINT,
    ),
    "imagenette": Spec(
        "imagenette",
        "train",
        "validation",
        "imagenet",
        augment.IMAGENET_MEAN,
        augment.IMAGENET_STD,
        default_config="full-size-v2",
        prepare_hint=_tfds_build_hint("imagenette/{config}"),
    ),
}
NAMES = tuple(SPECS)
IMAGENET_SIZE = 224
_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


def default_data_dir() -> str:
    """tfds's default data directory: `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`."""
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def resolve_data_dir(data_dir: str | os.PathLike | None) -> epath.Path:
    """`data_dir`, or `default_data_dir()` when it is None, with `~` expanded."""
    return epath.Path(default_data_dir() if data_dir is None else data_dir).expanduser()


def spec(name: str) -> tuple[Spec, str | None]:
    """The recipe of a dataset name and the tfds config it names.

    Args:
      name: one of `NAMES`, optionally with a tfds config (`"imagenette/160px-v2"`).

    Returns:
      `(spec, config)`; `config` is None when the name gives none.

    Raises:
      ValueError: an unknown name, or a config for a dataset that has none.
    """
    if not isinstance(name, str):
        raise ValueError(f"dataset `name` must be a string, one of {NAMES}; got {name!r}")
    base, _, config = name.partition("/")
    if base not in SPECS:
        raise ValueError(f"unknown dataset name {name!r}; known datasets: {', '.join(NAMES)}")
    s = SPECS[base]
    if config and s.default_config is None:
        raise ValueError(f"dataset {base!r} has no tfds configs, got {name!r}; use {base!r}")
    return s, config or None


def _version_key(path: epath.Path) -> tuple[int, ...] | None:
    m = _VERSION.match(path.name)
    return tuple(int(g) for g in m.groups()) if m else None


def find_prepared(
    data_dir: epath.Path, tfds_name: str, config: str | None = None
) -> epath.Path | None:
    """The newest complete version directory `<data_dir>/<tfds_name>[/<config>]/<version>`.

    Args:
      data_dir: the tfds data directory.
      tfds_name: the builder name.
      config: the builder config, if it has configs.

    Returns:
      An `epath.Path`, or None when no complete version is there (tfds's `incomplete.*`
      directories of an unfinished build are never returned).
    """
    root = data_dir / tfds_name
    if config:
        root = root / config
    if not root.is_dir():
        return None
    versions = [
        p
        for p in root.iterdir()
        if _version_key(p) is not None and (p / "dataset_info.json").exists()
    ]
    return max(versions, key=_version_key) if versions else None


def _default_config(data_dir: epath.Path, s: Spec) -> str:
    """The config tfds last recorded as default in `<name>/.config/metadata.json`, or the spec's."""
    metadata = data_dir / s.tfds_name / ".config" / "metadata.json"
    try:
        return json.loads(metadata.read_text())["default_config_name"]
    except (OSError, ValueError, KeyError):
        return s.default_config


def _file_format(builder: tfds.core.DatasetBuilder) -> str:
    fmt = builder.info.file_format
    return getattr(fmt, "value", str(fmt))


@functools.lru_cache(maxsize=32)
def _builder(builder_dir: str) -> tfds.core.DatasetBuilder:
    return tfds.builder_from_directory(builder_dir)


def data_source(info: DatasetInfo, split: str):
    """The tfds random-access data source of one split (array_record, decoded with numpy).

    Args:
      info: from `prepare`.
      split: a split of `info.split_sizes`.

    Returns:
      A sequence of example dicts (`"image"`: uint8 [H, W, C], `"label"`: int, ...).
    """
    if split not in info.split_sizes:
        raise ValueError(
            f"dataset {info.name!r} has no split {split!r}; splits: {sorted(info.split_sizes)}"
        )
    return _builder(info.builder_dir).as_data_source(split)


def prepare(
    name: str,
    data_dir: str | os.PathLike | None = None,
    source_dir: str | os.PathLike | None = None,
) -> DatasetInfo:
    """Finds a prepared dataset, building the offline default (Fashion-MNIST) when needed.

    Args:
      name: one of `NAMES` (`imagenette` may name a config: `"imagenette/320px-v2"`).
      data_dir: the tfds data directory; None for `default_data_dir()`.
      source_dir: for `fashion_mnist` only, a directory with the four IDX files to build from
        (otherwise they are looked for in Debian's `dataset-fashion-mnist`, then downloaded).

    Returns:
      The dataset's `DatasetInfo`.

    Raises:
      ValueError: an unknown name, `source_dir` for another dataset, or a copy prepared in a
        format that cannot be read without TensorFlow.
      FileNotFoundError: the dataset is not prepared in `data_dir` (the message says how to
        prepare it), or Fashion-MNIST's IDX files are not found (the message says how to get them).

    Example:
      >>> info = prepare("fashion_mnist", "/tmp/tfds")
      >>> info.num_train, info.image_shape
      (60000, (28, 28, 1))
    """
    s, config = spec(name)
    root = resolve_data_dir(data_dir)
    if source_dir is not None and s.tfds_name != "fashion_mnist":
        raise ValueError(
            f"`source_dir` is only used to build 'fashion_mnist', got {source_dir!r} for {name!r}"
        )
    if s.default_config is not None and config is None:
        config = _default_config(root, s)
    path = find_prepared(root, s.tfds_name, config)
    if s.tfds_name == "fashion_mnist":
        if path is not None and _file_format(_builder(os.fspath(path))) != "array_record":
            logging.info(
                "%s is not in the array_record format; using %s", path, "fashion_mnist_idx"
            )
            path = None
        if path is None:
            path = fashion_mnist.build(root, source_dir)
    elif path is None:
        hint = s.prepare_hint.format(data_dir=os.fspath(root), config=config)
        where = root / s.tfds_name / config if config else root / s.tfds_name
        raise FileNotFoundError(
            f"dataset {name!r} is not prepared in the data directory {os.fspath(root)!r} "
            f"(no complete version under {os.fspath(where)!r}). {hint}"
        )
    builder = _builder(os.fspath(path))
    fmt = _file_format(builder)
    if fmt != "array_record":
        raise ValueError(
            f"dataset {name!r} at {os.fspath(path)!r} is prepared in the {fmt!r} format, which "
            "cannot be read without TensorFlow; prepare it again with "
            f"`--file_format=array_record` (`tfds build {s.tfds_name} "
            f"--data_dir={os.fspath(root)} --file_format=array_record`, with tensorflow-cpu "
            "installed), into another data directory or after removing that one"
        )
    return _info(name, s, builder, path)


def _info(name: str, s: Spec, builder: tfds.core.DatasetBuilder, path) -> DatasetInfo:
    info = builder.info
    sizes = {split: int(v.num_examples) for split, v in info.splits.items()}
    for split in (s.train_split, s.eval_split):
        if split not in sizes:
            raise ValueError(
                f"dataset {name!r} at {os.fspath(path)!r} has no {split!r} split (it has "
                f"{sorted(sizes)}); prepare it with all its splits"
            )
    features = info.features
    for key in ("image", "label"):
        if key not in features:
            raise ValueError(
                f"dataset {name!r} at {os.fspath(path)!r} has no {key!r} feature (features: "
                f"{sorted(features.keys())})"
            )
    label = features["label"]
    image_shape = tuple(features["image"].shape)
    if s.recipe == "imagenet":
        image_shape = (IMAGENET_SIZE, IMAGENET_SIZE, 3)
    elif len(image_shape) != 3 or None in image_shape:
        raise ValueError(
            f"dataset {name!r} must have images of one fixed shape (H, W, C), got {image_shape}"
        )
    return DatasetInfo(
        name=name,
        num_classes=int(label.num_classes),
        image_shape=tuple(int(d) for d in image_shape),
        num_train=sizes[s.train_split],
        num_eval=sizes[s.eval_split],
        train_split=s.train_split,
        eval_split=s.eval_split,
        split_sizes=sizes,
        class_names=tuple(label.names),
        builder_dir=os.fspath(path),
        tfds_name=info.full_name.rsplit("/", 1)[0],
    )


def steps_per_epoch(info: DatasetInfo, global_batch_size: int, num_examples: int | None = None):
    """The number of training batches in one epoch (the last partial batch is dropped).

    Equal for every host: each of `P` hosts reads `n // P` examples in batches of
    `global_batch_size // P`, which is `n // global_batch_size` batches.

    Args:
      info: from `prepare`.
      global_batch_size: the batch over all hosts and devices.
      num_examples: the first N examples of the training split only (None: all).

    Returns:
      `num_train // global_batch_size` (or `num_examples // global_batch_size`).

    Raises:
      ValueError: a non-positive batch size, `num_examples` out of range, or an epoch with no
        complete batch.
    """
    n = check_num_examples(info.num_train, num_examples, info.train_split)
    check_positive(global_batch_size, "global_batch_size")
    steps = n // global_batch_size
    if steps == 0:
        raise ValueError(
            f"`global_batch_size` {global_batch_size} exceeds the {n} training examples of "
            f"{info.name!r}: an epoch would have no complete batch"
        )
    return steps


def check_positive(value: int, field: str) -> int:
    """`value` if it is a positive integer, else a ValueError naming `field`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{field}` must be a positive integer, got {value!r}")
    return int(value)


def check_num_examples(size: int, num_examples: int | None, split: str) -> int:
    """The number of examples used: `num_examples` (1..size) or the whole split."""
    if num_examples is None:
        return size
    check_positive(num_examples, "num_examples")
    if num_examples > size:
        raise ValueError(
            f"`num_examples` {num_examples} exceeds the {size} examples of split {split!r}"
        )
    return int(num_examples)
