"""Input pipelines: IDX parsing, the Fashion-MNIST build, tfds-format CIFAR / ImageNet copies,
sharding, exact evaluation, determinism, resumption and the augmentation recipes.

Small datasets are written by the tests themselves in tfds's array_record format, with the feature
names and dtypes of tfds's `cifar10`, `imagenet2012` and `fashion_mnist` (PNG / JPEG bytes for
`Image` features, encoded with PIL: no TensorFlow). Every image holds its example's index in its
first two pixels, so a batch can be traced back to the examples it came from.
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jackpots_jax import data
from jackpots_jax.data import augment, fashion_mnist, idx

FMNIST_TRAIN, FMNIST_TEST = 50, 37


# ----------------------------------------------------------------------------------------------
# Writing small datasets


def write_idx(path, array, compress):
    """An IDX file written from the format's definition (independent of the reader)."""
    codes = {np.dtype(np.uint8): 0x08}
    header = struct.pack(">BBBB", 0, 0, codes[array.dtype], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    content = header + array.tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(content))
    else:
        path.write_bytes(content)
    return path


def indexed_images(n, shape, seed):
    """Random uint8 images whose first two pixels hold the example index (little-endian)."""
    images = np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)
    flat = images.reshape(n, -1)
    flat[:, 0] = np.arange(n) % 256
    flat[:, 1] = np.arange(n) // 256
    return images


def index_of(images_uint8):
    flat = images_uint8.reshape(len(images_uint8), -1) if len(images_uint8) else np.zeros((0, 2))
    flat = flat[:, :2].astype(np.int64)
    return flat[:, 0] + 256 * flat[:, 1]


def unnormalize(images, mean, std):
    """Inverts `(x / 255 - mean) / std` and rounds back to uint8."""
    x = (np.asarray(images, np.float32) * np.asarray(std) + np.asarray(mean)) * 255.0
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def encode(image, fmt):
    buffer = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buffer, format=fmt)
    return buffer.getvalue()


class _Fixture(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder that writes given examples; subclasses mirror a real tfds dataset's info."""

    code_path = None  # no checksums file to look up (see jackpots_jax.data.fashion_mnist)

    def __init__(self, *, examples, **kwargs):
        self._examples = examples
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(rows) for split, rows in self._examples.items()}

    def _generate_examples(self, rows):
        yield from enumerate(rows)


class Cifar10(_Fixture, skip_registration=True):
    name = "cifar10"
    VERSION = tfds.core.Version("3.0.2")

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


class Imagenet2012(_Fixture, skip_registration=True):
    name = "imagenet2012"
    VERSION = tfds.core.Version("5.1.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(num_classes=1000),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
        )


class FashionMnist(_Fixture, skip_registration=True):
    name = "fashion_mnist"
    VERSION = tfds.core.Version("3.0.1")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 1)),
                    "label": tfds.features.ClassLabel(names=list(fashion_mnist.CLASS_NAMES)),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
        )


def build_fixture(cls, data_dir, examples):
    cls(
        examples=examples, data_dir=str(data_dir), file_format="array_record"
    ).download_and_prepare()


@pytest.fixture(scope="module")
def fmnist_arrays():
    return {
        "train_images": indexed_images(FMNIST_TRAIN, (28, 28), 0),
        "train_labels": (np.arange(FMNIST_TRAIN) * 7 % 10).astype(np.uint8),
        "test_images": indexed_images(FMNIST_TEST, (28, 28), 1),
        "test_labels": (np.arange(FMNIST_TEST) * 3 % 10).astype(np.uint8),
    }


def write_fmnist_sources(directory, arrays, compress):
    directory.mkdir(parents=True, exist_ok=True)
    names = {
        "train_images": "train-images-idx3-ubyte",
        "train_labels": "train-labels-idx1-ubyte",
        "test_images": "t10k-images-idx3-ubyte",
        "test_labels": "t10k-labels-idx1-ubyte",
    }
    for role, name in names.items():
        write_idx(directory / name, arrays[role], compress)
    return directory


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory, fmnist_arrays):
    """A data_dir with our Fashion-MNIST build of the small IDX files (gzip-compressed)."""
    root = tmp_path_factory.mktemp("fmnist")
    source = write_fmnist_sources(root / "src", fmnist_arrays, compress=True)
    data.prepare("fashion_mnist", root / "tfds", source_dir=source)
    return root / "tfds"


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    images = {
        "train": indexed_images(40, (32, 32, 3), 2),
        "test": indexed_images(13, (32, 32, 3), 3),
    }
    labels = {split: (np.arange(len(x)) * 3 % 10) for split, x in images.items()}
    examples = {
        split: [
            {"id": f"{split}_{i}", "image": encode(x, "PNG"), "label": int(labels[split][i])}
            for i, x in enumerate(images[split])
        ]
        for split in images
    }
    build_fixture(Cifar10, root, examples)
    return root, images, labels


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(4)
    sizes = {"train": [(240, 320), (300, 260), (256, 256)] * 2, "validation": [(250, 300)] * 5}
    images = {
        split: [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shape_list]
        for split, shape_list in sizes.items()
    }
    encoded = {split: [encode(x, "JPEG") for x in xs] for split, xs in images.items()}
    examples = {
        split: [
            {"image": jpeg, "label": 100 * i + 7, "file_name": f"{split}_{i}.JPEG"}
            for i, jpeg in enumerate(encoded[split])
        ]
        for split in encoded
    }
    build_fixture(Imagenet2012, root, examples)
    return root, encoded


# ----------------------------------------------------------------------------------------------
# IDX files


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_matches_written_arrays(tmp_path, compress):
    array = np.random.default_rng(0).integers(0, 256, (5, 3, 4), dtype=np.uint8)
    path = write_idx(tmp_path / "x-idx3-ubyte", array, compress)
    np.testing.assert_array_equal(idx.read_idx(path), array)


def test_parse_idx_rejects_bad_files():
    with pytest.raises(ValueError, match="two zero bytes"):
        idx.parse_idx(b"\x01\x00\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match=r"declares shape \(3,\)"):
        idx.parse_idx(b"\x00\x00\x08\x01\x00\x00\x00\x03\x00")
    with pytest.raises(ValueError, match="type code"):
        idx.parse_idx(b"\x00\x00\x07\x01\x00\x00\x00\x01\x00")


def test_find_idx_files_accepts_both_spellings_and_names_missing(tmp_path, fmnist_arrays):
    write_idx(tmp_path / "train-images.idx3-ubyte", fmnist_arrays["train_images"], True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", fmnist_arrays["train_labels"], False)
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.*t10k-labels-idx1-ubyte"):
        idx.find_idx_files(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", fmnist_arrays["test_images"], False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", fmnist_arrays["test_labels"], True)
    found = idx.find_idx_files(tmp_path)
    assert found["train_images"].name == "train-images.idx3-ubyte.gz"
    assert found["test_labels"].name == "t10k-labels-idx1-ubyte.gz"


# ----------------------------------------------------------------------------------------------
# Building Fashion-MNIST


def read_split(info, split):
    source = tfds.builder_from_directory(info.builder_dir).as_data_source(split)
    rows = source.__getitems__(list(range(len(source))))
    return np.stack([r["image"] for r in rows]), np.array([r["label"] for r in rows])


@pytest.mark.parametrize("compress", [False, True])
def test_build_fashion_mnist_from_idx_files(tmp_path, fmnist_arrays, compress):
    source = write_fmnist_sources(tmp_path / "src", fmnist_arrays, compress)
    info = data.prepare("fashion_mnist", tmp_path / "tfds", source_dir=source)
    assert info.builder_dir == str(tmp_path / "tfds" / "fashion_mnist_idx" / "1.0.0")
    assert info.tfds_name == "fashion_mnist_idx"
    assert (info.num_train, info.num_eval) == (FMNIST_TRAIN, FMNIST_TEST)
    assert (info.num_classes, info.image_shape) == (10, (28, 28, 1))
    assert info.class_names[0] == "T-shirt/top" and info.class_names[9] == "Ankle boot"
    for split, role in (("train", "train"), ("test", "test")):
        images, labels = read_split(info, split)
        np.testing.assert_array_equal(images[..., 0], fmnist_arrays[f"{role}_images"])
        np.testing.assert_array_equal(labels, fmnist_arrays[f"{role}_labels"])
    assert "tensorflow" not in sys.modules


def test_built_dataset_is_reused(fmnist_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("rebuilt although the dataset was there")

    monkeypatch.setattr(fashion_mnist.FashionMnistIdx, "download_and_prepare", fail)
    monkeypatch.setattr(fashion_mnist, "locate_sources", fail)
    info = data.prepare("fashion_mnist", fmnist_dir)
    assert info.num_train == FMNIST_TRAIN


def test_interrupted_build_leaves_nothing(tmp_path, fmnist_arrays, monkeypatch):
    source = write_fmnist_sources(tmp_path / "src", fmnist_arrays, compress=False)
    original = fashion_mnist.FashionMnistIdx._generate_examples

    def interrupted(self, images, labels):
        for i, example in enumerate(original(self, images, labels)):
            if i == 20:
                raise KeyboardInterrupt
            yield example

    monkeypatch.setattr(fashion_mnist.FashionMnistIdx, "_generate_examples", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.prepare("fashion_mnist", tmp_path / "tfds", source_dir=source)
    root = tmp_path / "tfds" / "fashion_mnist_idx"
    assert not (root / "1.0.0").exists()
    assert not list(root.glob("incomplete*"))

    # A build killed outright (no clean-up) leaves a temporary directory: the next build removes
    # it and completes.
    (root / "incomplete.ABC123_1.0.0").mkdir()
    (root / "incomplete.ABC123_1.0.0" / "half-written").write_bytes(b"x")
    monkeypatch.setattr(fashion_mnist.FashionMnistIdx, "_generate_examples", original)
    info = data.prepare("fashion_mnist", tmp_path / "tfds", source_dir=source)
    assert info.num_train == FMNIST_TRAIN
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["1.0.0"]


def test_no_sources_error_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(idx, "debian_idx_files", lambda: None)
    monkeypatch.setattr(fashion_mnist, "_online", lambda url: False)
    with pytest.raises(FileNotFoundError) as e:
        data.prepare("fashion_mnist", tmp_path)
    assert "apt-get install -y dataset-fashion-mnist" in str(e.value)
    # The config field by its whole name (it lives in the `dataset` group).
    assert "`--config.dataset.source_dir=/path/to/dir`" in str(e.value)
    with pytest.raises(FileNotFoundError, match="lacks train-images-idx3-ubyte.*apt-get"):
        data.prepare("fashion_mnist", tmp_path, source_dir=tmp_path)


def test_downloads_when_online_and_no_local_copy(tmp_path, fmnist_arrays, monkeypatch):
    source = write_fmnist_sources(tmp_path / "src", fmnist_arrays, compress=True)
    requested = []

    def download(self, urls):
        requested.extend(urls.values())
        return {role: source / url.rsplit("/", 1)[1] for role, url in urls.items()}

    monkeypatch.setattr(idx, "debian_idx_files", lambda: None)
    monkeypatch.setattr(fashion_mnist, "_online", lambda url: True)
    monkeypatch.setattr(tfds.download.DownloadManager, "download", download)
    info = data.prepare("fashion_mnist", tmp_path / "tfds")
    assert sorted(requested) == sorted(
        fashion_mnist.DOWNLOAD_URL + f"{s}-{k}-ubyte.gz"
        for s in ("train", "t10k")
        for k in ("images-idx3", "labels-idx1")
    )
    np.testing.assert_array_equal(read_split(info, "test")[1], fmnist_arrays["test_labels"])


def test_prefers_tfds_own_fashion_mnist(tmp_path, fmnist_arrays):
    examples = {
        "train": [
            {"image": encode(x[..., None], "PNG"), "label": int(y)}
            for x, y in zip(
                fmnist_arrays["train_images"], fmnist_arrays["train_labels"], strict=True
            )
        ],
        "test": [
            {"image": encode(x[..., None], "PNG"), "label": int(y)}
            for x, y in zip(fmnist_arrays["test_images"], fmnist_arrays["test_labels"], strict=True)
        ],
    }
    build_fixture(FashionMnist, tmp_path, examples)
    info = data.prepare("fashion_mnist", tmp_path)
    assert info.tfds_name == "fashion_mnist"
    assert not (tmp_path / "fashion_mnist_idx").exists()
    batch = next(iter(data.eval_iterator("fashion_mnist", data_dir=tmp_path, **one_host(8))))
    images = unnormalize(batch["image"], augment.FASHION_MNIST_MEAN, augment.FASHION_MNIST_STD)
    np.testing.assert_array_equal(images[..., 0], fmnist_arrays["test_images"][:8])


@pytest.mark.slow
def test_real_fashion_mnist_from_debian(tmp_path):
    files = idx.debian_idx_files()
    if files is None:
        pytest.skip(
            "Debian's dataset-fashion-mnist is not installed "
            "(`apt-get install dataset-fashion-mnist`; CI installs it)"
        )
    info = data.prepare("fashion_mnist", tmp_path)
    assert (info.num_train, info.num_eval) == (60000, 10000)
    for split in ("train", "test"):
        images, labels = read_split(info, split)
        np.testing.assert_array_equal(images[..., 0], idx.read_idx(files[f"{split}_images"]))
        np.testing.assert_array_equal(labels, idx.read_idx(files[f"{split}_labels"]))
    # One host in order: the evaluation pass is the test file, example by example.
    labels, images = [], []
    for batch in data.eval_iterator("fashion_mnist", data_dir=tmp_path, **one_host(1024)):
        labels.append(batch["label"][batch["mask"]])
        images.append(batch["image"][batch["mask"]])
    np.testing.assert_array_equal(np.concatenate(labels), idx.read_idx(files["test_labels"]))
    images = unnormalize(
        np.concatenate(images), augment.FASHION_MNIST_MEAN, augment.FASHION_MNIST_STD
    )
    np.testing.assert_array_equal(images[..., 0], idx.read_idx(files["test_images"]))
    # The normalisation constants are the statistics of the real training images.
    train = idx.read_idx(files["train_images"]) / 255.0
    assert abs(train.mean() - augment.FASHION_MNIST_MEAN[0]) < 5e-4
    assert abs(train.std() - augment.FASHION_MNIST_STD[0]) < 5e-4


# ----------------------------------------------------------------------------------------------
# Names and errors


def test_unprepared_tfds_datasets_say_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build cifar10 .*array_record") as e:
        data.prepare("cifar10", tmp_path)
    assert "tensorflow-cpu" in str(e.value)
    with pytest.raises(FileNotFoundError, match="ILSVRC2012_img_train.tar.*downloads/manual"):
        data.prepare("imagenet2012", tmp_path)
    with pytest.raises(FileNotFoundError, match="tfds build imagenette/full-size-v2"):
        data.prepare("imagenette", tmp_path)
    with pytest.raises(FileNotFoundError, match="tfds build imagenette/160px-v2"):
        data.prepare("imagenette/160px-v2", tmp_path)


def test_bad_names_and_arguments(tmp_path, fmnist_dir):
    with pytest.raises(ValueError, match="unknown dataset name 'svhn'.*cifar10"):
        data.prepare("svhn", tmp_path)
    with pytest.raises(ValueError, match="has no tfds configs"):
        data.prepare("cifar10/foo", tmp_path)
    with pytest.raises(ValueError, match="only used to build 'fashion_mnist'"):
        data.prepare("cifar10", tmp_path, source_dir=tmp_path)
    kw = dict(data_dir=fmnist_dir, seed=0, local_device_count=1)
    with pytest.raises(ValueError, match="multiple of the number of devices"):
        data.train_iterator("fashion_mnist", global_batch_size=10, process_count=4, **kw)
    with pytest.raises(ValueError, match="num_examples. 51 exceeds the 50"):
        data.train_iterator("fashion_mnist", global_batch_size=8, num_examples=51, **kw)
    with pytest.raises(ValueError, match="no complete batch"):
        data.train_iterator("fashion_mnist", global_batch_size=64, **kw)
    with pytest.raises(ValueError, match="dtype. must be float32 or bfloat16"):
        data.train_iterator("fashion_mnist", global_batch_size=8, dtype=np.float16, **kw)
    with pytest.raises(ValueError, match=r"process_index. must be in \[0, 2\)"):
        data.train_iterator(
            "fashion_mnist", global_batch_size=8, process_index=2, process_count=2, **kw
        )
    with pytest.raises(ValueError, match="has no split 'validation'"):
        data.eval_iterator("fashion_mnist", "validation", data_dir=fmnist_dir, global_batch_size=8)


def test_batch_must_split_over_local_devices(fmnist_dir):
    import jax

    devices = jax.local_device_count()
    it = data.train_iterator(
        "fashion_mnist", data_dir=fmnist_dir, global_batch_size=devices, seed=0
    )
    assert next(it)["image"].shape[0] == devices
    if devices > 1:
        with pytest.raises(ValueError, match=f"{devices} device"):
            data.train_iterator(
                "fashion_mnist", data_dir=fmnist_dir, global_batch_size=devices + 1, seed=0
            )


# ----------------------------------------------------------------------------------------------
# Loaders


def one_host(batch):
    """Iterator arguments for a batch on one device per host (the tests force 8 CPU devices)."""
    return dict(global_batch_size=batch, local_device_count=1)


def train_ids(it, steps):
    """The example indices of the next `steps` batches (needs augment=False)."""
    out = []
    for _ in range(steps):
        batch = next(it)
        images = unnormalize(batch["image"], augment.FASHION_MNIST_MEAN, augment.FASHION_MNIST_STD)
        out.append(index_of(images))
    return np.stack(out)


def test_train_batches_shapes_labels_and_dtypes(fmnist_dir, fmnist_arrays):
    it = data.train_iterator(
        "fashion_mnist", data_dir=fmnist_dir, seed=0, augment=False, **one_host(8)
    )
    batch = next(it)
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (8, 28, 28, 1) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    ids = index_of(
        unnormalize(batch["image"], augment.FASHION_MNIST_MEAN, augment.FASHION_MNIST_STD)
    )
    np.testing.assert_array_equal(batch["label"], fmnist_arrays["train_labels"][ids])
    bf16 = data.train_iterator(
        "fashion_mnist", data_dir=fmnist_dir, seed=0, dtype="bfloat16", **one_host(8)
    )
    assert next(bf16)["image"].dtype.name == "bfloat16"


def test_train_is_deterministic_and_reshuffled_each_epoch(fmnist_dir):
    def make(seed):
        return data.train_iterator(
            "fashion_mnist", data_dir=fmnist_dir, seed=seed, augment=False, **one_host(8)
        )

    steps = data.steps_per_epoch(data.prepare("fashion_mnist", fmnist_dir), 8)
    assert steps == FMNIST_TRAIN // 8 == make(0).steps_per_epoch
    ids = train_ids(make(0), 3 * steps)
    np.testing.assert_array_equal(ids, train_ids(make(0), 3 * steps))
    assert not np.array_equal(ids, train_ids(make(1), 3 * steps))
    epochs = ids.reshape(3, steps * 8)
    for epoch in epochs:  # drop remainder: 48 distinct examples of the 50 in each epoch
        assert len(set(epoch)) == steps * 8
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])

    augmented = data.train_iterator("fashion_mnist", data_dir=fmnist_dir, seed=0, **one_host(8))
    again = data.train_iterator("fashion_mnist", data_dir=fmnist_dir, seed=0, **one_host(8))
    for _ in range(steps + 1):
        a, b = next(augmented), next(again)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


@pytest.mark.parametrize("hosts", [2, 3])
def test_hosts_split_the_one_host_batches(fmnist_dir, hosts):
    """On P hosts, host p yields rows [p*B/P, (p+1)*B/P) of the batches one host yields,
    augmentation included, across an epoch boundary; within an epoch no example repeats."""
    local = 4
    batch = local * hosts
    steps = FMNIST_TRAIN // batch
    for augmented in (False, True):
        kw = dict(data_dir=fmnist_dir, seed=5, augment=augmented, **one_host(batch))
        whole = data.train_iterator("fashion_mnist", **kw)
        parts = [
            data.train_iterator("fashion_mnist", process_index=h, process_count=hosts, **kw)
            for h in range(hosts)
        ]
        assert all(it.steps_per_epoch == whole.steps_per_epoch == steps for it in parts)
        assert all(it.local_batch_size == local for it in parts)
        for _ in range(steps + 2):
            want = next(whole)
            got = [next(it) for it in parts]
            for key in ("image", "label"):
                np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])
    ids = [
        train_ids(
            data.train_iterator(
                "fashion_mnist",
                data_dir=fmnist_dir,
                seed=0,
                augment=False,
                process_index=h,
                process_count=hosts,
                **one_host(batch),
            ),
            steps,
        ).ravel()
        for h in range(hosts)
    ]
    epoch = np.concatenate(ids)
    assert len(set(epoch.tolist())) == len(epoch) == steps * batch


def test_restore_mid_epoch_gives_the_same_batches(fmnist_dir):
    def make():
        return data.train_iterator("fashion_mnist", data_dir=fmnist_dir, seed=3, **one_host(8))

    reference = make()
    expected = [next(reference) for _ in range(15)]  # 6 batches per epoch: crosses two epochs
    it = make()
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["next_index"] == 4
    resumed = make()
    resumed.set_state(state)
    for want in expected[4:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])

    other = data.train_iterator("fashion_mnist", data_dir=fmnist_dir, seed=4, **one_host(8))
    with pytest.raises(ValueError, match="seed: saved 3, now 4"):
        other.set_state(state)
    with pytest.raises(ValueError, match="next_index"):
        resumed.set_state({"step": 3})


@pytest.mark.parametrize("hosts", [1, 2, 3])
@pytest.mark.parametrize("num_examples", [None, 29, 2])
def test_eval_counts_every_example_once(fmnist_dir, fmnist_arrays, hosts, num_examples):
    n = FMNIST_TEST if num_examples is None else num_examples
    local = 4
    info = data.prepare("fashion_mnist", fmnist_dir)
    steps = data.eval_steps(info, local * hosts, process_count=hosts, num_examples=num_examples)
    ids, labels, shapes = [], [], set()
    for host in range(hosts):
        batches = list(
            data.eval_iterator(
                "fashion_mnist",
                data_dir=fmnist_dir,
                process_index=host,
                process_count=hosts,
                num_examples=num_examples,
                **one_host(local * hosts),
            )
        )
        assert len(batches) == steps  # the same number of batches on every host
        for batch in batches:
            shapes.add((batch["image"].shape, batch["label"].shape, batch["mask"].shape))
            assert batch["mask"].dtype == bool
            m = batch["mask"]
            assert not batch["image"][~m].any() and not batch["label"][~m].any()
            images = unnormalize(
                batch["image"][m], augment.FASHION_MNIST_MEAN, augment.FASHION_MNIST_STD
            )
            ids.extend(index_of(images))
            labels.extend(batch["label"][m])
    assert shapes == {((local, 28, 28, 1), (local,), (local,))}
    assert sorted(ids) == list(range(n))
    np.testing.assert_array_equal(
        np.array(labels)[np.argsort(ids)], fmnist_arrays["test_labels"][:n]
    )


def test_cifar_format(cifar):
    root, images, labels = cifar
    info = data.prepare("cifar10", root)
    assert (info.num_classes, info.image_shape, info.num_train, info.num_eval) == (
        10,
        (32, 32, 3),
        40,
        13,
    )
    assert (info.train_split, info.eval_split) == ("train", "test")
    batches = list(data.eval_iterator("cifar10", data_dir=root, **one_host(8)))
    assert len(batches) == 2
    got = np.concatenate([b["image"][b["mask"]] for b in batches])
    # tfds stores the records in its own (hashed) order: match them by the index in the pixels.
    ids = index_of(unnormalize(got, augment.CIFAR_MEAN, augment.CIFAR_STD))
    assert sorted(ids) == list(range(13))
    want = (images["test"] / 255.0 - np.array(augment.CIFAR_MEAN)) / np.array(augment.CIFAR_STD)
    np.testing.assert_allclose(got, want[ids], atol=1e-5)
    got_labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(got_labels, labels["test"][ids])

    it = data.train_iterator("cifar10", data_dir=root, seed=0, **one_host(8))
    batch = next(it)
    assert batch["image"].shape == (8, 32, 32, 3)
    raw = unnormalize(batch["image"], augment.CIFAR_MEAN, augment.CIFAR_STD)
    # Each augmented image is one of the 81 x 2 crops and flips of some training image.
    originals = images["train"]
    for image, label in zip(raw, batch["label"], strict=True):
        assert any(
            matches_crop(image, original) for original in originals[labels["train"] == label]
        )


def matches_crop(image, original, padding=4):
    padded = np.pad(original, ((padding, padding), (padding, padding), (0, 0)))
    h, w = original.shape[:2]
    for y in range(2 * padding + 1):
        for x in range(2 * padding + 1):
            crop = padded[y : y + h, x : x + w]
            if np.array_equal(image, crop) or np.array_equal(image, crop[:, ::-1]):
                return True
    return False


def imagenet_eval_reference(jpeg):
    """torchvision's Resize(256) + CenterCrop(224), written out with PIL for one image."""
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    w, h = image.size
    size = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = int(round((size[0] - 224) / 2)), int(round((size[1] - 224) / 2))
    out = np.asarray(image.crop((left, top, left + 224, top + 224)), np.float32) / 255.0
    return (out - np.array(augment.IMAGENET_MEAN)) / np.array(augment.IMAGENET_STD)


def test_imagenet_format(imagenet):
    root, encoded = imagenet
    info = data.prepare("imagenet2012", root)
    assert (info.num_classes, info.image_shape) == (1000, (224, 224, 3))
    assert (info.train_split, info.eval_split) == ("train", "validation")
    batches = list(data.eval_iterator("imagenet2012", data_dir=root, num_threads=0, **one_host(4)))
    assert [b["mask"].sum() for b in batches] == [4, 1]
    got = np.concatenate([b["image"][b["mask"]] for b in batches])
    got_labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    # tfds stores the records in its own (hashed) order: the label says which example it is.
    assert sorted(got_labels) == list(100 * np.arange(5) + 7)
    want = np.stack([imagenet_eval_reference(encoded["validation"][y // 100]) for y in got_labels])
    np.testing.assert_allclose(got, want, atol=1e-5)

    it = data.train_iterator("imagenet2012", data_dir=root, seed=0, **one_host(2))
    assert it.steps_per_epoch == 3
    batch = next(it)
    assert batch["image"].shape == (2, 224, 224, 3) and batch["image"].dtype == np.float32
    assert set(batch["label"]) <= {100 * i + 7 for i in range(6)}
    lo = (0 - max(augment.IMAGENET_MEAN)) / min(augment.IMAGENET_STD)
    hi = (1 - min(augment.IMAGENET_MEAN)) / min(augment.IMAGENET_STD)
    assert lo - 1e-5 <= batch["image"].min() and batch["image"].max() <= hi + 1e-5
    again = data.train_iterator("imagenet2012", data_dir=root, seed=0, **one_host(2))
    np.testing.assert_array_equal(next(again)["image"], batch["image"])


# ----------------------------------------------------------------------------------------------
# Augmentation


def test_crop_and_flip_by_hand():
    image = np.arange(16, dtype=np.uint8).reshape(1, 4, 4, 1) + 1
    # Zero-padded by 1, the crop at (y, x) = (0, 2) is rows -1..2 and columns 1..4 of the image.
    want = np.array([[0, 0, 0, 0], [2, 3, 4, 0], [6, 7, 8, 0], [10, 11, 12, 0]], np.uint8)
    out = augment.crop_and_flip(image, np.array([[0, 2]]), np.array([False]), padding=1)
    np.testing.assert_array_equal(out[0, :, :, 0], want)
    out = augment.crop_and_flip(image, np.array([[0, 2]]), np.array([True]), padding=1)
    np.testing.assert_array_equal(out[0, :, :, 0], want[:, ::-1])
    centre = augment.crop_and_flip(image, np.array([[1, 1]]), np.array([False]), padding=1)
    np.testing.assert_array_equal(centre, image)
    with pytest.raises(ValueError, match=r"offsets. must lie in \[0, 2\]"):
        augment.crop_and_flip(image, np.array([[0, 3]]), np.array([False]), padding=1)


def test_random_crop_and_flip_stays_in_bounds_and_flips():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (64, 8, 8, 3), dtype=np.uint8)
    out = augment.random_crop_and_flip(images, np.random.default_rng(1), padding=2)
    assert out.shape == images.shape and out.dtype == np.uint8
    flips = 0
    for original, crop in zip(images, out, strict=True):
        padded = np.pad(original, ((2, 2), (2, 2), (0, 0)))
        hits = [
            (y, x, f)
            for y in range(5)
            for x in range(5)
            for f in (False, True)
            if np.array_equal(
                crop, padded[y : y + 8, x : x + 8][:, ::-1] if f else padded[y : y + 8, x : x + 8]
            )
        ]
        assert len(hits) == 1  # every output is exactly one in-bounds crop (pixels are non-zero)
        flips += hits[0][2]
    assert 16 < flips < 48
    same = augment.random_crop_and_flip(images, np.random.default_rng(1), padding=2)
    np.testing.assert_array_equal(out, same)
    no_flip = augment.random_crop_and_flip(images, np.random.default_rng(1), padding=0, flip=False)
    np.testing.assert_array_equal(no_flip, images)


def test_normalize():
    images = np.array([[[[0, 255, 51]]]], np.uint8)
    out = augment.normalize(images, (0.5, 0.5, 0.2), (0.25, 0.5, 0.1))
    np.testing.assert_allclose(out[0, 0, 0], [-2.0, 1.0, 0.0], atol=1e-6)
    assert out.dtype == np.float32
    with pytest.raises(ValueError, match="one value per channel"):
        augment.normalize(images, (0.5,), (0.25,))


def test_random_resized_crop_box():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = augment.random_resized_crop_box(300, 400, rng)
        assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400
        assert 0.08 * 120000 * 0.97 <= h * w <= 120000
        assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
    # No random box fits: the central crop at the nearest allowed aspect ratio.
    assert augment.random_resized_crop_box(100, 400, rng, attempts=0) == (0, 133, 100, 133)
    assert augment.random_resized_crop_box(90, 100, rng, attempts=0) == (0, 0, 90, 100)


def test_random_resized_crop_and_eval_crop():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    out = augment.random_resized_crop(image, rng, size=64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    # A crop forced to the whole image is a plain resize, mirrored or not.
    full = augment.random_resized_crop(
        image, np.random.default_rng(5), size=64, scale=(1, 1), ratio=(4 / 3, 4 / 3)
    )
    plain = np.asarray(Image.fromarray(image).resize((64, 64), Image.Resampling.BILINEAR))
    assert np.array_equal(full, plain) or np.array_equal(full, plain[:, ::-1])
    mirrored = sum(
        np.array_equal(
            augment.random_resized_crop(
                image, np.random.default_rng(s), size=64, scale=(1, 1), ratio=(4 / 3, 4 / 3)
            ),
            plain[:, ::-1],
        )
        for s in range(20)
    )
    assert 3 <= mirrored <= 17
    # Already at the evaluation size along the shorter side: only the central crop remains.
    image = rng.integers(0, 256, (256, 300, 3), dtype=np.uint8)
    np.testing.assert_array_equal(augment.resize_and_center_crop(image), image[16:240, 38:262])
    grey = rng.integers(0, 256, (300, 256, 1), dtype=np.uint8)
    assert augment.resize_and_center_crop(grey).shape == (224, 224, 3)
