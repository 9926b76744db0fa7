"""GAM on CIFAR-100 with PyramidNet-110 (bottleneck, alpha 270), the released preset.

python -m experiments.train --config=experiments/configs/cifar100_pyramidnet.py --workdir=DIR
"""

import ml_collections

import gam_optax
from experiments.configs import cifar


def get_config() -> ml_collections.ConfigDict:
    config = cifar.get_config()
    config.dataset = "cifar100"
    config.model = "pyramidnet110"
    config.gam.update(gam_optax.gam_preset("cifar100_pyramidnet"))
    config.sam.update(gam_optax.sam_preset("sam_cifar100"))
    return config
