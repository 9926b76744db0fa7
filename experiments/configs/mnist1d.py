"""MNIST-1D (Greydanus & Kobak, ICML 2024) with the MNIST-1D paper's CNN, optionally with
symmetric label noise on the training split (test labels clean).

4,000 generated training signals of length 40 and a 10,000-signal test set generated apart
from them (``input_pipeline.make_mnist1d``, offline); the paper's 3-convolution CNN with
BatchNorm (``models.CNN1D``, 5.3k parameters); the default recipe (SGD 0.1 + momentum 0.9,
weight decay 5e-4, cosine, label smoothing 0.1), batch 100 as the paper, no augmentation.
The argument is the label-noise fraction (default 0, clean)::

    python -m experiments.train --config=experiments/configs/mnist1d.py --workdir=DIR
    python -m experiments.train --config=experiments/configs/mnist1d.py:0.4 --workdir=DIR
"""

import ml_collections

from experiments.configs import default


def get_config(label_noise: str = "0.0") -> ml_collections.ConfigDict:
    config = default.get_config()
    config.dataset = "mnist1d"
    config.model = "cnn1d"
    config.augment = ml_collections.ConfigDict(dict(crop_padding=0, flip=False, cutout_size=0))
    config.label_noise = float(label_noise)
    config.batch_size = 100
    config.eval_batch_size = 2000
    config.num_epochs = 40
    config.log_every_steps = 40
    return config


if __name__ == "__main__":
    from experiments import not_a_program

    config = "--config=experiments/configs/mnist1d.py"
    not_a_program(__spec__, f"python -m experiments.train {config} --workdir=DIR", "a config")
