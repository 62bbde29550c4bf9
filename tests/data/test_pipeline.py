"""The host pipeline end to end (`jaxasr.data.pipeline`): shapes, mixing, determinism, resume,
bad data, sharding, evaluation sets."""

from __future__ import annotations

import collections
import itertools

import numpy as np
import pytest

from jaxasr.data import pipeline
from jaxasr.data.mixing import exact_counts, paper_mixture
from jaxasr.data.sources import InMemorySource


def _config(train: dict, batch_size=4, **kw):
    cfg = pipeline.default_data_config()
    cfg.batch_size = batch_size
    cfg.read_threads = 1  # a 2-core test machine
    for key, value in kw.items():
        setattr(cfg, key, value)
    cfg.train = {name: pipeline.dataset_config(**ds) for name, ds in train.items()}
    return cfg


def _rec(path, **kw):
    return dict(source="arrayrecord", path=str(path), **kw)


def _take(ds_or_iter, n):
    it = iter(ds_or_iter)
    return [next(it) for _ in range(n)]


def _texts(targets, batch):
    """The transcript of every row, from its labels."""
    tok = targets.tokenizer
    return [tok.decode(lab[m > 0], skip_special_tokens=True).strip()
            for lab, m in zip(batch["labels"], batch["loss_mask"])]


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if key == "skipped":
            assert a[key] == b[key]
        else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_default_config_matches_the_contract():
    cfg = pipeline.default_data_config()
    assert (cfg.batch_size, cfg.seed, cfg.num_workers, cfg.read_threads) == (16, 0, 0, 4)
    assert tuple(cfg.label_buckets) == (32, 64, 128, 224) and cfg.max_label_tokens == 224
    assert tuple(cfg.text_buckets) == () and dict(cfg.train) == {}
    assert cfg.augment.spec_augment.time_mask_width == 100 and not cfg.augment.multiscale.enabled
    assert tuple(cfg.augment.multiscale.scales) == (5.0, 10.0, 20.0, 30.0)
    assert tuple(cfg.augment.noise.exponents) == (0.0, 1.0, 2.0) and cfg.augment.speed.prob == 1.0


@pytest.mark.parametrize("n_mels", [80, 128])
def test_batches_have_fixed_shapes_and_real_content(records_dir, targets, speech_clips, n_mels):
    cfg = _config({"a": _rec(records_dir)})
    for batch in _take(pipeline.build_train_iter(cfg, targets, n_mels=n_mels), 3):
        assert batch["features"].shape == (4, n_mels, 3000) and batch["features"].dtype == np.float32
        length = batch["labels"].shape[1]
        assert length in cfg.label_buckets and length == 32  # the clips' transcripts are short
        for key, dtype in (("decoder_input_ids", np.int32), ("labels", np.int32), ("loss_mask", np.float32)):
            assert batch[key].shape == (4, length) and batch[key].dtype == dtype
        assert batch["is_text"].dtype == bool and not batch["is_text"].any()
        assert batch["component"].dtype == np.int32 and batch["skipped"] == {}
        assert set(_texts(targets, batch)) <= {c.text for c in speech_clips}
        assert (batch["features"].std(axis=(1, 2)) > 0.1).all()  # speech, not padding


def test_exact_mixing_over_three_datasets(records_dir, small_records_dir, bad_records_dir, targets):
    cfg = _config({"a": _rec(records_dir, weight=1.0), "b": _rec(small_records_dir, weight=2.0),
                   "c": _rec(records_dir, weight=5.0)}, batch_size=8)
    want = exact_counts({"a": 1.0, "b": 2.0, "c": 5.0}, 8)
    assert want == {"a": 1, "b": 2, "c": 5}
    orders = set()
    for batch in _take(pipeline.build_train_iter(cfg, targets, n_mels=80), 4):
        got = collections.Counter(pipeline.component_names(cfg)[i] for i in batch["component"])
        assert got == want
        orders.add(tuple(batch["component"]))
    assert len(orders) > 1  # rows are shuffled per batch


def test_paper_recipe_with_text_only_components(records_dir, small_records_dir, targets, speech_clips):
    weights = paper_mixture(0.75)
    data = {"source": records_dir, "target": small_records_dir}
    train = {name: _rec(data[name.split("_")[0]], weight=w, kind=name.split("_")[1])
             for name, w in weights.items()}
    cfg = _config(train, batch_size=8, text_buckets=(64, 128))
    names = pipeline.component_names(cfg)
    want = exact_counts(weights, 8)
    assert want == {"source_audio": 3, "source_text": 1, "target_audio": 3, "target_text": 1}
    for batch in _take(pipeline.build_train_iter(cfg, targets, n_mels=80), 3):
        comp = [names[i] for i in batch["component"]]
        assert collections.Counter(comp) == want
        is_text = np.array([c.endswith("_text") for c in comp])
        np.testing.assert_array_equal(batch["is_text"], is_text)
        assert batch["text_tokens"].shape == batch["text_mask"].shape == (8, 64)
        assert (batch["text_mask"].sum(1)[is_text] > 0).all() and not batch["text_mask"][~is_text].any()
        assert not batch["features"][is_text].any() and batch["features"][~is_text].std(axis=(1, 2)).min() > 0.1
        # Text rows learn the clean transcript of a real clip from a corrupted copy of it.
        texts = _texts(targets, batch)
        for i in np.flatnonzero(is_text):
            assert texts[i] in {c.text for c in speech_clips}
            corrupted = targets.tokenizer.decode(batch["text_tokens"][i][batch["text_mask"][i]]).strip()
            assert corrupted != texts[i]


def _augmented(cfg):
    for key in ("speed", "noise", "gain", "spec_augment", "multiscale"):
        cfg.augment[key].enabled = True
    cfg.augment.multiscale.prob = 1.0
    return cfg


def test_same_seed_same_batches_with_every_augmentation(records_dir, targets, speech_clips):
    def build(seed):
        cfg = _augmented(_config({"a": _rec(records_dir), "b": _rec(records_dir, weight=1.0)}, seed=seed))
        return pipeline.build_train_iter(cfg, targets, n_mels=80)

    first, again, other = (_take(build(s), 2) for s in (0, 0, 1))
    for a, b in zip(first, again):
        _assert_same(a, b)
    assert not np.array_equal(first[0]["features"], other[0]["features"])
    # Multi-scale joined several whole transcripts into one row (and SpecAugment etc. ran).
    longest = max(len(t) for b in first for t in _texts(targets, b))
    assert longest > max(len(c.text) for c in speech_clips)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_iterator_state(records_dir, small_records_dir, targets, num_workers):
    cfg = _config({"a": _rec(records_dir), "b": _rec(small_records_dir)}, num_workers=num_workers)
    cfg.augment.noise.enabled = True  # random steps must resume on the same draws too
    ds = pipeline.build_train_iter(cfg, targets, n_mels=80)
    it = iter(ds)
    start = _take(it, 3)
    state = it.get_state()
    expected = _take(it, 3)
    fresh = iter(pipeline.build_train_iter(cfg, targets, n_mels=80))
    fresh.set_state(state)
    for a, b in zip(_take(fresh, 3), expected):
        _assert_same(a, b)
    # The restored run is not simply the start again.
    assert not np.array_equal(start[0]["features"], expected[0]["features"])


def test_bad_examples_skipped_and_counted_exactly(bad_records_dir, bad_reasons, records_dir, targets):
    cfg = _config({"bad": _rec(bad_records_dir, weight=1.0), "good": _rec(records_dir, weight=1.0)})
    it = iter(pipeline.build_train_iter(cfg, targets, n_mels=80))
    batches = _take(it, 6)  # 12 rows of "bad": its 3 good examples 4 times, so 3+ epochs read
    totals = collections.Counter()
    for b in batches:
        totals.update(b["skipped"])
        assert b["features"].shape == (4, 80, 3000)
    expected_reasons = collections.Counter(bad_reasons.values())
    assert set(totals) == set(expected_reasons)
    for reason, per_epoch in expected_reasons.items():
        assert 3 * per_epoch <= totals[reason] <= 4 * per_epoch, (reason, totals)
    # Exact: every example the "bad" component read is a row or a counted skip.
    read = it.get_state()["components"]["bad"]["next_index"]
    assert read == 12 + sum(totals.values())


def test_all_bad_dataset_raises_naming_it(all_bad_records_dir, records_dir, targets):
    cfg = _config({"broken": _rec(all_bad_records_dir), "fine": _rec(records_dir)})
    with pytest.raises(RuntimeError, match="dataset 'broken'.*all failed"):
        _take(pipeline.build_train_iter(cfg, targets, n_mels=80), 1)


def test_over_long_labels_are_skipped_not_batching_errors(records_dir, targets):
    """Labels of the 12 clips are 11-18 tokens; with buckets up to 13 the longer ones are counted."""
    cfg = _config({"a": _rec(records_dir)}, label_buckets=(12, 13), max_label_tokens=224)
    batches = _take(pipeline.build_train_iter(cfg, targets, n_mels=80), 4)
    assert all(b["labels"].shape[1] in (12, 13) for b in batches)
    assert sum(b["skipped"].get("label_too_long", 0) for b in batches) >= 8  # 5 of 12 clips fit


def test_processes_read_disjoint_shards(records_dir, targets, speech_clips):
    cfg = _config({"a": _rec(records_dir)}, batch_size=4)
    seen = []
    for index in (0, 1):
        batches = _take(pipeline.build_train_iter(cfg, targets, n_mels=80, process_index=index, process_count=2), 3)
        assert all(b["features"].shape[0] == 2 for b in batches)  # batch_size // process_count
        seen.append({t for b in batches for t in _texts(targets, b)})
    assert len(seen[0]) == len(seen[1]) == 6  # one epoch of each 6-clip shard, no repeats
    assert not seen[0] & seen[1] and seen[0] | seen[1] == {c.text for c in speech_clips}


def test_encoded_source_override(records_dir, targets, speech_clips):
    rows = [{"id": f"e{i}", "text": c.text, "encoded": np.full((1500, 8), i, np.float16)}
            for i, c in enumerate(speech_clips[:5])]
    rows.append({"skip": "audio_empty", "message": "no samples", "id": "e5"})  # a clip the cache could not use
    cfg = _config({"a": _rec(records_dir)}, batch_size=4)
    batches = _take(pipeline.build_train_iter(cfg, targets, n_mels=80, sources={"a": InMemorySource(rows)}), 3)
    for b in batches:
        assert "features" not in b and b["encoded"].shape == (4, 1500, 8) and b["encoded"].dtype == np.float16
        for enc, text in zip(b["encoded"], _texts(targets, b)):
            assert text == speech_clips[int(enc[0, 0])].text  # encoder output stays with its transcript
    assert sum(b["skipped"].get("audio_empty", 0) for b in batches) >= 1


def test_load_eval_set(manifest_path, manifest_skips, speech_clips):
    ds_cfg = pipeline.dataset_config(source="manifest", path=str(manifest_path))
    examples, skipped = pipeline.load_eval_set(ds_cfg)
    assert skipped == manifest_skips == examples.skipped
    assert [e["id"] for e in examples] == ["m0", "m1", "m2", "m3"]
    assert [e["text"] for e in examples] == [c.text for c in speech_clips[:4]]
    np.testing.assert_allclose(examples[0]["audio"], speech_clips[0].audio, atol=1e-4)
    assert abs(len(examples[3]["audio"]) - len(speech_clips[3].audio)) <= 2  # 8 kHz file, resampled
    assert all(e["audio"].dtype == np.float32 for e in examples)

    halves = [pipeline.load_eval_set(ds_cfg, process_index=i, process_count=2)[0] for i in (0, 1)]
    ids = [{e["id"] for e in h} for h in halves]
    assert not ids[0] & ids[1] and ids[0] | ids[1] == {"m0", "m1", "m2", "m3"}
    assert [e["id"] for e in pipeline.load_eval_set(ds_cfg, max_examples=2)[0]] == ["m0", "m1"]


def test_eval_set_with_nothing_usable_raises(tmp_path):
    (tmp_path / "junk.wav").write_bytes(b"RIFF junk")
    manifest = tmp_path / "eval.tsv"
    manifest.write_text("audio\ttext\nnot_there.wav\thello\njunk.wav\tworld\n")
    with pytest.raises(RuntimeError, match=r"none of 2 examples.*audio_missing"):
        pipeline.load_eval_set(pipeline.dataset_config(source="manifest", path=str(manifest)))


def test_config_errors(records_dir, targets):
    with pytest.raises(ValueError, match="text_buckets"):
        pipeline.build_train_iter(_config({"t": _rec(records_dir, kind="text")}), targets, n_mels=80)
    with pytest.raises(ValueError, match="not divisible"):
        pipeline.build_train_iter(_config({"a": _rec(records_dir)}, batch_size=5), targets, n_mels=80,
                                  process_count=2)
    with pytest.raises(ValueError, match="unknown dataset kind"):
        pipeline.build_train_iter(_config({"a": _rec(records_dir, kind="video")}), targets, n_mels=80)
    assert list(itertools.islice(pipeline.component_names(_config({"b": {}, "a": {}})), 2)) == ["a", "b"]
