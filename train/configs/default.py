"""Default config: the small MNIST CNN with noisy softmax, ~5 minutes on 2 CPU cores.

Every other config starts from this one and changes a few fields, so the keys here are the
complete set that `train.config_checks.validate_config` accepts.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Data.
    config.dataset = "mnist"  # a key of train.prepare_data.DATASETS
    config.data_dir = "~/tensorflow_datasets"
    config.prepare_data = True  # prepare the data offline on first use where possible
    config.augment = False  # CIFAR-10+: pad 4, random 32x32 crop, horizontal flip (on device)
    # 0: the whole training split. N > 0: a fixed class-balanced subset of N examples, the same
    # for every run and seed (input_pipeline.balanced_subset; N divisible by the class count).
    config.train_subset = 0
    # 0: every class of the dataset. K > 0: only the examples (train and test) of the classes
    # 0..K-1; for cjk_glyphs, whose training classes are numbered in a fixed random order, a
    # random fixed choice of K classes.
    config.num_classes = 0
    # A split (after num_classes and train_subset) whose decoded images take at most this many
    # MiB is decoded into host memory once; a larger one is read batch by batch from disk,
    # prefetched in the background (input_pipeline.in_memory). 0: always read from disk. The
    # batches are the same either way.
    config.in_memory_max_mib = 256

    # Model.
    config.model = "small_cnn"  # small_cnn | vgg_mnist | vgg_cifar | resnet_glyph | resnet_face
    # Width of the embedding (the head's input) of resnet_glyph / resnet_face; 0: the model's
    # default (256 / 512). The other models have none to set.
    config.embedding_dim = 0
    # dense: NoisySoftmaxHead (logits, then the loss). fused: FusedNoisySoftmaxHead, the same
    # parameters, with the loss and accuracy computed from features and kernel block by block,
    # never the [batch, classes] logits (for very many classes; loss softmax or noisy only).
    config.head = "dense"  # dense | fused
    config.fused_chunk_size = 0  # classes per block of the fused head; 0: the loss's default

    # Loss.
    config.loss = "noisy"  # softmax | noisy | label_smoothing
    config.noise = "annealed"  # free | amplitude | annealed (the paper's method)
    config.alpha = 0.1
    config.alpha_schedule = "constant"  # constant | linear | cosine (decay of alpha to 0)
    config.sigma = 1.0
    config.shared_noise = False  # one |xi| per mini-batch, as in the authors' Caffe code
    config.negative = False  # raise the target logit instead (the paper's negative ablation)
    config.label_smoothing = 0.1  # used by loss=label_smoothing only
    # The amplitude ||W_y|| ||x|| as a constant: no gradient through the head's norms (the
    # logits still get theirs). Used by loss=noisy only.
    config.stop_norm_gradient = False

    # Optimization: SGD with momentum and weight decay.
    config.batch_size = 128  # global, over all devices and processes
    config.num_epochs = 3
    config.num_steps = -1  # > 0 overrides num_epochs
    config.learning_rate = 0.05
    config.lr_schedule = "cosine"  # cosine | step | constant
    config.lr_decay_at = (0.5, 0.75)  # fractions of training, for lr_schedule=step
    config.lr_decay_factor = 0.1
    config.warmup_steps = 0
    config.momentum = 0.9
    config.weight_decay = 5e-4

    # Run.
    config.seed = 0
    config.eval_batch_size = 1000
    config.log_every_steps = 50
    config.eval_every_steps = -1  # -1: at the end of every epoch
    # > 0: every that many steps, the saturation of the whole training set (or subset) with clean
    # logits, logged as train_full_* (train/saturation.py); -1: off.
    config.train_saturation_every_steps = -1
    config.checkpoint_every_steps = 500
    config.max_checkpoints_to_keep = 2
    config.progress_bar = True
    # Health checks (train/health.py): stop on a NaN/inf loss, and on a collapsed run
    # (chance accuracy with the amplitude gone to ~0 or one predicted class). Turn off to study
    # the failure itself, e.g. in alpha-range sweeps.
    config.stop_on_non_finite = True
    config.stop_on_collapse = True
    return config
