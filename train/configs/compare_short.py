"""Short-budget config for the multi-seed comparisons of `python -m train.compare` on a CPU.

The small CNN of `default.py`, trained for a fixed 200 steps of 64 images (12.8k images, about a
fifth of an epoch) so that one run costs about a minute on a shared 2-core CPU. The runner sets
`dataset`, `seed` and the loss fields per run. Test error at this budget measures early training,
not converged accuracy: compare the losses with each other, not with the paper's numbers.
"""

from train.configs import default


def get_config():
    config = default.get_config()
    config.model = "small_cnn"
    config.batch_size = 64
    config.num_steps = 200
    config.learning_rate = 0.05
    config.lr_schedule = "cosine"
    config.weight_decay = 5e-4
    config.log_every_steps = 10
    config.eval_every_steps = -1  # once per epoch: with 200 steps, only at the end
    config.checkpoint_every_steps = 100
    config.max_checkpoints_to_keep = 1
    config.progress_bar = False
    return config
