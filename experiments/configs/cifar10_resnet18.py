"""GAM on CIFAR-10 with ResNet-18: ``configs/cifar.py:cifar10,resnet18`` under its old name."""

from experiments.configs import cifar


def get_config():
    return cifar.get_config("cifar10,resnet18")
