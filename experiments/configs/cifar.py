"""The published CIFAR recipes (the GAM release's main_cifar.py), chosen by argument.

``DATASET,MODEL``, one of :data:`RECIPES` (default ``cifar10,resnet18``): the data set, the
model and the released GAM preset (and SAM's for CIFAR-100) on the release's training
recipe, as a diff of ``default``::

    python -m experiments.train --config=experiments/configs/cifar.py:cifar100,resnet18 \
        --workdir=DIR
    python -m experiments.train --config=experiments/configs/cifar.py:cifar10,pyramidnet110 \
        --workdir=DIR

PyramidNet-110 is the bottleneck one with alpha 270.
"""

import ml_collections

import gam_optax
from experiments.configs import default

# (data set, model) -> the released GAM preset.
RECIPES = {
    ("cifar10", "resnet18"): "cifar10_resnet",
    ("cifar10", "pyramidnet110"): "cifar10_pyramidnet",
    ("cifar100", "resnet18"): "cifar100_resnet",
    ("cifar100", "pyramidnet110"): "cifar100_pyramidnet",
}


def get_config(arg: str = "cifar10,resnet18") -> ml_collections.ConfigDict:
    dataset, _, model = arg.partition(",")
    if (dataset, model) not in RECIPES:
        valid = " ".join(f"{d},{m}" for d, m in RECIPES)
        raise ValueError(f"configs/cifar.py: unknown recipe {arg!r}; valid: {valid}.")
    config = default.get_config()
    config.dataset = dataset
    config.augment = ml_collections.ConfigDict(dict(crop_padding=4, flip=True, cutout_size=0))
    config.model = model
    config.num_epochs = 200
    config.batch_size = 128
    config.eval_batch_size = 1000
    config.learning_rate = 0.1
    config.gam.update(gam_optax.gam_preset(RECIPES[dataset, model]))
    config.sam.update(gam_optax.sam_preset(f"sam_{dataset}"))
    config.log_every_steps = 50
    return config


if __name__ == "__main__":
    from experiments import not_a_program

    config = "--config=experiments/configs/cifar.py"
    not_a_program(__spec__, f"python -m experiments.train {config} --workdir=DIR", "a config")
