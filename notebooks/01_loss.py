# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Noisy Softmax: the loss, its noise, and how it keeps the target gradient alive
#
# Chen, Deng & Du, *Noisy Softmax* (CVPR 2017). For a feature $x$ with label $y$ and a bias-free
# classifier $f_j = W_j^\top x = \|W_j\|\,\|x\|\cos\theta_j$, the noisy softmax lowers the target
# logit, and only the target logit, before the softmax:
#
# $$\tilde f_y = f_y - \alpha\,|\xi|\,\big(\|W_y\|\|x\| - f_y\big), \qquad \xi \sim \mathcal N(0, \sigma^2),$$
# $$\ell = \log\Big(e^{\tilde f_y} + \sum_{j\ne y} e^{f_j}\Big) - \tilde f_y .$$
#
# The factor $\|W_y\|\|x\|(1-\cos\theta_y)$ anneals the noise: it fades as the feature aligns with its
# class weight. At evaluation there is no noise. This notebook uses only the library
# (`noisy_softmax_jax`) and runs in seconds on a CPU.
#
# It runs standalone (e.g. on Colab): the first cell installs the library when it is not
# importable, from the repository when the notebook sits in a clone of it (`notebooks/`),
# otherwise the package `noisy-softmax-jax` by name from the package index.

# %%
import os

try:
    import noisy_softmax_jax  # noqa: F401
except ImportError:
    in_clone = os.path.exists(os.path.join("..", "noisy_softmax_jax", "__init__.py"))
    source = os.path.abspath("..") if in_clone else "noisy-softmax-jax"
    print("installing", source)
    # %pip install --quiet {source}

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

from noisy_softmax_jax import (NoisySoftmaxHead, noisy_softmax_cross_entropy, noisy_target_logit,
                               saturation_metrics, target_amplitude)

# %matplotlib inline
plt.rcParams["figure.dpi"] = 80
print("jax", jax.__version__, "on", jax.default_backend())

# %% [markdown]
# ## 1. The loss on a toy batch
#
# A bias-free classifier on random features. `target_amplitude` gives $\|W_y\|\|x\|$ (the
# `NoisySoftmaxHead` returns the same numbers for Flax users). With `alpha = 0` the loss is exactly
# Optax's softmax cross-entropy; with `alpha > 0` it is larger, because the target logit is lowered.

# %%
features = jax.random.normal(jax.random.key(0), (8, 16))
kernel = jax.random.normal(jax.random.key(1), (16, 10))  # [features, classes], Flax's layout
labels = jax.random.randint(jax.random.key(2), (8,), 0, 10)
logits = features @ kernel
amplitude = target_amplitude(features, kernel, labels)
rng = jax.random.key(3)

plain = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
for alpha in (0.0, 0.1, 0.5):
    noisy = noisy_softmax_cross_entropy(logits, labels, rng, alpha, amplitude=amplitude)
    print(f"alpha={alpha:<4} mean loss {float(noisy.mean()):.4f}   "
          f"equal to Optax: {bool(jnp.array_equal(noisy, plain))}")
print(f"Optax softmax   mean loss {float(plain.mean()):.4f}")

# %% [markdown]
# ## 2. The injected noise is half-normal, annealed by $1 - \cos\theta_y$
#
# `noisy_target_logit` draws exactly the noise the loss draws. With `noise="free"` the injected
# amount $f_y - \tilde f_y$ is $\alpha|\xi|$: a half-normal with scale $\alpha\sigma$. The
# annealed noise multiplies it by $\|W_y\|\|x\|(1-\cos\theta_y)$, so for a fixed amplitude its mean
# falls linearly to zero as $\cos\theta_y \to 1$.

# %%
n = 200_000
zeros = jnp.zeros((n,))
injected = np.asarray(zeros - noisy_target_logit(zeros, jax.random.key(4), 1.0, noise="free"))

grid = np.linspace(0, 4.5, 200)
half_normal = np.sqrt(2 / np.pi) * np.exp(-grid**2 / 2)
print(f"mean {injected.mean():.4f} (half-normal: {np.sqrt(2 / np.pi):.4f}), "
      f"std {injected.std():.4f} (half-normal: {np.sqrt(1 - 2 / np.pi):.4f}), "
      f"min {injected.min():.2e} (never negative)")

amp = 15.0  # a typical ||W_y|| ||x|| of the small CNN early in training
cos = np.linspace(-0.2, 1.0, 61)
target = jnp.asarray(amp * cos)
draw = jax.jit(jax.vmap(lambda key: target - noisy_target_logit(
    target, key, 0.1, amplitude=jnp.full_like(target, amp))))
draws = np.asarray(draw(jax.random.split(jax.random.key(100), 2000)))

fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
axes[0].hist(injected, bins=120, density=True, alpha=0.6, label=r"$f_y - \tilde f_y$, free noise, $\alpha=1$")
axes[0].plot(grid, half_normal, "k", label=r"half-normal pdf, $\sigma = 1$")
axes[0].set_xlabel("injected noise"); axes[0].legend(); axes[0].set_title("distribution of the noise")
axes[1].plot(cos, draws.mean(0), "C3", label="mean over 2000 draws")
axes[1].fill_between(cos, np.percentile(draws, 10, 0), np.percentile(draws, 90, 0), color="C3",
                     alpha=0.2, label="10-90% of draws")
axes[1].plot(cos, 0.1 * np.sqrt(2 / np.pi) * amp * (1 - cos), "k--", lw=1,
             label=r"$\alpha\sqrt{2/\pi}\,a\,(1-\cos\theta_y)$")
axes[1].set_xlabel(r"$\cos\theta_y$"); axes[1].set_ylabel("injected noise")
axes[1].set_title(rf"annealed noise, $\alpha = 0.1$, amplitude $a = {amp:g}$"); axes[1].legend()
fig.tight_layout()

# %% [markdown]
# ## 3. The desaturation picture: the target gradient against $p_y$
#
# With softmax, $|\partial\ell/\partial f_y| = 1 - p_y$: it vanishes as soon as the clean target
# probability nears 1, whatever the feature's angle. Below, one example with 10 classes, the other
# logits at 0, a fixed amplitude $a = \|W_y\|\|x\|$, and the target logit $f_y = a\cos\theta_y$ swept
# over the angle. For each point, the gradient of the library's loss with respect to the target
# logit is averaged over 500 noise draws (the amplitude held fixed: this is $\partial\ell/\partial f_y$).
#
# The noisy softmax keeps a sizeable gradient at $p_y$ close to 1 (it lowers $\tilde f_y$, so
# $\tilde p_y < p_y$, and $\partial\tilde f_y/\partial f_y = 1 + \alpha|\xi|$), and lets it fall to
# zero only as $\cos\theta_y \to 1$: saturation is postponed, not removed.

# %%
num_classes, amp = 10, 15.0
labels1 = jnp.zeros((1,), jnp.int32)
keys = jax.random.split(jax.random.key(5), 500)

def target_gradient(f_y, key, alpha, noise="annealed", negative=False, shared=False):
    def loss(f_y):
        logits = jnp.zeros((1, num_classes)).at[0, 0].set(f_y)
        return noisy_softmax_cross_entropy(
            logits, labels1, key, alpha, amplitude=jnp.full((1,), amp), noise=noise,
            negative=negative, shared_noise=shared)[0]
    return -jax.grad(loss)(f_y)  # |d loss / d f_y| (the gradient is negative)

@jax.jit
def mean_gradient(f_y, alpha):
    grads = jax.vmap(jax.vmap(target_gradient, (None, 0, None)), (0, None, None))(f_y, keys, alpha)
    return grads.mean(1)

cos = jnp.linspace(-0.05, 1.0, 160)
f_y = amp * cos
p_y = np.asarray(jax.nn.sigmoid(f_y - jnp.log(num_classes - 1.0)))  # clean softmax p_y

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
gradients = {}
for alpha, color in ((0.0, "k"), (0.05, "C0"), (0.1, "C3"), (0.5, "C2")):
    grad = gradients[alpha] = np.asarray(mean_gradient(f_y, alpha))
    label = "softmax ($1 - p_y$)" if alpha == 0 else rf"noisy, $\alpha = {alpha}$"
    axes[0].plot(p_y, grad, color=color, label=label)
    axes[1].plot(np.asarray(cos), grad, color=color, label=label)
axes[0].set_xlabel("clean target probability $p_y$"); axes[0].set_xlim(0, 1)
axes[0].set_title("target gradient vs $p_y$")
axes[1].set_xlabel(r"$\cos\theta_y$"); axes[1].set_yscale("log"); axes[1].set_ylim(1e-6, 2)
axes[1].set_title(rf"the same against the angle (amplitude {amp:g}, log scale)")
for ax in axes:
    ax.set_ylabel(r"mean $|\partial\ell/\partial f_y|$"); ax.grid(alpha=0.3); ax.legend()
fig.tight_layout()

for p in (0.9, 0.99, 0.999):
    i = int(np.argmin(np.abs(p_y - p)))
    print(f"p_y = {p_y[i]:.4f}: softmax {1 - p_y[i]:.2e}, "
          f"noisy alpha=0.1 {gradients[0.1][i]:.2e}")

# %% [markdown]
# ## 4. The ablation variants side by side
#
# The paper's ablations, all with $\alpha = 0.1$, $\sigma = 1$:
#
# | variant | injected noise | library call |
# |---|---|---|
# | annealed (the method) | $\alpha\|\xi\|\,a\,(1-\cos\theta_y)$ | `noise="annealed"` |
# | amplitude | $\alpha\|\xi\|\,a$ | `noise="amplitude"` |
# | free | $\alpha\|\xi\|$ | `noise="free"` |
# | negative | $-\alpha\|\xi\|\,a\,(1-\cos\theta_y)$ (raises $f_y$) | `negative=True` |
# | batch-shared | annealed, one $\xi$ per batch | `shared_noise=True` |
#
# Amplitude noise never fades (it stays large even for a perfectly aligned feature), free noise is
# tiny next to logits of size ~15, and negative noise *raises* the target logit, so it saturates
# earlier than softmax: its gradient lies below $1 - p_y$.

# %%
variants = {
    "softmax": dict(alpha=0.0),
    "annealed": dict(alpha=0.1),
    "amplitude": dict(alpha=0.1, noise="amplitude"),
    "free": dict(alpha=0.1, noise="free"),
    "negative": dict(alpha=0.1, negative=True),
    "shared": dict(alpha=0.1, shared=True),
}

def variant_gradient(f_y, **kwargs):
    one = lambda f, k: target_gradient(f, k, kwargs["alpha"], kwargs.get("noise", "annealed"),
                                       kwargs.get("negative", False), kwargs.get("shared", False))
    return np.asarray(jax.jit(jax.vmap(jax.vmap(one, (None, 0)), (0, None)))(f_y, keys).mean(1))

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for (name, kwargs), style in zip(variants.items(), ["k-", "C3-", "C1-", "C0-", "C4--", "C2:"]):
    if name in ("softmax", "annealed"):  # computed above, with the same noise draws
        grad = gradients[kwargs["alpha"]]
    else:
        grad = variant_gradient(f_y, **kwargs)
    axes[0].plot(p_y, grad, style, label=name)
    axes[1].plot(np.asarray(cos), grad, style, label=name)
axes[0].set_xlabel("clean target probability $p_y$"); axes[0].set_xlim(0.5, 1)
axes[0].set_title(r"target gradient vs $p_y$ ($\alpha = 0.1$)")
axes[1].set_xlabel(r"$\cos\theta_y$"); axes[1].set_yscale("log"); axes[1].set_ylim(1e-6, 2)
axes[1].set_title("against the angle (log scale)")
for ax in axes:
    ax.set_ylabel(r"mean $|\partial\ell/\partial f_y|$"); ax.grid(alpha=0.3); ax.legend()
fig.tight_layout()

# %% [markdown]
# Per-example versus batch-shared noise: the expected gradient is the same (the curves above
# coincide), but with `shared_noise=True` every example of a batch is lowered by the same $|\xi|$,
# so a batch is either all lightly or all heavily perturbed. Below, the noise each of 256 examples
# receives in one batch, against its angle.

# %%
batch = 256
cos_b = jax.random.uniform(jax.random.key(6), (batch,), minval=0.0, maxval=1.0)
target_b = amp * cos_b
amp_b = jnp.full((batch,), amp)
fig, ax = plt.subplots(figsize=(6, 3.8))
for shared, color, name in ((False, "C3", "per-example xi (default)"),
                            (True, "C2", "one xi per batch (shared_noise=True)")):
    lowered = target_b - noisy_target_logit(target_b, jax.random.key(7), 0.1, amplitude=amp_b,
                                            shared_noise=shared)
    ax.scatter(np.asarray(cos_b), np.asarray(lowered), s=8, color=color, label=name)
ax.set_xlabel(r"$\cos\theta_y$"); ax.set_ylabel("injected noise"); ax.legend()
ax.set_title(r"one batch, annealed noise, $\alpha = 0.1$, amplitude 15")
fig.tight_layout()

# %% [markdown]
# ## 5. What the training diagnostics report
#
# `saturation_metrics` summarizes a batch in scalars cheap enough to log every step: the clean
# $p_y$, the fraction with $p_y > 0.99$, the target gradient of the loss in use (given the loss's
# own key it sees the same noise), the injected noise, and the amplitude and $\cos\theta_y$.
# A too-large $\alpha$ can be escaped by shrinking the features ($a \to 0$ removes the noise),
# which shows as `amplitude` and `logit_std` falling toward 0.

# %%
head = NoisySoftmaxHead(num_classes=10)
params = head.init(jax.random.key(8), features)
out = head.apply(params, features)
for alpha in (0.0, 0.1):
    metrics = saturation_metrics(out.logits, labels, amplitude=out.amplitude(labels),
                                 rng=rng if alpha else None, alpha=alpha)
    print(f"alpha={alpha}: " + ", ".join(f"{k} {float(v):.3f}" for k, v in metrics.items()))
