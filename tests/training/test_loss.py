"""The train step's token cross-entropy: its hand-written backward equals autodiff of the textbook form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxasr.kernels import cpu as cpu_kernels
from jaxasr.training.step import token_loss
from tests.custom_calls import custom_calls


def _reference(logits, labels, mask, label_smoothing):
    """Hugging Face's LabelSmoother on log_softmax, differentiated by JAX."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    per_token = (1 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    denom = jnp.maximum(mask.sum(), 1.0)
    return (per_token * mask).sum() / denom, (nll * mask).sum() / denom


# 97 words: XLA's ops; 1500: the native CPU kernels (from 1024 words, where they apply)
@pytest.mark.parametrize("vocab", [97, 1500])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_loss_and_gradient_match_autodiff(label_smoothing, vocab):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(4 * rng.standard_normal((3, 5, vocab)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, vocab, (3, 5)), jnp.int32)
    mask = jnp.asarray(rng.random((3, 5)) > 0.3, jnp.float32)

    def ours(x):  # the loss and the reported NLL both carry gradient here, to check both cotangents
        loss, metrics = token_loss(x, labels, mask, label_smoothing)
        return loss + 0.5 * metrics["nll"]

    def reference(x):
        loss, nll = _reference(x, labels, mask, label_smoothing)
        return loss + 0.5 * nll

    native = cpu_kernels.applies(logits) and vocab >= 1024
    names = ("jaxasr_cross_entropy", "jaxasr_cross_entropy_grad")  # the forward and the gradient
    assert [custom_calls(jax.grad(ours), logits, name=n) for n in names] == ([1, 1] if native else [0, 0])
    np.testing.assert_allclose(ours(logits), reference(logits), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(reference)(logits), rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(jax.grad(ours)(logits)).max()) > 1e-3  # a real gradient, not zeros


def test_low_precision_logits_get_a_gradient_of_their_dtype():
    logits = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 33)), jnp.bfloat16)
    labels = jnp.zeros((2, 4), jnp.int32)
    grad = jax.grad(lambda x: token_loss(x, labels, jnp.ones((2, 4)))[0])(logits)
    assert grad.dtype == jnp.bfloat16
    reference = jax.grad(lambda x: _reference(x, labels, jnp.ones((2, 4)), 0.0)[0])(logits)
    np.testing.assert_allclose(grad.astype(np.float32), reference.astype(np.float32), atol=1e-2)


@pytest.mark.parametrize("vocab", [50, 1500])
def test_accuracy_counts_masked_tokens_whose_label_has_the_top_logit(vocab):
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.standard_normal((4, 6, vocab)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, vocab, (4, 6)), jnp.int32)
    labels = labels.at[0].set(jnp.argmax(logits[0], -1))  # a row of right answers among random ones
    mask = jnp.asarray(rng.random((4, 6)) > 0.25, jnp.float32)
    expected = ((np.argmax(logits, -1) == labels) * mask).sum() / mask.sum()
    assert 0 < expected < 1
    np.testing.assert_allclose(token_loss(logits, labels, mask)[1]["accuracy"], expected, rtol=1e-6)
