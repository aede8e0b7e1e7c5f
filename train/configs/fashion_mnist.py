"""Fashion-MNIST with the small CPU net: a harder 28x28 task prepared offline from Debian's
`dataset-fashion-mnist` (apt-get install dataset-fashion-mnist)."""

from train.configs import default


def get_config():
    config = default.get_config()
    config.dataset = "fashion_mnist"
    config.num_epochs = 10
    return config
