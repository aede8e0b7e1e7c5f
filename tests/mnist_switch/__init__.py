"""Flax's two MNIST examples, written anew as fixtures, before and after switching to noisy softmax.

`linen_softmax.py` follows the structure of Flax's Linen example (examples/mnist/train.py:
a compact CNN, `apply_model`, `update_model`, `train_epoch`, `create_train_state`,
`train_and_evaluate`) and `nnx_softmax.py` that of its NNX example (the same file after its
move to NNX: `rngs` passed through the model's call to `nnx.Dropout`, `model.train()` /
`model.eval()`). The `*_noisy.py` files are the same code with the switch applied; the
diff between each pair is the honest count of changed lines (tests/test_mnist_switch.py).
Data loading is left out: the functions take in-memory arrays or batches.
"""
