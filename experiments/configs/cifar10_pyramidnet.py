"""GAM on CIFAR-10 with PyramidNet-110 (bottleneck, alpha 270), the released preset.

python -m experiments.train --config=experiments/configs/cifar10_pyramidnet.py --workdir=DIR
"""

import ml_collections

import gam_optax
from experiments.configs import cifar


def get_config() -> ml_collections.ConfigDict:
    config = cifar.get_config()
    config.dataset = "cifar10"
    config.model = "pyramidnet110"
    config.gam.update(gam_optax.gam_preset("cifar10_pyramidnet"))
    return config
