"""Building blocks shared by the models: PyTorch-numerics batch norm and symmetric-padding convs.

Every model builds its layers from these helpers so that an imported PyTorch checkpoint gives the
same outputs: batch norm with PyTorch's epsilon and running-average momentum, and convolutions with
explicit symmetric padding (Flax's `"SAME"` pads a stride-2 conv on an even input asymmetrically,
PyTorch pads both sides).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# PyTorch initialises convs behind a ReLU with Kaiming-normal on fan-out (torchvision ResNets).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def compute_dtype(dtype: Any) -> Any:
    """The compute dtype of a model: `jnp.float32` or `jnp.bfloat16` (names accepted too).

    Raises:
      ValueError: any other dtype.
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown model dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in DTYPES.values()]:
        raise ValueError(f"unknown model dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    return jnp.dtype(dtype).type


def batch_norm(train: bool, name: str, dtype: Any = jnp.float32) -> nn.BatchNorm:
    """Batch norm with PyTorch's numerics (`BatchNorm2d` defaults: momentum 0.1, eps 1e-5).

    Args:
      train: use the batch statistics and update the running ones (`mutable=["batch_stats"]`);
        otherwise normalise with the running statistics.
      name: the module name (the converter maps it to the PyTorch key).
      dtype: the dtype of its output. Statistics are computed and kept in float32 whatever it is
        (Flax reduces in float32), and scale / bias stay float32 parameters.

    Returns:
      An `nn.BatchNorm` over the last (channel) axis.
    """
    # Flax's momentum weighs the old running value: PyTorch's 0.1 is Flax's 0.9.
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def conv(
    features: int, kernel: int, stride: int = 1, *, name: str, dtype: Any = jnp.float32
) -> nn.Conv:
    """A bias-free square convolution padded like PyTorch's `Conv2d(padding=kernel // 2)`.

    Args:
      features: number of output channels.
      kernel: kernel height and width (odd).
      stride: stride in both spatial dimensions.
      name: the module name (the converter maps it to the PyTorch key).
      dtype: the compute dtype: inputs and the (float32) kernel are cast to it.

    Returns:
      An `nn.Conv` whose `kernel` leaf is HWIO; no bias, since a batch norm follows every conv.
    """
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=conv_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def head(num_classes: int, dtype: Any = jnp.float32) -> nn.Dense:
    """The classifier, always named `head` so that the default `dense=("head",)` keeps it dense.

    Args:
      num_classes: number of output logits.
      dtype: the compute dtype of the matmul (the logits are cast to float32 by `logits`).

    Returns:
      An `nn.Dense` with bias whose params path is `('head', 'kernel')` / `('head', 'bias')`.
    """
    return nn.Dense(num_classes, dtype=dtype, param_dtype=jnp.float32, name="head")


def inputs(x: jnp.ndarray) -> jnp.ndarray:
    """Checks that `x` is an NHWC batch and returns it as float32.

    Args:
      x: images `[batch, height, width, channels]`.

    Returns:
      `x` as float32.

    Raises:
      ValueError: `x` is not 4-D.
    """
    if x.ndim != 4:
        raise ValueError(
            f"x must be an NHWC batch [batch, height, width, channels], got shape {x.shape}"
        )
    return jnp.asarray(x, jnp.float32)


def logits(x: jnp.ndarray) -> jnp.ndarray:
    """The models' outputs are float32 whatever the compute dtype was."""
    return jnp.asarray(x, jnp.float32)
