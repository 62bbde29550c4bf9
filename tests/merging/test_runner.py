"""The merge CLI's runner end to end on a tiny random Whisper (tiny.en's tokenizer) and real speech:
grid over alpha, choice by the named set, outputs that jaxasr and transformers load, clear errors."""

from __future__ import annotations

import dataclasses
import functools
import json
import textwrap
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxasr.configuration import ConfigError
from jaxasr.convert import native
from jaxasr.convert.export import save_native
from jaxasr.convert.sources import WhisperCheckpoint, load_checkpoint
from jaxasr.data.pipeline import dataset_config
from jaxasr.data.records import write_shards
from jaxasr.merging import merge
from jaxasr.merging.runner import GRID_JSON, GRID_TSV, default_config, load_any, main, run_merge
from jaxasr.models.state import flat_state
from jaxasr.models.whisper import Whisper

SMALL = dict(d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
             encoder_ffn_dim=128, decoder_ffn_dim=128, max_target_positions=64)


PARAMS: dict[str, dict] = {}
CFG: list = []  # the small model's WhisperConfig, set by the `models` fixture


@pytest.fixture
def cached_loads(monkeypatch):
    """The runner's checkpoint loads memoized: each directory is read once per module, not per run
    (reading a checkpoint's tokenizer alone takes about a second)."""
    from jaxasr.merging import runner

    monkeypatch.setattr(runner, "load_any", _cached_load)


_cached_load = functools.lru_cache(maxsize=None)(load_any)


def _save(base: WhisperCheckpoint, cfg, params, out: Path) -> Path:
    ckpt = WhisperCheckpoint({**base.hf_config, **cfg.hf_fields()}, base.generation_config, params, base.tokenizer,
                             base.preprocessor_config, source=out.name)
    return save_native(ckpt, out)


@pytest.fixture(scope="module")
def models(tiny_en_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """base, two experts (base + small random perturbations), and one of another shape ('bad');
    `PARAMS[name]` holds what each directory holds."""
    root = tmp_path_factory.mktemp("merge_models")
    cfg = dataclasses.replace(tiny_en_checkpoint.config(), **SMALL)
    base = {k: np.asarray(v) for k, v in flat_state(Whisper(cfg, rngs=nnx.Rngs(0))).items()}
    rng = np.random.default_rng(0)
    dirs = {"base": _save(tiny_en_checkpoint, cfg, base, root / "base")}
    PARAMS["base"] = base
    CFG[:] = [cfg]
    for name in ("a", "b", "a_dec", "b_dec"):  # *_dec: the encoder kept frozen, as in the CPU recipe
        expert = {k: v if name.endswith("_dec") and k[0] == "encoder" else
                  (v + 0.05 * np.std(v) * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in base.items()}
        dirs[name] = _save(tiny_en_checkpoint, cfg, expert, root / name)
        PARAMS[name] = expert
    bad_cfg = dataclasses.replace(cfg, decoder_ffn_dim=96)
    bad = {k: np.asarray(v) for k, v in flat_state(Whisper(bad_cfg, rngs=nnx.Rngs(1))).items()}
    dirs["bad"] = _save(tiny_en_checkpoint, bad_cfg, bad, root / "bad")
    return dirs


@pytest.fixture(scope="module")
def eval_sets(speech_clips, tmp_path_factory) -> dict[str, dict]:
    """Two named sets of 2 real speech clips each, as ArrayRecord shards."""
    sets = {}
    for name, clips in (("dev", speech_clips[:2]), ("other", speech_clips[5:7])):
        out = tmp_path_factory.mktemp(f"records_{name}")
        write_shards(({"id": c.path.stem, "audio_bytes": c.path.read_bytes(), "text": c.text} for c in clips),
                     out, num_shards=1)
        sets[name] = dataset_config(source="arrayrecord", path=str(out))
    return sets


def _config(models, out: Path, **fields) -> ml_collections.ConfigDict:
    c = default_config()
    c.base = str(models["base"])
    c.experts = {"a": str(models["a"]), "b": str(models["b"])}
    c.method = "tsv_m"
    c.alphas = (0.5, 1.0)
    c.eval.batch_size = 2
    c.eval.max_new_tokens = 4
    c.out = str(out)
    for k, v in fields.items():
        c[k] = v
    return c


def test_grid_and_outputs(models, eval_sets, tmp_path):
    import torch
    import transformers

    config = _config(models, tmp_path / "out", alphas=(0.3, 0.7, 1.0))
    config.eval.sets = eval_sets
    config.eval.best_set = "other"
    summary = run_merge(config)

    # one row per alpha, one WER per set; the kept alpha is the lowest 'other' WER
    assert [r["alpha"] for r in summary["rows"]] == [0.3, 0.7, 1.0]
    assert all(set(r["wer"]) == {"dev", "other"} for r in summary["rows"])
    assert summary["best_alpha"] == min(summary["rows"], key=lambda r: r["wer"]["other"])["alpha"]
    lines = (tmp_path / "out" / GRID_TSV).read_text().splitlines()
    assert lines[0].split("\t")[:3] == ["alpha", "dev/wer", "other/wer"] and len(lines) == 4
    assert [line.split("\t")[-1] for line in lines[1:]].count("1") == 1
    assert json.loads((tmp_path / "out" / GRID_JSON).read_text())["best_alpha"] == summary["best_alpha"]
    assert "*" in summary["table"] and "other*" in summary["table"]

    # outputs hold base + best_alpha * TSV-M delta, computed independently on per-layer HF matrices
    expected = _merged_per_layer("tsv_m", alpha=summary["best_alpha"])
    native = load_checkpoint(tmp_path / "out" / "jaxasr")
    for k, v in expected.items():
        np.testing.assert_allclose(native.params[k], v, rtol=1e-6, atol=1e-6, err_msg="/".join(k))

    # transformers loads out/hf with the logits of the merged jaxasr model
    hf = transformers.WhisperForConditionalGeneration.from_pretrained(tmp_path / "out" / "hf").eval()
    model = native.build()
    rng = np.random.default_rng(0)
    features = rng.standard_normal((1, model.cfg.num_mel_bins, 3000)).astype(np.float32)
    tokens = np.asarray([[50257, 50362, 440, 1049]], np.int32)
    ours = np.asarray(model(features, tokens))
    with torch.no_grad():
        theirs = hf(input_features=torch.tensor(features), decoder_input_ids=torch.tensor(tokens,
                                                                                       dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_best_alpha_follows_named_set(models, eval_sets, tmp_path, monkeypatch, cached_loads):
    """With WERs that disagree between sets, the kept alpha is the best of eval.best_set (or of the
    mean WER of its '+'-joined sets)."""
    from jaxasr.training import evaluation

    wers = {"dev": [30.0, 10.0, 20.0], "other": [5.0, 50.0, 8.0]}  # dev prefers 0.7, other 0.3, their mean 1.0
    calls = []

    def fake_run(self, model):
        i = len(calls)
        calls.append(i)
        return {n: {"wer": wers[n][i], "cer": 0.0} for n in ("dev", "other")}, {}

    monkeypatch.setattr(evaluation.Evaluator, "run", fake_run)
    from jaxasr.convert import export  # the outputs are checked above: skip writing them again

    monkeypatch.setattr(export, "save_native", lambda ckpt, out: out)
    monkeypatch.setattr(export, "export_hf", lambda ckpt, out, dtype: out)
    for best_set, alpha in (("dev", 0.7), ("other", 0.3), ("dev+other", 1.0)):
        calls.clear()
        config = _config(models, tmp_path / best_set, alphas=(0.3, 0.7, 1.0))
        config.eval.sets = eval_sets
        config.eval.best_set = best_set
        summary = run_merge(config)
        assert summary["best_alpha"] == alpha
        assert summary["table"].splitlines()[0].count("*") == len(best_set.split("+"))  # the sets that chose


def test_frozen_encoder_experts_encode_once(models, eval_sets, tmp_path, monkeypatch, cached_loads):
    """Experts that left the encoder untouched: the eval clips are encoded once for the whole grid,
    with the same WERs as re-encoding per alpha; experts that changed it re-encode."""
    from jaxasr.training import evaluation

    calls = []
    original = evaluation.Evaluator.encode_sets
    monkeypatch.setattr(evaluation.Evaluator, "encode_sets",
                        lambda self, model: calls.append(1) or original(self, model))

    def rows(experts, out):
        config = _config(models, tmp_path / out, alphas=(0.5, 1.0))
        config.experts = {n: str(models[n]) for n in experts}
        config.eval.sets = eval_sets
        return run_merge(config)["rows"]

    cached = rows(("a_dec", "b_dec"), "cached")
    assert len(calls) == 1
    rows(("a", "b"), "full")
    assert len(calls) == 1
    monkeypatch.setattr(evaluation.Evaluator, "encode_sets", lambda self, model: None)
    assert rows(("a_dec", "b_dec"), "uncached") == cached


def test_cli_single_alpha_without_eval_sets(models, tmp_path, capsys, cached_loads):
    cfg_file = tmp_path / "m.py"
    cfg_file.write_text(textwrap.dedent(f"""
        from jaxasr.merging.runner import default_config
        def get_config():
            c = default_config()
            c.base = {str(models['base'])!r}
            c.experts = {{"a": {str(models['a'])!r}, "b": {str(models['b'])!r}}}
            c.method = "task_arithmetic"
            c.params = {{"weights": (0.5, 1.0)}}
            c.alphas = (0.8,)
            c.out = {str(tmp_path / 'out')!r}
            return c
    """))
    assert main(["--config", str(cfg_file)]) == 0
    assert "kept alpha 0.8" in capsys.readouterr().out
    expected = _merged_per_layer("task_arithmetic", alpha=0.8, weights=(0.5, 1.0))
    got = native.load(tmp_path / "out" / "jaxasr")[1]
    for k in (("decoder", "layers", "mlp", "fc1", "kernel"), ("encoder", "layers", "mlp", "fc1", "bias")):
        np.testing.assert_allclose(got[k], expected[k], atol=1e-6)
    assert (tmp_path / "out" / "hf" / "model.safetensors").is_file()

    # several alphas and nothing to choose among them
    assert main(["--config", str(cfg_file), "--config.alphas=(0.5, 1.0)"]) == 2
    assert "exactly one alpha" in capsys.readouterr().err


def test_clear_errors(models, tmp_path, cached_loads):
    with pytest.raises(ConfigError, match=r"unknown merging method 'tsvm'; did you mean 'tsv_m'"):
        run_merge(_config(models, tmp_path, method="tsvm"))
    with pytest.raises(ConfigError, match=r"ties takes .*not \['densty'\]"):
        run_merge(_config(models, tmp_path, method="ties", params={"densty": 0.2}))
    with pytest.raises(ConfigError, match=r"config.mesh: mesh shape .* needs 7 devices, there are"):
        config = _config(models, tmp_path, alphas=(1.0,))
        config.mesh.data = 7
        run_merge(config)
    config = _config(models, tmp_path, alphas=(1.0,))
    config.experts = {"a": str(models["a"]), "bad": str(models["bad"])}
    with pytest.raises(ValueError, match=r"expert 'bad' does not have the base's architecture: decoder/.*fc1.* shape"):
        run_merge(config)
    for best_set in ("nope", "dev+nope"):
        with pytest.raises(ConfigError, match="eval.best_set: 'nope' is not one of the eval sets"):
            config = _config(models, tmp_path)
            config.eval.sets = {"dev": dataset_config(path="x")}
            config.eval.best_set = best_set
            run_merge(config)


def _merged_per_layer(method: str, **kw) -> dict:
    """`merge` on the base and experts in Hugging Face's per-layer layout, back in jaxasr's."""
    from jaxasr.convert import hf_whisper

    return hf_whisper.hf_to_jaxasr(
        merge(method, hf_whisper.jaxasr_to_hf(PARAMS["base"], CFG[0]),
              [hf_whisper.jaxasr_to_hf(PARAMS[n], CFG[0]) for n in ("a", "b")], **kw), CFG[0])
