"""GAM on CIFAR-100 with ResNet-18, the released preset.

python -m experiments.train --config=experiments/configs/cifar100_resnet18.py --workdir=DIR
"""

import ml_collections

import gam_optax
from experiments.configs import cifar


def get_config() -> ml_collections.ConfigDict:
    config = cifar.get_config()
    config.dataset = "cifar100"
    config.model = "resnet18"
    config.gam.update(gam_optax.gam_preset("cifar100_resnet"))
    config.sam.update(gam_optax.sam_preset("sam_cifar100"))
    return config
