"""The paper's CIFAR-10 setting (no augmentation): the VGG-like CIFAR net. Sized for a GPU/TPU.

Schedule in the style of the same authors' Caffe-era CIFAR training: batch 256, learning rate
0.1 divided by 10 after 2/3 and 5/6 of 18k iterations (the paper's exact schedule could not be
confirmed). Append `:runlocal` to the config path for a few-step shrink that runs on a laptop.
"""

from train.configs import default


def get_config(arg: str | None = None):
    config = default.get_config()
    config.dataset = "cifar10"
    config.model = "vgg_cifar"
    config.augment = False
    config.batch_size = 256
    config.num_steps = 18_000
    config.learning_rate = 0.1
    config.lr_schedule = "step"
    config.lr_decay_at = (2 / 3, 5 / 6)
    config.weight_decay = 5e-4
    config.eval_batch_size = 1000
    config.log_every_steps = 100
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 1000
    if arg == "runlocal":
        config.num_steps = 10
        config.batch_size = 32
        config.eval_every_steps = 10
    return config
