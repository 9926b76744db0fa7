"""GAM on CIFAR-10 with ResNet-18, the released preset.

python -m experiments.train --config=experiments/configs/cifar10_resnet18.py --workdir=DIR
"""

import ml_collections

import gam_optax
from experiments.configs import cifar


def get_config() -> ml_collections.ConfigDict:
    config = cifar.get_config()
    config.dataset = "cifar10"
    config.model = "resnet18"
    config.gam.update(gam_optax.gam_preset("cifar10_resnet"))
    return config
