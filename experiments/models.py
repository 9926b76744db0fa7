"""Flax Linen models of the GAM experiments: CIFAR ResNets, WideResNet, PyramidNet, small CNNs.

Each model maps NHWC images to float32 logits (float64 for a float64 model) and keeps BatchNorm
running statistics in the ``batch_stats`` collection:
``model.apply(variables, x, train=True, mutable=['batch_stats'])``. BatchNorm uses PyTorch's
defaults (momentum 0.1 there, 0.9 here; epsilon 1e-5); convolutions use PyTorch's symmetric
padding, so stride-2 layers see the same pixels as the released code.
With ``axis_name`` (inside ``jax.pmap`` / ``jax.shard_map``) BatchNorm averages its batch
statistics over that device axis (synchronised BatchNorm).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from experiments import ConfigError

ModuleDef = Any
Dtype = Any

# He initialisation (normal, fan-out), as the released PyramidNet and WideResNet code.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(dtype: Dtype) -> ModuleDef:
    return functools.partial(nn.Conv, use_bias=False, kernel_init=conv_init, dtype=dtype)


def _norm(train: bool, dtype: Dtype, axis_name: str | None) -> ModuleDef:
    return functools.partial(
        nn.BatchNorm,
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        axis_name=axis_name,
    )


class Classifier(nn.Module):
    """The fields every model here shares: ``num_classes`` logits, the compute ``dtype`` and
    BatchNorm's device ``axis_name``; :meth:`layers` and :meth:`head` build with them."""

    num_classes: int
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    def layers(self, train: bool) -> tuple[ModuleDef, ModuleDef]:
        """The convolution and the BatchNorm of this model (batch statistics if ``train``)."""
        return _conv(self.dtype), _norm(train, self.dtype, self.axis_name)

    def head(self, x: jnp.ndarray) -> jnp.ndarray:
        """The linear classifier; logits in float32 (bfloat16 and float32 models) or float64
        (float64 models)."""
        x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
        return x.astype(jnp.promote_types(self.dtype, jnp.float32))


class Block(nn.Module):
    """The fields of a residual block: its width, the model's convolution and BatchNorm, and
    the stride of its first strided convolution."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1


class BasicBlock(Block):
    """ResNet basic block: two 3x3 convolutions; a 1x1 conv + BN projection shortcut."""

    @nn.compact
    def __call__(self, x):
        y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides, padding=1)(x)))
        y = self.norm()(self.conv(self.filters, (3, 3), padding=1)(y))
        if self.strides != 1 or x.shape[-1] != self.filters:
            x = self.norm()(self.conv(self.filters, (1, 1), self.strides, padding=0)(x))
        return nn.relu(x + y)


class Bottleneck(Block):
    """ResNet bottleneck block: 1x1, 3x3 (strided), 1x1 x4 convolutions; projection shortcut."""

    @nn.compact
    def __call__(self, x):
        out = 4 * self.filters
        y = nn.relu(self.norm()(self.conv(self.filters, (1, 1), padding=0)(x)))
        y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides, padding=1)(y)))
        y = self.norm()(self.conv(out, (1, 1), padding=0)(y))
        if self.strides != 1 or x.shape[-1] != out:
            x = self.norm()(self.conv(out, (1, 1), self.strides, padding=0)(x))
        return nn.relu(x + y)


class ResNet(Classifier):
    """The CIFAR ResNet of the released code: 3x3 stem, no max-pool, widths 64-128-256-512
    (ResNet-18 unless ``stage_sizes`` and ``block_cls`` say otherwise)."""

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block_cls: type[nn.Module] = BasicBlock
    num_filters: int = 64

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv, norm = self.layers(train)
        x = nn.relu(norm()(conv(self.num_filters, (3, 3), padding=1)(x.astype(self.dtype))))
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                strides = 2 if i > 0 and j == 0 else 1
                x = self.block_cls(self.num_filters * 2**i, conv, norm, strides)(x)
        x = jnp.mean(x, axis=(1, 2))
        return self.head(x)


class WideResNet(Classifier):
    """WideResNet-depth-width with pre-activation units, as in the SAM example code (davda54)."""

    depth: int = 28
    width: int = 10

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv, norm = self.layers(train)
        units = (self.depth - 4) // 6
        x = conv(16, (3, 3), padding=1)(x.astype(self.dtype))
        for i, filters in enumerate(16 * self.width * 2**i for i in range(3)):
            strides = 1 if i == 0 else 2
            # The first unit of a group projects the pre-activated input with a 1x1 conv.
            x = nn.relu(norm()(x))
            y = nn.relu(norm()(conv(filters, (3, 3), strides, padding=1)(x)))
            x = conv(filters, (3, 3), padding=1)(y) + conv(filters, (1, 1), strides, padding=0)(x)
            for _ in range(units - 1):
                y = nn.relu(norm()(x))
                y = nn.relu(norm()(conv(filters, (3, 3), padding=1)(y)))
                x = x + conv(filters, (3, 3), padding=1)(y)
        x = jnp.mean(nn.relu(norm()(x)), axis=(1, 2))
        return self.head(x)


class PyramidBottleneck(Block):
    """PyramidNet bottleneck: BN-1x1-BN-ReLU-3x3-BN-ReLU-1x1(x4)-BN; zero-padded shortcut."""

    @nn.compact
    def __call__(self, x):
        y = self.conv(self.filters, (1, 1), padding=0)(self.norm()(x))
        y = self.conv(self.filters, (3, 3), self.strides, padding=1)(nn.relu(self.norm()(y)))
        y = self.norm()(self.conv(4 * self.filters, (1, 1), padding=0)(nn.relu(self.norm()(y))))
        if self.strides != 1:
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        pad = y.shape[-1] - x.shape[-1]
        return y + jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, pad)))


class PyramidNet(Classifier):
    """PyramidNet for CIFAR (Han et al. 2017) with bottleneck blocks, as in the GAM release.

    The width grows by ``alpha / (3 n)`` per block, ``n = (depth - 2) / 9`` blocks per stage,
    rounded with Python's ``round`` as the released code does.
    """

    depth: int = 110
    alpha: float = 270

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv, norm = self.layers(train)
        n = (self.depth - 2) // 9
        add_rate = self.alpha / (3 * n)
        x = norm()(conv(16, (3, 3), padding=1)(x.astype(self.dtype)))
        width = 16.0
        for stage in range(3):
            for block in range(n):
                width += add_rate
                strides = 2 if stage > 0 and block == 0 else 1
                x = PyramidBottleneck(round(width), conv, norm, strides)(x)
        x = jnp.mean(nn.relu(norm()(x)), axis=(1, 2))
        return self.head(x)


class SmallCNN(Classifier):
    """A small BatchNorm CNN for quick runs (8x8 digits, or 32x32 CIFAR on a CPU)."""

    widths: Sequence[int] = (32, 64, 128)

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv, norm = self.layers(train)
        x = x.astype(self.dtype)
        for i, width in enumerate(self.widths):
            if i > 0:
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
            x = nn.relu(norm()(conv(width, (3, 3), padding=1)(x)))
        x = jnp.mean(x, axis=(1, 2))
        return self.head(x)


class CNN1D(Classifier):
    """The MNIST-1D paper's CNN (Greydanus & Kobak 2024, ``ConvBase``) with BatchNorm.

    Three convolutions of ``channels`` filters (kernel 5, 3, 3; stride 2; padding 1; ReLU),
    flattened, linear: a 40-sample signal (N, 40, 1) becomes 19, 10, then 5 positions.
    The paper's network has biases and no normalisation; here each convolution is followed
    by BatchNorm (the trainer keeps BatchNorm statistics for every model), 5.2k parameters.
    """

    channels: int = 25

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv, norm = self.layers(train)
        x = x.astype(self.dtype)
        for kernel in (5, 3, 3):
            x = nn.relu(norm()(conv(self.channels, (kernel,), 2, padding=1)(x)))
        x = x.reshape(x.shape[0], -1)
        return self.head(x)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "resnet18": functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock),
    "resnet34": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock),
    "resnet50": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck),
    "resnet101": functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=Bottleneck),
    "resnet152": functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=Bottleneck),
    "wrn28_10": functools.partial(WideResNet, depth=28, width=10),
    "pyramidnet110": functools.partial(PyramidNet, depth=110, alpha=270),
    "cnn1d": CNN1D,
}


def create_model(name: str, num_classes: int, dtype: Dtype = jnp.float32, **kwargs) -> nn.Module:
    """The model called ``name`` (a key of ``MODELS``); ``kwargs`` set its fields (widths...)."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}.")
    try:
        return MODELS[name](num_classes=num_classes, dtype=dtype, **kwargs)
    except TypeError as e:
        raise ConfigError(f"model {name!r} does not take the options {kwargs}: {e}") from None


if __name__ == "__main__":
    from experiments import not_a_program

    not_a_program(__spec__, "python -m experiments.train", "the trainer's models")
