"""The published CIFAR recipe (the GAM release's main_cifar.py), as a diff of ``default``.

ResNet-18 on CIFAR-10 with GAM; the recipe files change the data set, model and preset.
"""

import ml_collections

import gam_optax
from experiments.configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.dataset = "cifar10"
    config.augment = ml_collections.ConfigDict(dict(crop_padding=4, flip=True, cutout_size=0))
    config.model = "resnet18"
    config.num_epochs = 200
    config.batch_size = 128
    config.eval_batch_size = 1000
    config.learning_rate = 0.1
    config.gam.update(gam_optax.gam_preset("cifar10_resnet"))
    config.sam.update(gam_optax.sam_preset("sam_cifar10"))
    config.log_every_steps = 50
    return config
