"""The paper's CIFAR-10+ setting: CIFAR-10 with pad-4 / random-crop-32 / flip augmentation.

The augmentation runs on the device inside the jitted step, keyed from the step's RNG.
"""

from train.configs import cifar10


def get_config(arg: str | None = None):
    config = cifar10.get_config(arg)
    config.augment = True
    return config
