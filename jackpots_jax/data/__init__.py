"""Input pipelines: tfds datasets read with grain, with the paper's pre-processing.

Every dataset is a tfds dataset in the array_record format, read without TensorFlow through
`tfds.builder_from_directory(...).as_data_source(split)` and fed through a grain pipeline. The
offline default, `fashion_mnist`, is built here from the real Fashion-MNIST IDX files (see
`fashion_mnist`); the others (`mnist`, `cifar10`, `cifar100`, `imagenet2012`, `imagenette`) are
read from copies prepared with tfds (see `datasets` for what preparing each one needs). Text
corpora for language models (tokenized, cached and packed into windows) are in `text`.

Example:
  >>> from jackpots_jax import data
  >>> info = data.prepare("fashion_mnist", "/tmp/tfds")         # builds it on first use
  >>> it = data.train_iterator("fashion_mnist", data_dir="/tmp/tfds", global_batch_size=256,
  ...                          seed=0)
  >>> batch = next(it)            # {"image": float32 [256, 28, 28, 1], "label": int32 [256]}
  >>> state = it.get_state()      # a JSON-serialisable dict; it.set_state(state) resumes
  >>> for batch in data.eval_iterator("fashion_mnist", data_dir="/tmp/tfds",
  ...                                 global_batch_size=500):
  ...   ...                       # plus "mask": bool [500], False on padding
"""

from jackpots_jax.data import augment, fashion_mnist, idx, text
from jackpots_jax.data.augment import (
    CIFAR_MEAN,
    CIFAR_STD,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST_MEAN,
    MNIST_STD,
    crop_and_flip,
    normalize,
    random_crop_and_flip,
    random_resized_crop,
    random_resized_crop_box,
    resize_and_center_crop,
)
from jackpots_jax.data.datasets import (
    NAMES,
    DatasetInfo,
    default_data_dir,
    prepare,
    steps_per_epoch,
)
from jackpots_jax.data.pipeline import (
    TrainIterator,
    eval_iterator,
    eval_layout,
    eval_steps,
    local_batch_size,
    train_iterator,
)

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "NAMES",
    "DatasetInfo",
    "TrainIterator",
    "augment",
    "crop_and_flip",
    "default_data_dir",
    "eval_iterator",
    "eval_layout",
    "eval_steps",
    "fashion_mnist",
    "idx",
    "local_batch_size",
    "normalize",
    "prepare",
    "random_crop_and_flip",
    "random_resized_crop",
    "random_resized_crop_box",
    "resize_and_center_crop",
    "steps_per_epoch",
    "text",
    "train_iterator",
]
