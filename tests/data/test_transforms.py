"""Per-example transforms (`jaxasr.data.transforms`) and sources (`jaxasr.data.sources`), one by one."""

from __future__ import annotations

import pickle

import grain
import numpy as np
import pytest
import soxr

from jaxasr.audio import augment
from jaxasr.audio.features import N_FRAMES, log_mel_numpy
from jaxasr.data import sources as S
from jaxasr.data import transforms as T
from jaxasr.data.errors import DataError
from jaxasr.data.pipeline import example_dataset
from jaxasr.data.records import encode_record, decode_record

SR = 16000


def _decoded(clip, i=0):
    return {"id": f"c{i}", "audio": clip.audio.copy(), "sample_rate": SR, "text": clip.text}


def _rng(seed=0):
    return np.random.default_rng(seed)


def test_decode_flac_record_and_resample_raw_samples(speech_clips):
    clip = speech_clips[0]
    ex = T.DecodeAudio().map(decode_record(encode_record({"audio": clip.audio, "sample_rate": SR, "text": "x"})))
    assert ex["sample_rate"] == SR and "audio_bytes" not in ex and ex["audio"].dtype == np.float32
    np.testing.assert_allclose(ex["audio"], clip.audio, atol=1.5 / 32768)  # FLAC 16 bit is lossless here

    low = soxr.resample(clip.audio, SR, 8000)
    pcm = np.round(low * 32767).astype(np.int16)
    ex = T.DecodeAudio().map({"id": "low", "audio": pcm, "sample_rate": 8000, "text": "x"})
    assert abs(len(ex["audio"]) - len(clip.audio)) <= 2  # 8 kHz -> 16 kHz doubles the samples
    # Band-limited speech survives the round trip: strongly correlated with the original.
    n = min(len(ex["audio"]), len(clip.audio))
    assert np.corrcoef(ex["audio"][:n], clip.audio[:n])[0, 1] > 0.95


def test_decode_bad_examples_become_markers(speech_clips):
    clip = speech_clips[0]
    decode = T.DecodeAudio()
    cases = {
        "audio_empty": {"audio": np.zeros(0, np.float32), "sample_rate": SR},
        "audio_nonfinite": {"audio": np.full(100, np.nan, np.float32), "sample_rate": SR},
        "sample_rate": {"audio": clip.audio, "sample_rate": 0},
        "audio_too_long": {"audio": np.zeros(31 * SR, np.float32), "sample_rate": SR},
        "audio_undecodable": {"audio_bytes": b"RIFF....WAVEfmt nonsense"},
    }
    for reason, ex in cases.items():
        out = decode.map({"id": reason, "text": "x", **ex})
        assert T.skipped(out) and out["skip"] == reason and out["id"] == reason, out
    # Declared 8 kHz over a 16 kHz FLAC: metadata and audio disagree.
    rec = decode_record(encode_record({"audio": clip.audio, "sample_rate": SR, "text": "x"}))
    assert decode.map({**rec, "sample_rate": 8000})["skip"] == "sample_rate"
    # Long clips pass when a later step (multi-scale, long-form eval) handles them.
    assert not T.skipped(T.DecodeAudio(max_seconds=None).map({"id": "l", **cases["audio_too_long"]}))
    # A marker passes every later step untouched.
    marker = {"skip": "audio_empty", "message": "m", "id": "z"}
    assert T.LogMel().map(marker) is marker and T.Gain(prob=1.0).random_map(marker, _rng()) is marker


def test_every_bad_record_skipped_for_its_reason(bad_records_dir, bad_reasons, targets):
    """The fixture's truncated/random/zero-length/NaN/empty-text/non-UTF-8/bad-rate/over-long/garbage
    records each end as a marker with the expected reason; the 3 good ones come through."""
    ds = example_dataset(S.make_source({"source": "arrayrecord", "path": str(bad_records_dir)}), kind="audio",
                         targets=targets, n_mels=80, seed=0, shuffle=False, repeat=False)
    out = [ds[i] for i in range(len(ds))]
    assert [ex.get("skip") for ex in out] == [None] * 3 + list(bad_reasons.values())
    assert [ex["id"] for ex in out[3:-1]] == list(bad_reasons)[:-1]


def test_manifest_source_reads_lazily_and_resolves_paths(manifest_path, speech_clips):
    source = S.ManifestSource(manifest_path)
    assert len(source) == 8 and all("audio_bytes" not in r for r in source.rows)
    ex = source[0]  # relative path, resolved against the manifest's folder
    assert ex["id"] == "m0" and ex["text"] == speech_clips[0].text and ex["audio_bytes"][:4] == b"RIFF"
    assert source[3]["audio_bytes"][:4] == b"RIFF"  # absolute path
    with pytest.raises(DataError) as err:
        source[4]
    assert err.value.reason == "audio_missing" and "missing.wav" in str(err.value)
    assert S.make_source({"source": "manifest", "path": str(manifest_path)})[4]["skip"] == "audio_missing"


def test_speed_perturb(speech_clips):
    ex = _decoded(speech_clips[1])
    fast = T.SpeedPerturb(factors=(1.1,), prob=1.0).random_map(ex, _rng())
    assert abs(len(fast["audio"]) - len(ex["audio"]) / 1.1) < 5
    assert T.SpeedPerturb(factors=(1.1,), prob=0.0).random_map(ex, _rng()) is ex
    picks = {len(T.SpeedPerturb().random_map(ex, _rng(s))["audio"]) for s in range(20)}
    assert len(picks) == 3  # 0.9, 1.0 and 1.1 all drawn


def test_add_noise_hits_the_snr(speech_clips):
    ex = _decoded(speech_clips[2])
    for exponent in (0.0, 2.0):
        out = T.AddNoise(prob=1.0, snr_db=(10.0, 10.0), exponents=(exponent,)).random_map(ex, _rng(3))
        noise = out["audio"].astype(np.float64) - ex["audio"]
        snr = 10 * np.log10(np.mean(ex["audio"].astype(np.float64) ** 2) / np.mean(noise**2))
        assert abs(snr - 10.0) < 0.1, (exponent, snr)
    assert T.AddNoise(prob=0.0).random_map(ex, _rng()) is ex


def test_coloured_noise_comes_from_seamless_seeded_loops(speech_clips):
    ex = _decoded(speech_clips[2])
    noise = T.AddNoise(prob=1.0, snr_db=(10.0, 10.0), exponents=(2.0,), loops=3)
    a, b = noise.random_map(ex, _rng(5)), noise.random_map(ex, _rng(5))
    np.testing.assert_array_equal(a["audio"], b["audio"])  # a seed fixes loop, window and level
    assert not np.array_equal(a["audio"], noise.random_map(ex, _rng(6))["audio"])
    loop = T._noise_loop(2.0, 1)
    assert loop is T._noise_loop(2.0, 1) and not loop.flags.writeable  # generated once per process
    assert len(loop) == T.NOISE_LOOP_SAMPLES and not np.array_equal(loop, T._noise_loop(2.0, 2))
    # made in the FFT domain, so periodic: the step from the last sample to the first is as
    # small as brown noise's steps inside the loop (a cut would be a jump of ~RMS size)
    steps = np.abs(np.diff(loop))
    assert abs(loop[0] - loop[-1]) < np.quantile(steps, 0.999)


def test_gain(speech_clips):
    ex = _decoded(speech_clips[3])
    out = T.Gain(prob=1.0, gain_db=(-6.0, -6.0)).random_map(ex, _rng())
    np.testing.assert_allclose(out["audio"], ex["audio"] * 10 ** (-6 / 20), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel(speech_clips, n_mels):
    ex = _decoded(speech_clips[0])
    out = T.LogMel(n_mels).map(ex)
    assert out["features"].shape == (n_mels, N_FRAMES) and out["features"].dtype == np.float32
    assert out["valid_frames"] == len(ex["audio"]) // 160 and "audio" not in out
    np.testing.assert_array_equal(out["features"], log_mel_numpy(ex["audio"], n_mels))


def test_spec_augment_masks_only_real_frames(speech_clips):
    ex = T.LogMel(80).map(_decoded(speech_clips[0]))
    out = T.SpecAugment(num_freq_masks=2, freq_mask_width=27, time_mask_ratio=0.2).random_map(ex, _rng(1))
    changed = out["features"] != ex["features"]
    valid = ex["valid_frames"]
    assert changed[:, :valid].any() and not changed[:, valid:].any()
    again = T.SpecAugment(num_freq_masks=2, freq_mask_width=27, time_mask_ratio=0.2).random_map(ex, _rng(1))
    np.testing.assert_array_equal(again["features"], out["features"])


def test_log_mel_spec_augment_in_one_step_is_the_two_steps(speech_clips):
    ex = _decoded(speech_clips[0])
    audio = ex["audio"].copy()
    spec = T.SpecAugment(num_freq_masks=2, freq_mask_width=27, time_mask_ratio=0.2)
    two = spec.random_map(T.LogMel(80).map(ex), _rng(4))
    one = T.LogMelSpecAugment(T.LogMel(80), spec).random_map(ex, _rng(4))
    np.testing.assert_array_equal(one["features"], two["features"])
    assert one["valid_frames"] == two["valid_frames"] and "audio" not in one
    np.testing.assert_array_equal(ex["audio"], audio)  # the input example is left alone
    marker = {"skip": "audio_empty", "message": "m", "id": "x"}
    assert T.LogMelSpecAugment(T.LogMel(80), spec).random_map(marker, _rng()) is marker


def test_encoded_examples_skip_the_audio_steps():
    ex = {"id": "e", "encoded": np.ones((1500, 8), np.float16), "text": "hello"}
    for step in (T.DecodeAudio(), T.LogMel(80), T.LimitDuration()):
        assert step.map(ex) is ex
    assert T.SpecAugment().random_map(ex, _rng()) is ex and T.SpeedPerturb().random_map(ex, _rng()) is ex


def test_tokenize_round_trips_and_counts_long_labels(targets):
    text = "Take the amoxicillin twice daily with food."
    out = T.Tokenize(targets).map({"id": "t", "text": f"  {text}\n"})
    labels = out["labels"][out["loss_mask"] > 0]
    assert targets.tokenizer.decode(labels, skip_special_tokens=True).strip() == text
    assert out["labels"].dtype == np.int32 and len(out["decoder_input_ids"]) == len(out["labels"])
    np.testing.assert_array_equal(out["decoder_input_ids"][1:], out["labels"][:-1])
    assert T.Tokenize(targets, max_tokens=5).map({"id": "t", "text": text})["skip"] == "label_too_long"
    assert T.Tokenize(targets).map({"id": "t", "text": b"\xff\xfe"})["skip"] == "text_not_utf8"
    assert T.CleanText().map({"id": "t", "text": " \t"})["skip"] == "text_empty"


def test_text_only_corrupts_input_not_target(targets):
    text = "The patient reported chest pain and shortness of breath."
    ex = {"id": "x1", "text": text, "audio": np.zeros(10)}
    out = T.TextOnly(targets, seed=3).map(ex)
    assert "audio" not in out
    clean = targets.encode_text_only(text)
    assert not np.array_equal(out["text_tokens"], clean)  # corrupted input...
    np.testing.assert_array_equal(out["labels"], T.Tokenize(targets).map({"text": text})["labels"])  # ...clean target
    np.testing.assert_array_equal(T.TextOnly(targets, seed=3).map(ex)["text_tokens"], out["text_tokens"])
    assert T.TextOnly(targets, max_text_tokens=3).map(ex)["skip"] == "text_too_long"


def test_multiscale_concatenates_whole_utterances(speech_clips):
    parent = grain.MapDataset.source([_decoded(c, i) for i, c in enumerate(speech_clips)])
    ms = T.MultiScale(parent, seed=0, scales=(20.0,), prob=1.0, gap_seconds=0.2)
    gap = np.zeros(int(0.2 * SR), np.float32)
    for index in (0, 5, 11):  # 11: the neighbours wrap around to the start
        out = ms[index]
        parts = int(out["id"].split("+")[1]) + 1
        assert parts >= 3  # 2-6 s clips, target 16-24 s
        chosen = [speech_clips[(index + k) % len(speech_clips)] for k in range(parts)]
        assert out["text"] == " ".join(c.text for c in chosen)  # transcripts whole and aligned
        expected = np.concatenate([x for c in chosen for x in (gap, c.audio)][1:])
        np.testing.assert_array_equal(out["audio"], expected)
        assert len(out["audio"]) / SR <= 24.0 + 1e-6
        assert ms[index]["text"] == out["text"]  # seeded per index: deterministic
    assert T.MultiScale(parent, seed=0, prob=0.0)[3] is parent[3]


_READS: list[str] = []


class _CountReads(grain.transforms.Map):
    def map(self, ex):
        _READS.append(ex["id"])
        return ex


def test_multiscale_reads_each_neighbour_once_and_outputs_the_same(speech_clips):
    parent = grain.MapDataset.source([_decoded(c, i) for i, c in enumerate(speech_clips)]).map(_CountReads())
    ms = T.MultiScale(parent, seed=0, scales=(20.0,), prob=1.0)
    _READS.clear()
    in_order = [ms[i] for i in range(12)]
    # Indices 0 .. 11 and 11's neighbours (wrapping into the next epoch's order), including the
    # first that did not fit, each read once; without the cache every example re-reads ~5.
    parts = [int(ex["id"].split("+")[1]) + 1 for ex in in_order]
    assert min(parts) >= 3 and len(_READS) == 12 + parts[11]
    # A copy without the cache (pickled), read backwards so nothing is reused: the same examples.
    fresh = pickle.loads(pickle.dumps(ms))
    assert not fresh._recent
    for i in reversed(range(12)):
        out = fresh[i]
        assert out["id"] == in_order[i]["id"] and out["text"] == in_order[i]["text"]
        np.testing.assert_array_equal(out["audio"], in_order[i]["audio"])


def test_multiscale_scales_vary_and_respect_30s(speech_clips):
    parent = grain.MapDataset.source([_decoded(c, i) for i, c in enumerate(speech_clips)])
    ms = T.MultiScale(parent, seed=1, scales=(5.0, 30.0), prob=1.0, max_parts=12)
    lengths = [len(ms[i]["audio"]) / SR for i in range(12)]
    assert max(lengths) <= 30.0 and max(lengths) > 15.0 and min(lengths) < 8.0


def test_random_steps_are_seeded(speech_clips):
    ds = grain.MapDataset.source([_decoded(c, i) for i, c in enumerate(speech_clips[:3])])
    a = ds.random_map(T.AddNoise(prob=1.0), seed=7)
    b = ds.random_map(T.AddNoise(prob=1.0), seed=7)
    c = ds.random_map(T.AddNoise(prob=1.0), seed=8)
    np.testing.assert_array_equal(a[1]["audio"], b[1]["audio"])
    assert not np.array_equal(a[1]["audio"], c[1]["audio"])
    assert T.derive_seed(0, "noise") != T.derive_seed(0, "speed")


def test_make_source_config(records_dir, small_records_dir):
    both = S.make_source({"source": "arrayrecord", "path": f"{records_dir},{small_records_dir}"})
    assert len(both) == 16 and both[12]["id"] == "clip00"  # the lists' order: second dataset after the first
    assert S._fields("librispeech") == "librispeech" and S._fields("") is None
    assert S._fields("audio=speech,text=sentence") == {"audio": "speech", "text": "sentence"}
    for bad in ({"source": "s3"}, {"source": "manifest"}, {"source": "tfds"}):
        with pytest.raises(ValueError):
            S.make_source(bad)
