"""The paper's MNIST setting: the VGG-like MNIST net, SGD with step decay. Sized for a GPU/TPU.

The per-dataset network tables of the paper could not be confirmed; this net follows the same
authors' lineage (3x3 conv stages of 64 channels with max-pooling, a 256-d feature layer) and a
Caffe-era schedule (learning rate divided by 10 twice). Append `:runlocal` to the config path for
a few-step shrink that runs on a laptop.
"""

from train.configs import default


def get_config(arg: str | None = None):
    config = default.get_config()
    config.dataset = "mnist"
    config.model = "vgg_mnist"
    config.batch_size = 256
    config.num_epochs = 40
    config.learning_rate = 0.1
    config.lr_schedule = "step"
    config.lr_decay_at = (0.5, 0.75)
    config.weight_decay = 5e-4
    config.log_every_steps = 100
    config.checkpoint_every_steps = 1000
    if arg == "runlocal":
        config.num_steps = 20
        config.batch_size = 32
        config.eval_every_steps = 20
    return config
