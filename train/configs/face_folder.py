"""Face recognition on a face set of your own, verified on LFW: the paper's application.

Trains on `face_folder`, a set of identity folders (CASIA-WebFace, MS1MV2, ... extracted into
`<data_dir>/downloads/manual/face_folder/<identity>/`; prepared on first use, or beforehand with
`python -m train.prepare_data --dataset face_folder --data_dir D`), 112x112 RGB, with the fused
noisy-softmax head over all its identities, and evaluates the closed-set accuracy on the held-out
image of each identity. Its verification set is LFW with the official pairs
(`train.verification_pairs.verification_data("face_folder", D)`: prepare it with
`python -m train.prepare_data --dataset lfw --data_dir D` from lfw.tgz and pairs.txt in
`D/downloads/manual/lfw/`). Without the data the run stops with one line saying what to obtain
and where to put it. Sized for an accelerator; append `:runlocal` to the config path for a
few-step shrink of the same pipeline on a laptop.
"""

from train.configs import default


def get_config(arg: str | None = None):
    config = default.get_config()
    config.dataset = "face_folder"
    config.model = "vgg_cifar"  # BN conv stages and a 256-d feature: any input size
    config.head = "fused"  # ~10^4-10^5 identities: never the [batch, classes] logits
    config.loss = "noisy"
    config.noise = "annealed"
    config.alpha = 0.1
    config.batch_size = 256
    config.num_epochs = 20
    config.learning_rate = 0.1
    config.lr_schedule = "step"
    config.lr_decay_at = (0.5, 0.75)
    config.weight_decay = 5e-4
    config.eval_batch_size = 512
    config.log_every_steps = 100
    config.eval_every_steps = 2000
    config.checkpoint_every_steps = 2000
    if arg == "runlocal":
        config.num_steps = 10
        config.batch_size = 16
        config.eval_batch_size = 16
        config.log_every_steps = 5
        config.eval_every_steps = 10
    return config
