"""TFDS datasets through `TfdsSource`: build a tiny audio dataset without TensorFlow, read it back."""

from __future__ import annotations

import importlib.util
import pickle

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from jaxasr.data.tfds_source import FIELD_PRESETS, TfdsSource, _samples, allow_audio_without_tensorflow  # noqa: E402

SR = 16000
TEXTS = ["Hello there.", "Straße und café.", "Take two tablets.", "Transfer the money."]


def _builder_class(clips):
    allow_audio_without_tensorflow()  # Audio() needs it without TF (tensorflow/datasets#11233)

    class JaxasrTinySpeech(tfds.core.GeneratorBasedBuilder):
        """Librispeech-shaped: int16 speech, text, int64 speaker, string id."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            # DatasetInfo directly: dataset_info_from_configs wants a package folder with metadata.
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "speech": tfds.features.Audio(sample_rate=SR, dtype=np.int16),
                    "text": tfds.features.Text(),
                    "speaker_id": np.int64,
                    "id": np.str_,
                }),
            )  # fmt: skip

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, (clip, text) in enumerate(zip(clips, TEXTS)):
                pcm = np.round(clip.audio * 32767).astype(np.int16)
                yield i, {"speech": pcm, "text": text, "speaker_id": 100 + i, "id": f"utt{i}"}

    return JaxasrTinySpeech


@pytest.fixture(scope="module")
def tiny_tfds(speech_clips, tmp_path_factory):
    clips = speech_clips[:4]
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = _builder_class(clips)(data_dir=str(data_dir))
    builder.download_and_prepare(file_format="array_record")
    return data_dir, clips


def test_tfds_source_reads_built_dataset(tiny_tfds):
    data_dir, clips = tiny_tfds
    assert list(data_dir.glob("jaxasr_tiny_speech/1.0.0/*.array_record-*"))
    src = TfdsSource("jaxasr_tiny_speech", split="train", data_dir=data_dir, fields="librispeech", domain="demo")
    assert len(src) == 4 and src.sample_rate == SR
    by_id = {src[i]["id"]: src[i] for i in range(len(src))}  # TFDS shuffles by key hash
    for i, clip in enumerate(clips):
        ex = by_id[f"utt{i}"]
        assert ex["text"].decode("utf-8") == TEXTS[i]
        assert ex["speaker"] == str(100 + i) and ex["domain"] == "demo" and ex["language"] == ""
        assert ex["sample_rate"] == SR and ex["audio"].dtype == np.int16
        np.testing.assert_array_equal(ex["audio"], np.round(clip.audio * 32767).astype(np.int16))
        assert ex["duration"] == pytest.approx(len(clip.audio) / SR)
    # Grain pickles sources into its workers.
    again = pickle.loads(pickle.dumps(src))
    assert again[0]["id"] == src[0]["id"] and len(again.__getitems__([0, 3])) == 2


def test_tfds_source_field_errors(tiny_tfds):
    data_dir, _ = tiny_tfds
    with pytest.raises(ValueError, match="no field preset"):
        TfdsSource("jaxasr_tiny_speech", data_dir=data_dir)  # name has no preset
    with pytest.raises(ValueError, match="no features"):
        TfdsSource("jaxasr_tiny_speech", data_dir=data_dir, fields={"audio": "speech", "text": "sentence"})
    assert FIELD_PRESETS["common_voice"]["text"] == "sentence"


def test_samples_conversion():
    assert _samples(np.array([1, -2, 3], np.int64)).dtype == np.int16  # TFDS's default int64 PCM
    wide = _samples(np.array([2**30, -(2**30)], np.int32))
    np.testing.assert_allclose(wide, [0.5, -0.5])
    stereo = _samples(np.array([[0.5, -0.5], [1.0, 0.0]], np.float32))
    np.testing.assert_allclose(stereo, [0.0, 0.5])


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None, reason="TensorFlow installed")
def test_tfds_audio_needs_patch_without_tf():
    """Guards the workaround: if a TFDS upgrade fixes #11233, this fails and the patch can go."""
    import subprocess
    import sys

    code = "import numpy as np, tensorflow_datasets as tfds; tfds.features.Audio(sample_rate=16000, dtype=np.int16)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0 and "No module named 'tensorflow'" in proc.stderr
