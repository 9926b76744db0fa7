"""The models: parameter counts of the released architectures, BatchNorm, errors."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gam_optax
from experiments import ConfigError, models

CIFAR = (2, 32, 32, 3)

# Parameter counts with 10 classes (BatchNorm scales and biases included, running statistics
# not): the kuangliu/GAM-release CIFAR ResNets, davda54's WRN-28-10, and the GAM release's
# PyramidNet-110 (bottleneck, alpha 270).
PARAMETERS = {
    "resnet18": 11_173_962,
    "resnet34": 21_282_122,
    "resnet50": 23_520_842,
    "resnet101": 42_512_970,
    "resnet152": 58_156_618,
    "wrn28_10": 36_479_194,
    "pyramidnet110": 18_323_787,
}


def abstract_variables(model, shape=CIFAR):
    """Shapes of the variables, traced with jax.eval_shape (nothing is compiled)."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def count(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", list(PARAMETERS))
def test_parameter_count_matches_the_released_model(name):
    variables = abstract_variables(models.create_model(name, num_classes=10))
    assert count(variables["params"]) == PARAMETERS[name]


def test_the_head_follows_num_classes_and_logits_are_float32():
    model = models.create_model("resnet18", num_classes=100, dtype=jnp.bfloat16)
    variables = abstract_variables(model)
    # Only the classifier grows: 512 x 90 weights and 90 biases more than with 10 classes.
    assert count(variables["params"]) == PARAMETERS["resnet18"] + 512 * 90 + 90
    assert {x.dtype for x in jax.tree.leaves(variables["params"])} == {jnp.dtype("float32")}
    logits = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False), variables, jnp.zeros(CIFAR)
    )
    assert logits.shape == (2, 100) and logits.dtype == jnp.float32


def test_pyramidnet110_has_109_convolutions_and_parameter_free_shortcuts():
    variables = abstract_variables(models.create_model("pyramidnet110", num_classes=10))
    paths = flax.traverse_util.flatten_dict(variables["params"])
    kernels = [shape.shape for path, shape in paths.items() if path[-1] == "kernel"]
    convolutions = [k for k in kernels if len(k) == 4]
    # 110 layers = 1 stem + 3 stages x 12 bottlenecks x 3 convs + the classifier: no 1x1
    # projection anywhere (shortcuts are average pooling and zero padding).
    assert len(convolutions) == 1 + 3 * 12 * 3 and len(kernels) == 110
    # Widths grow by 270 / 36 = 7.5 per block, rounded as Python rounds (23.5 -> 24).
    first = paths[("PyramidBottleneck_0", "Conv_0", "kernel")].shape
    last = paths[("Dense_0", "kernel")].shape
    assert first == (1, 1, 16, 24) and last == (4 * 286, 10)


def test_resnet_downsamples_like_pytorch():
    model = models.create_model("resnet18", num_classes=10, num_filters=4)
    variables = abstract_variables(model)
    _, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
        variables,
        jnp.zeros(CIFAR),
    )
    # A 1x1 conv + BN projection where the width or the resolution changes, and only there.
    assert "BatchNorm_2" in state["batch_stats"]["BasicBlock_2"]
    assert "BatchNorm_2" not in state["batch_stats"]["BasicBlock_1"]
    kernel = variables["params"]["BasicBlock_2"]["Conv_2"]["kernel"]
    assert kernel.shape == (1, 1, 4, 8)


def test_small_cnn_batchnorm_uses_batch_statistics_in_training_only():
    model = models.create_model("small_cnn", num_classes=10)
    x = np.random.default_rng(0).normal(2.0, 3.0, (16, 8, 8, 1)).astype(np.float32)
    with jax.threefry_partitionable(False):  # compiles faster, as in train.create_train_state
        variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
    train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    infer = jax.jit(lambda v, x: model.apply(v, x, train=False))
    logits, updated = train(variables, x)
    assert logits.shape == (16, 10) and logits.dtype == jnp.float32
    # PyTorch's momentum 0.1: the running mean moves 10% of the way to the batch mean.
    mean = updated["batch_stats"]["BatchNorm_0"]["mean"]
    conv = variables["params"]["Conv_0"]["kernel"]
    batch_mean = jax.lax.conv_general_dilated(
        x, conv, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    ).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(mean, 0.1 * batch_mean, rtol=1e-4, atol=1e-6)
    # Inference mode reads the running statistics and changes nothing.
    a, b = infer(variables, x), infer({**variables, **updated}, x)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, infer(variables, x[::-1])[::-1])  # per-example


def test_unknown_model_or_option_is_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown model 'resnet19'.*resnet18.*pyramidnet110"):
        models.create_model("resnet19", num_classes=10)
    with pytest.raises(ConfigError, match=r"model 'small_cnn' does not take.*depth"):
        models.create_model("small_cnn", num_classes=10, depth=3)


def test_the_cifar_recipes_are_chosen_by_argument():
    """``configs/cifar.py:DATASET,MODEL``: the data set, a model of MODELS and its preset."""
    from experiments.configs import cifar, cifar10_resnet18

    for (dataset, model), preset in cifar.RECIPES.items():
        config = cifar.get_config(f"{dataset},{model}")
        assert (config.dataset, config.model, config.num_epochs) == (dataset, model, 200)
        released = gam_optax.gam_preset(preset)
        assert {key: config.gam[key] for key in released} == released
        assert config.sam.to_dict() == {
            **config.sam.to_dict(),
            **gam_optax.sam_preset(f"sam_{dataset}"),
        }
        assert model in models.MODELS
    assert cifar.get_config().to_dict() == cifar.get_config("cifar10,resnet18").to_dict()
    assert cifar10_resnet18.get_config().to_dict() == cifar.get_config().to_dict()  # old path
    with pytest.raises(ValueError, match=r"unknown recipe 'cifar10,wrn28_10'; valid: cifar10,"):
        cifar.get_config("cifar10,wrn28_10")
