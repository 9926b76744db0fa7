"""Digits with a fifth of its training split: 180 of the 898 training examples.

The first 180 (the split is a seeded, stratified shuffle, so about 18 per class), batch 32
so that an epoch is still 5 steps::

    python -m experiments.train --config=experiments/configs/digits_lowdata.py --workdir=DIR
"""

import ml_collections

from experiments.configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.num_train_examples = 180
    config.batch_size = 32
    return config


if __name__ == "__main__":
    from experiments import not_a_program

    config = "--config=experiments/configs/digits_lowdata.py"
    not_a_program(__spec__, f"python -m experiments.train {config} --workdir=DIR", "a config")
