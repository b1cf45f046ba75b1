"""Throughput of the training input pipelines against the model step that consumes them.

Measures, on this machine:
  * images/s of `jackpots_jax.data.train_iterator` for Fashion-MNIST (the real dataset, built into
    `--data-dir` from the IDX files if it is not there) and for a CIFAR-shaped dataset (random
    32x32x3 PNG images written in tfds's `cifar10` format to a temporary directory), with the
    training augmentation on, for each number of prefetch threads in `--threads`;
  * images/s of a jitted training step (see `measure_step_images_per_second`);
  * both together (the pipeline's prefetch thread running beside the step), and the ratio of
    pipeline to step throughput: well above 1 means the input pipeline is not the bottleneck.

Run:
  python benchmarks/input_pipeline.py --batch-size 256 --steps 200
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from collections.abc import Callable

import numpy as np


def pipeline_images_per_second(make_iterator: Callable, steps: int, warmup: int = 5) -> float:
    """Images/s of an iterator drained as fast as possible (after `warmup` batches).

    Args:
      make_iterator: builds the iterator (its set-up, e.g. reading the data, is not timed).
      steps: batches timed.
      warmup: batches taken before timing (the first one includes loading the split).

    Returns:
      Images per second.
    """
    it = make_iterator()
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    count = 0
    for _ in range(steps):
        count += len(next(it)["label"])
    return count / (time.perf_counter() - start)


def _tiny_cnn():
    import flax.linen as nn

    class TinyCNN(nn.Module):
        """Two 3x3 convs (16, 32 channels) with pooling and a dense classifier."""

        @nn.compact
        def __call__(self, x, train: bool = True):
            for features in (16, 32):
                x = nn.relu(nn.Conv(features, (3, 3))(x))
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            return nn.Dense(10)(x.reshape(x.shape[0], -1))

    return TinyCNN()


def make_step(global_batch_size: int, image_shape=(28, 28, 1)):
    """A jitted SGD training step of the small model, and a label saying which model it is.

    Uses `jackpots_jax.models`' `fmnist_cnn` (the offline default's model, batch norm in training
    mode) when that package is importable; otherwise a tiny Flax CNN defined here.

    Args:
      global_batch_size: the batch the step takes.
      image_shape: `(H, W, C)` of the images.

    Returns:
      `(step, state, label)`: `state = step(state, images, labels)` runs one step.
    """
    import jax
    import jax.numpy as jnp
    import optax

    try:
        from jackpots_jax import models

        model = models.create("fmnist_cnn", num_classes=10)
        label = "jitted forward+backward+SGD of jackpots_jax.models 'fmnist_cnn'"
        uses_batch_stats = True
    except ImportError:
        model = _tiny_cnn()
        label = "jitted forward+backward+SGD of a tiny Flax CNN defined in this benchmark"
        uses_batch_stats = False
    x = jnp.zeros((global_batch_size, *image_shape), jnp.float32)
    variables = model.init(jax.random.key(0), x, train=False)
    tx = optax.sgd(0.01, momentum=0.9)

    def loss_fn(params, batch_stats, images, labels):
        if uses_batch_stats:
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            batch_stats = updates["batch_stats"]
        else:
            logits = model.apply({"params": params}, images)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, batch_stats

    @jax.jit
    def step(state, images, labels):
        params, batch_stats, opt_state = state
        grads, batch_stats = jax.grad(loss_fn, has_aux=True)(params, batch_stats, images, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state

    params = variables["params"]
    state = (params, variables.get("batch_stats", {}), tx.init(params))
    return step, state, label


def measure_step_images_per_second(global_batch_size: int, steps: int = 30) -> tuple[float, str]:
    """Images/s of a jitted training step of the small model on random data.

    Args:
      global_batch_size: the batch size.
      steps: steps timed after compilation.

    Returns:
      `(images_per_second, label)`, the label naming the model timed (see `make_step`).
    """
    import jax

    step, state, label = make_step(global_batch_size)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((global_batch_size, 28, 28, 1)).astype(np.float32)
    labels = rng.integers(0, 10, global_batch_size).astype(np.int32)
    state = jax.block_until_ready(step(state, images, labels))
    start = time.perf_counter()
    for _ in range(steps):
        state = step(state, images, labels)
    jax.block_until_ready(state)
    return steps * global_batch_size / (time.perf_counter() - start), label


def measure_together(make_iterator: Callable, global_batch_size: int, steps: int) -> float:
    """Images/s of the step fed by the pipeline (prefetch running beside the step)."""
    import jax

    step, state, _ = make_step(global_batch_size)
    it = make_iterator()
    batch = next(it)
    state = jax.block_until_ready(step(state, batch["image"], batch["label"]))
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(it)
        state = step(state, batch["image"], batch["label"])
    jax.block_until_ready(state)
    return steps * global_batch_size / (time.perf_counter() - start)


def write_cifar_shaped(data_dir: str, num_train: int, num_test: int) -> None:
    """Writes random 32x32x3 images as PNG in tfds's `cifar10` format (features, dtypes, splits)."""
    import tensorflow_datasets as tfds
    from PIL import Image

    rng = np.random.default_rng(0)

    def png(image):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return buffer.getvalue()

    class Cifar10(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = "cifar10"
        VERSION = tfds.core.Version("3.0.2")
        code_path = None  # no checksums file to look up

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "id": tfds.features.Text(),
                        "image": tfds.features.Image(shape=(32, 32, 3)),
                        "label": tfds.features.ClassLabel(num_classes=10),
                    }
                ),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            return {
                "train": self._generate_examples(num_train),
                "test": self._generate_examples(num_test),
            }

        def _generate_examples(self, n):
            for i in range(n):
                image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                yield i, {"id": f"id_{i}", "image": png(image), "label": i % 10}

    Cifar10(data_dir=data_dir, file_format="array_record").download_and_prepare()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=256, help="global batch size")
    parser.add_argument("--steps", type=int, default=200, help="batches timed per measurement")
    parser.add_argument(
        "--threads", default="0,1,2", help="prefetch threads to try, comma-separated"
    )
    parser.add_argument("--data-dir", default=None, help="tfds data directory (default: tfds's)")
    parser.add_argument(
        "--source-dir", default=None, help="directory of the Fashion-MNIST IDX files"
    )
    parser.add_argument(
        "--cifar-train", type=int, default=10000, help="CIFAR-shaped train examples"
    )
    args = parser.parse_args()

    import jax

    from jackpots_jax import data

    threads = [int(t) for t in args.threads.split(",")]
    batch = args.batch_size
    print(f"devices: {jax.devices()}; batch {batch}; {args.steps} batches per measurement")
    info = data.prepare("fashion_mnist", args.data_dir, source_dir=args.source_dir)
    print(f"fashion_mnist: {info.num_train} training images from {info.builder_dir}")

    def fmnist(num_threads):
        return lambda: data.train_iterator(
            "fashion_mnist",
            data_dir=args.data_dir,
            global_batch_size=batch,
            seed=0,
            local_device_count=1,
            num_threads=num_threads,
        )

    results = {}
    for t in threads:
        results[("fashion_mnist", t)] = pipeline_images_per_second(fmnist(t), args.steps)
        print(
            f"  pipeline fashion_mnist, {t} thread(s): {results[('fashion_mnist', t)]:,.0f} img/s"
        )

    with tempfile.TemporaryDirectory() as cifar_dir:
        write_cifar_shaped(cifar_dir, args.cifar_train, 1000)
        for t in threads:

            def cifar(num_threads=t):
                return data.train_iterator(
                    "cifar10",
                    data_dir=cifar_dir,
                    global_batch_size=batch,
                    seed=0,
                    local_device_count=1,
                    num_threads=num_threads,
                )

            results[("cifar", t)] = pipeline_images_per_second(cifar, args.steps)
            print(f"  pipeline CIFAR-shaped, {t} thread(s): {results[('cifar', t)]:,.0f} img/s")

    step_rate, label = measure_step_images_per_second(batch)
    print(f"step: {label}: {step_rate:,.0f} img/s")
    best = max(threads, key=lambda t: results[("fashion_mnist", t)])
    for t in threads:
        together = measure_together(fmnist(t), batch, min(args.steps, 60))
        print(f"  step fed by the fashion_mnist pipeline, {t} thread(s): {together:,.0f} img/s")
    ratio = results[("fashion_mnist", best)] / step_rate
    print(f"ratio pipeline / step (fashion_mnist, {best} thread(s)): {ratio:.1f}x")


if __name__ == "__main__":
    main()
