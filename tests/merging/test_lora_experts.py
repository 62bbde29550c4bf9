"""LoRA experts: weighted sums of adapter deltas, learned weights, merging, distillation, training."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxasr.merging.lora_experts import (adapter_deltas, distill_data_config, distill_loss, domain_weights, expert_config, init_student,
                                         learn_weights, make_distill_step, merge_experts, strip_lora, weighted_sum)
from jaxasr.merging import merge_deltas
from jaxasr.merging.lora_experts import module_at
from jaxasr.models.lora import LoraConfig, apply_lora, layer_matrix_shape, lora_modules, merge_lora
from jaxasr.models.whisper import Whisper, WhisperConfig

REPO = Path(__file__).resolve().parents[2]
TINY = WhisperConfig(vocab_size=64, num_mel_bins=8, d_model=32, encoder_layers=1, decoder_layers=1,
                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                     max_source_positions=8, max_target_positions=16)
LORA = LoraConfig(targets=(r"decoder/layers/(self_attn|encoder_attn)/(q_proj|v_proj)$", r"decoder/layers/mlp/fc1$"),
                  rank=4, alpha=8.0)


def _expert(base: Whisper, seed: int, scale: float = 0.6) -> Whisper:
    """base + a LoRA whose B is random (a trained expert stand-in: a clear, known perturbation)."""
    model = apply_lora(nnx.clone(base), dataclasses.replace(LORA, seed=seed))
    rng = np.random.default_rng(seed)
    for m in lora_modules(model).values():
        m.lora_b[...] = jnp.asarray(scale * rng.standard_normal(m.lora_b.shape), m.lora_b.dtype)
    return model


@pytest.fixture(scope="module")
def tiny():
    base = Whisper(TINY, rngs=nnx.Rngs(0))
    # A random init's tied embedding (std 0.02) gives near-uniform posteriors; sharpen them so
    # that experts differ clearly in their token distributions.
    base.decoder.embed_tokens.embedding[...] = base.decoder.embed_tokens.embedding[...] * 8
    return base, [_expert(base, 1), _expert(base, 2)]


def _batch(seed: int, n: int = 4, length: int = 6, components=None) -> dict:
    rng = np.random.default_rng(seed)
    return {"features": rng.standard_normal((n, TINY.num_mel_bins, TINY.n_audio_frames)).astype(np.float32),
            "decoder_input_ids": rng.integers(0, TINY.vocab_size, (n, length)).astype(np.int32),
            "labels": np.zeros((n, length), np.int32), "loss_mask": np.ones((n, length), np.float32),
            "is_text": np.zeros((n,), bool),
            "component": np.asarray(components if components is not None else np.zeros(n), np.int32)}


def _logits(model, batch):
    return np.asarray(model(jnp.asarray(batch["features"]), jnp.asarray(batch["decoder_input_ids"])))


def _greedy_labels(model, batch) -> dict:
    """The batch with labels = the model's own argmax: dev data 'from that model's domain'."""
    return {**batch, "labels": _logits(model, batch).argmax(-1).astype(np.int32)}


# --------------------------------------------------------------------------- (a) weighted sum
def test_one_hot_weighted_sum_is_that_expert(tiny):
    base, experts = tiny
    batch = _batch(0)
    for i, expert in enumerate(experts):
        merged = weighted_sum(experts, domain_weights(i, 2))
        assert not lora_modules(merged)  # a plain model
        want = _logits(merge_lora(nnx.clone(expert)), batch)
        np.testing.assert_allclose(_logits(merged, batch), want, atol=1e-5)
        np.testing.assert_allclose(_logits(expert, batch), want, atol=1e-4)  # == the adapter's own forward
    # the base is untouched and zero weights give it back
    np.testing.assert_allclose(_logits(weighted_sum(experts, [0.0, 0.0]), batch), _logits(base, batch), atol=1e-6)
    np.testing.assert_allclose(_logits(strip_lora(experts[0]), batch), _logits(base, batch), atol=1e-6)


def _kernel(model, path: str) -> np.ndarray:
    m = model
    for part in path.split("/"):
        m = getattr(m, part)
    return np.asarray(m.kernel[...])


def test_weighted_sum_is_linear_in_the_deltas(tiny):
    base, experts = tiny
    w = [0.3, 0.7]
    merged = weighted_sum(experts, w)
    d = [adapter_deltas(e) for e in experts]
    for path in lora_modules(experts[0]):
        want = _kernel(base, path) + w[0] * np.asarray(d[0][path]) + w[1] * np.asarray(d[1][path])
        np.testing.assert_allclose(_kernel(merged, path), want, atol=1e-6)
    # the same from bare deltas and the base
    same = weighted_sum(d, w, base=base)
    np.testing.assert_allclose(_logits(same, _batch(1)), _logits(merged, _batch(1)), atol=1e-6)


def test_learned_weights_favour_the_expert_of_the_dev_domain(tiny):
    _, experts = tiny
    for target in (0, 1):
        dev = [_greedy_labels(experts[target], _batch(10 + i)) for i in range(2)]
        learned = learn_weights(experts, dev, steps=40, learning_rate=0.2)
        assert learned.weights.shape == (2,) and abs(learned.weights.sum() - 1) < 1e-5
        assert learned.weights[target] > 0.8, learned.weights
        assert learned.losses[-1] < learned.losses[0]


# --------------------------------------------------------------------------- (b) merging methods
def test_merge_experts_matches_weighted_sums(tiny):
    _, experts = tiny
    batch = _batch(2)
    ta = merge_experts("task_arithmetic", experts)
    np.testing.assert_allclose(_logits(ta, batch), _logits(weighted_sum(experts, [1.0, 1.0]), batch), atol=1e-5)
    soup = merge_experts("soup", experts)
    np.testing.assert_allclose(_logits(soup, batch), _logits(weighted_sum(experts, [0.5, 0.5]), batch), atol=1e-5)
    tsv = merge_experts("tsv_m", experts, alpha=0.5)
    assert np.isfinite(_logits(tsv, batch)).all()
    # SVD methods decompose each layer's 2-D [in, out] matrix, not the stacked multi-dim kernel
    base = strip_lora(experts[0])
    for path in list(lora_modules(experts[0]))[:2]:
        layers, n_in, n_out = layer_matrix_shape(module_at(base, path))
        deltas = [np.asarray(adapter_deltas(e)[path]).reshape(layers, n_in, n_out) for e in experts]
        got = (np.asarray(module_at(tsv, path).kernel[...]) - np.asarray(module_at(base, path).kernel[...]))
        got = got.reshape(layers, n_in, n_out) / 0.5
        for i in range(layers):
            expected = merge_deltas("tsv_m", [{"w": d[i]} for d in deltas])["w"]
            np.testing.assert_allclose(got[i], expected, atol=1e-5, err_msg=f"{path} layer {i}")


# --------------------------------------------------------------------------- (c) distillation
def _np_distill(s, t, labels, mask, temp, kl_weight):
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    ls, lt = log_softmax(s / temp), log_softmax(t / temp)
    kl = (np.exp(lt) * (lt - ls)).sum(-1)
    ce = -np.take_along_axis(log_softmax(s), labels[..., None], -1)[..., 0]
    n = max(mask.sum(), 1.0)
    return kl_weight * temp**2 * (kl * mask).sum() / n + (ce * mask).sum() / n, (kl * mask).sum() / n


def test_distill_loss_matches_numpy():
    rng = np.random.default_rng(0)
    s, t = rng.standard_normal((2, 3, 5, 11)).astype(np.float64) * 2
    labels = rng.integers(0, 11, (3, 5))
    mask = (rng.random((3, 5)) > 0.3).astype(np.float64)
    for temp, kw in ((1.0, 1.0), (2.0, 0.5), (0.7, 3.0)):
        loss, m = distill_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(labels),
                               jnp.asarray(mask, jnp.float32), temp, kw)
        want, want_kl = _np_distill(s, t, labels, mask, temp, kw)
        np.testing.assert_allclose(float(loss), want, rtol=1e-5)
        np.testing.assert_allclose(float(m["kl"]), want_kl, rtol=1e-5, atol=1e-7)
    # student == teacher: no KL, the loss is the CE alone
    loss, m = distill_loss(jnp.asarray(s, jnp.float32), jnp.asarray(s, jnp.float32), jnp.asarray(labels),
                           jnp.asarray(mask, jnp.float32), 2.0, 5.0)
    assert abs(float(m["kl"])) < 1e-6
    np.testing.assert_allclose(float(loss), float(m["ce"]), rtol=1e-6)
    # no gradient into the teacher
    g = jax.grad(lambda t_: distill_loss(jnp.asarray(s, jnp.float32), t_, jnp.asarray(labels),
                                         jnp.asarray(mask, jnp.float32))[0])(jnp.asarray(t, jnp.float32))
    assert not np.asarray(g).any()


def test_distillation_reduces_kl_to_the_domain_teachers(tiny):
    base, experts = tiny
    student = init_student(experts[0], seed=7)
    batch = _batch(5)  # student == base at first (B = 0)
    np.testing.assert_allclose(_logits(student, batch), _logits(base, batch), atol=1e-6)
    comps = np.array([0, 1, 0, 1, 1, 0, 1, 0])
    batches = []
    for i in range(2):
        b = _batch(20 + i, n=8, components=comps)
        # labels from each row's own domain expert: a mixed-domain batch
        labels = np.where(comps[:, None] == 0, _greedy_labels(experts[0], b)["labels"],
                          _greedy_labels(experts[1], b)["labels"])
        batches.append({**b, "labels": labels})
    step = make_distill_step(student, experts, optax.adam(3e-3), temperature=1.0, kl_weight=10.0)
    # the teacher of a row is its component's expert (checked against the experts' own logits)
    b0 = batches[0]
    want = [_np_distill(_logits(base, b0)[r], _logits(experts[c], b0)[r], b0["labels"][r], b0["loss_mask"][r],
                        1.0, 1.0)[1] for r, c in enumerate(comps)]
    np.testing.assert_allclose(float(step.evaluate(b0)["kl"]), np.mean(want), rtol=1e-4)
    before = {i: float(step.evaluate(b)["kl"]) for i, b in enumerate(batches)}
    for i in range(24):
        metrics = step(batches[i % 2])
        assert np.isfinite(float(metrics["loss"]))
    after = {i: float(step.evaluate(b)["kl"]) for i, b in enumerate(batches)}
    assert all(after[i] < 0.75 * before[i] for i in before), (before, after)
    # the student runs without any domain id; its teacher check: on one-domain rows the KL to that expert drops
    trained = step.model()
    assert lora_modules(trained)
    ev = {k: v for k, v in batches[0].items() if k != "component"}
    assert _logits(trained, ev).shape == (8, 6, TINY.vocab_size)
    with pytest.raises(ValueError, match="component"):
        step(ev)


# --------------------------------------------------------------------------- training the experts
def test_expert_config_overrides_replace_data_sections():
    from jaxasr.training.trainer import default_config

    c = default_config()
    c.model.lora.targets = ("q_proj$",)
    c.data.train = {"shared": {"source": "arrayrecord", "path": "x"}}
    c.experts = {"a": {"data": {"train": {"a": {"source": "arrayrecord", "path": "pa"}}}, "optimizer": {"peak_lr": 0.5}},
                 "b": {}}
    a = expert_config(c, "a")
    assert list(a.data.train) == ["a"] and a.data.train.a.path == "pa" and a.optimizer.peak_lr == 0.5
    assert "experts" not in a and a.data.batch_size == c.data.batch_size  # the rest is shared
    assert list(expert_config(c, "b").data.train) == ["shared"]
    c.experts["b"] = {"data": {"train": {"b2": {"source": "arrayrecord", "path": "pb2"},
                                         "b1": {"source": "arrayrecord", "path": "pb1"}}}}
    data, teacher_index, names = distill_data_config(c)
    assert names == ["a", "b"] and sorted(data.train) == ["a", "b1", "b2"]
    assert teacher_index.tolist() == [0, 1, 1]  # component ids (sorted names) -> expert
    assert data.batch_size == c.data.batch_size
    c.experts = {"bad": {"model": {"lora": {"rank": 2}}}}
    with pytest.raises(ValueError, match="share the base"):
        expert_config(c, "bad")
    c.experts = {"typo": {"data": {"trian": {}}}}
    with pytest.raises(ValueError, match="no such config field"):
        expert_config(c, "typo")


EXPERTS_CONFIG = """
from jaxasr.data.pipeline import dataset_config
from jaxasr.training.trainer import default_config


def get_config():
    c = default_config()
    c.model.init = MODEL
    c.model.lora = dict(targets=("decoder/layers/self_attn/(q_proj|v_proj)$",), rank=4, alpha=8.0, dropout=0.0)
    c.data.batch_size = 4
    c.data.label_buckets = (32,)
    c.data.max_label_tokens = 32
    c.data.read_threads = 1
    c.data.train = {"shared": dataset_config(source="arrayrecord", path="unused")}
    c.optimizer.peak_lr = 1e-2
    c.train.steps = 2
    c.train.log_every = 1
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.train.zero_shot_eval = False
    c.train.progress_bar = False
    c.train.async_checkpoints = False
    c.train.peak_flops_per_device = 1e12
    c.experts = {name: {"data": {"train": {name: dataset_config(source="arrayrecord", path=DATA)}}}
                 for name in ("alpha", "beta")}
    return c
"""


def _experts_config(model: Path, data: Path) -> str:
    return EXPERTS_CONFIG.replace("MODEL", repr(str(model))).replace("DATA", repr(str(data)))


def test_train_experts_cli_then_combine(tmp_path, small_whisper_dir, speech_records):
    from jaxasr.merging.lora_experts import load_experts

    config = tmp_path / "experts.py"
    config.write_text(_experts_config(small_whisper_dir, speech_records))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
           "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"}
    done = subprocess.run([sys.executable, "tools/train_lora_experts.py", "--config", str(config), "--workdir",
                           str(tmp_path / "runs")], env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "alpha: finished after 2 steps" in done.stdout and "beta: finished after 2 steps" in done.stdout
    experts = load_experts(tmp_path / "runs")
    assert sorted(experts) == ["alpha", "beta"]
    a, b = experts["alpha"], experts["beta"]
    assert set(lora_modules(a)) == set(lora_modules(b)) == {"decoder/layers/self_attn/q_proj",
                                                          "decoder/layers/self_attn/v_proj"}
    da, db = adapter_deltas(a), adapter_deltas(b)
    assert any(np.abs(np.asarray(d)).max() > 0 for d in da.values())  # trained: B moved off zero
    merged = weighted_sum([a, b], domain_weights(1, 2))
    path = "decoder/layers/self_attn/q_proj"
    want = np.asarray(merge_lora(nnx.clone(b)).decoder.layers.self_attn.q_proj.kernel[...])
    np.testing.assert_allclose(np.asarray(merged.decoder.layers.self_attn.q_proj.kernel[...]), want, atol=1e-6)
    assert path in db

    bad = tmp_path / "bad.py"
    bad.write_text(_experts_config(small_whisper_dir, speech_records).replace('"data": {"train"', '"data": {"trian"'))
    done = subprocess.run([sys.executable, "tools/train_lora_experts.py", "--config", str(bad), "--workdir",
                           str(tmp_path / "bad_runs")], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 2 and "no such config field" in done.stderr
