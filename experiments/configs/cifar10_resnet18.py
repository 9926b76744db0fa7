"""GAM on CIFAR-10 with ResNet-18: ``configs/cifar.py:cifar10,resnet18`` under its old name."""

from experiments.configs import cifar


def get_config():
    return cifar.get_config("cifar10,resnet18")


if __name__ == "__main__":
    from experiments import not_a_program

    config = "--config=experiments/configs/cifar10_resnet18.py"
    not_a_program(__spec__, f"python -m experiments.train {config} --workdir=DIR", "a config")
