"""The paper's CIFAR-100 setting: the VGG-like CIFAR net on 100 classes (no augmentation)."""

from train.configs import cifar10


def get_config(arg: str | None = None):
    config = cifar10.get_config(arg)
    config.dataset = "cifar100"
    return config
