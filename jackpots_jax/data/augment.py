"""Pre-processing and augmentation as pure numpy functions (the recipes of the paper's code).

Small fixed-size images (Fashion-MNIST, MNIST, CIFAR) are augmented a whole batch at a time with
one vectorised gather (`crop_and_flip`), which costs a few milliseconds per batch on one core; the
ImageNet recipes work on one decoded image of any size at a time (`random_resized_crop`,
`resize_and_center_crop`), as torchvision's do. Every random choice comes from an explicit
`np.random.Generator`, so a function called twice with equal generators gives equal outputs.

Recipes:
  CIFAR-10/100: random crop 32 from the image zero-padded by 4, horizontal flip with probability
    1/2, normalised with `CIFAR_MEAN` / `CIFAR_STD` (the values of the paper's code).
  ImageNet (imagenet2012, imagenette): training, random resized crop to 224 (area 8%-100%, aspect
    ratio 3/4-4/3) and flip; evaluation, shorter side resized to 256 then the central 224x224;
    normalised with `IMAGENET_MEAN` / `IMAGENET_STD`.
  Fashion-MNIST: random crop 28 from the image zero-padded by 2 and horizontal flip (garments are
    left-right symmetric, so a flipped image is still a plausible one of the same class); a single
    vectorised gather per batch, so it stays far cheaper than the model step on a 2-core CPU.
    Normalised with the training-set statistics `FASHION_MNIST_MEAN` / `FASHION_MNIST_STD`.
  MNIST: random crop 28 from the image zero-padded by 2, no flip (digits are not symmetric).

As in torchvision's `RandomCrop(padding=...)`, padding is black (0) before normalisation.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Mean and standard deviation of the 60k Fashion-MNIST training images scaled to [0, 1].
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)


def _check_batch(images: np.ndarray, what: str = "images") -> None:
    if not isinstance(images, np.ndarray) or images.ndim != 4:
        shape = getattr(images, "shape", None)
        raise ValueError(f"`{what}` must be a numpy array [batch, H, W, C], got shape {shape}")


def crop_and_flip(
    images: np.ndarray,
    offsets: np.ndarray,
    flips: np.ndarray,
    padding: int,
) -> np.ndarray:
    """Crops every image of a batch from its zero-padded copy and mirrors the chosen ones.

    Image `b` of the output is `pad(images[b])[y:y + H, x:x + W]` with `(y, x) = offsets[b]` and
    `pad` adding `padding` zero rows and columns on every side, mirrored left-right where
    `flips[b]`. An offset of `(padding, padding)` without flip returns the image unchanged.

    Args:
      images: `[batch, H, W, C]`, any dtype.
      offsets: integer `[batch, 2]`, each in `[0, 2 * padding]`.
      flips: bool `[batch]`.
      padding: the number of zero pixels added on each side (non-negative).

    Returns:
      An array of the shape and dtype of `images`.

    Raises:
      ValueError: shapes that do not match, or offsets out of range.
    """
    _check_batch(images)
    b, h, w, _ = images.shape
    offsets = np.asarray(offsets)
    flips = np.asarray(flips, dtype=bool)
    if padding < 0:
        raise ValueError(f"`padding` must be non-negative, got {padding}")
    if offsets.shape != (b, 2) or flips.shape != (b,):
        raise ValueError(
            f"`offsets` must be [batch, 2] and `flips` [batch] for batch {b}, got "
            f"{offsets.shape} and {flips.shape}"
        )
    if offsets.size and (offsets.min() < 0 or offsets.max() > 2 * padding):
        raise ValueError(f"`offsets` must lie in [0, {2 * padding}] (2 * padding), got {offsets}")
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    rows = offsets[:, :1] + np.arange(h)
    cols = np.where(flips[:, None], np.arange(w - 1, -1, -1), np.arange(w)) + offsets[:, 1:]
    # One gather does crop and flip together: no per-example Python loop.
    return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def random_crop_and_flip(
    images: np.ndarray, rng: np.random.Generator, padding: int, flip: bool = True
) -> np.ndarray:
    """Random crop of the zero-padded images (same size as the input) and random horizontal flip.

    Args:
      images: `[batch, H, W, C]`.
      rng: the source of randomness.
      padding: zero pixels added on each side before cropping (4 for CIFAR, 2 for (Fashion-)MNIST).
      flip: whether to mirror each image with probability 1/2.

    Returns:
      An array of the shape and dtype of `images` (see `crop_and_flip`).

    Example:
      >>> out = random_crop_and_flip(batch, np.random.default_rng(0), padding=4)
    """
    _check_batch(images)
    offsets, flips = crop_and_flip_draws(rng, images.shape[0], padding, flip)
    return crop_and_flip(images, offsets, flips, padding)


def crop_and_flip_draws(
    rng: np.random.Generator, count: int, padding: int, flip: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The random draws of `random_crop_and_flip` for `count` images: `(offsets, flips)`.

    `offsets` is `[count, 2]` (top and left of the crop in the padded image), `flips` `[count]`
    bool. Drawn for a whole global batch and sliced, they give every host of a multi-host run
    the augmentation one host would apply to the same rows.
    """
    offsets = rng.integers(0, 2 * padding + 1, size=(count, 2))
    flips = rng.random(count) < 0.5 if flip else np.zeros(count, dtype=bool)
    return offsets, flips


def normalize(
    images: np.ndarray,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    dtype: np.dtype | type = np.float32,
) -> np.ndarray:
    """Scales uint8 images to [0, 1] and standardises every channel: `(x / 255 - mean) / std`.

    Args:
      images: uint8 `[..., C]`.
      mean: one value per channel (of the [0, 1] scale).
      std: one positive value per channel.
      dtype: the output dtype (float32 or bfloat16); the arithmetic is done in float32.

    Returns:
      The standardised images in `dtype`.

    Raises:
      ValueError: `mean`/`std` lengths that do not match the channels.
    """
    channels = images.shape[-1]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"`mean` and `std` need one value per channel ({channels}), got {mean} and {std}"
        )
    std32 = np.asarray(std, np.float32)
    scale = 1.0 / (255.0 * std32)
    offset = -np.asarray(mean, np.float32) / std32
    out = images.astype(np.float32) * scale + offset
    return out.astype(dtype, copy=False)


def random_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """The crop of torchvision's `RandomResizedCrop`: random area share and log-uniform aspect.

    Up to `attempts` candidate boxes are drawn; the first that fits is taken. When none fits, the
    whole image cropped to the nearest allowed aspect ratio around its centre is used.

    Args:
      height, width: the image size.
      rng: the source of randomness.
      scale: the range of the crop area as a share of the image area.
      ratio: the range of the crop's width / height.
      attempts: the number of random boxes tried before the central fallback.

    Returns:
      `(top, left, crop_height, crop_width)`, always inside the image.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _as_rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"`image` must be uint8 [H, W, 1 or 3], got shape {image.shape}")
    # tfds stores ImageNet as RGB JPEGs, but a grey-scale image may still come as one channel.
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def random_resized_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    size: int = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    flip: bool = True,
) -> np.ndarray:
    """ImageNet training augmentation: random resized crop (bilinear) and horizontal flip.

    Args:
      image: uint8 `[H, W, C]` (C = 3, or 1 which is repeated to 3).
      rng: the source of randomness.
      size: the output height and width.
      scale, ratio: as in `random_resized_crop_box`.
      flip: whether to mirror the result with probability 1/2.

    Returns:
      uint8 `[size, size, 3]`.
    """
    image = _as_rgb(image)
    top, left, h, w = random_resized_crop_box(image.shape[0], image.shape[1], rng, scale, ratio)
    resized = Image.fromarray(image).resize(
        (size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h)
    )
    out = np.asarray(resized)
    if flip and rng.random() < 0.5:
        out = out[:, ::-1]
    return out


def resize_and_center_crop(image: np.ndarray, resize: int = 256, crop: int = 224) -> np.ndarray:
    """ImageNet evaluation pre-processing: shorter side to `resize` (bilinear), central `crop`.

    Args:
      image: uint8 `[H, W, C]` (C = 3, or 1 which is repeated to 3).
      resize: the length of the shorter side after resizing (torchvision's `Resize(256)`).
      crop: the output height and width (`CenterCrop(224)`); at most `resize`.

    Returns:
      uint8 `[crop, crop, 3]`.
    """
    if crop > resize:
        raise ValueError(f"`crop` ({crop}) must not exceed `resize` ({resize})")
    image = _as_rgb(image)
    h, w = image.shape[:2]
    if h <= w:
        new_h, new_w = resize, int(resize * w / h)
    else:
        new_h, new_w = int(resize * h / w), resize
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
    top = int(round((new_h - crop) / 2.0))
    left = int(round((new_w - crop) / 2.0))
    return resized[top : top + crop, left : left + crop]
