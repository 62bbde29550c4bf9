"""TFDS speech datasets as raw-example sources, read with `tfds.data_source` (no TensorFlow).

The dataset must already be prepared in the ``array_record`` file format (e.g. with
``tfds build --file_format=array_record`` on a machine that has TensorFlow, or by a
`GeneratorBasedBuilder` as in the tests). A field mapping names which feature holds the
audio, the transcript and the metadata; `FIELD_PRESETS` has the common ones.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["FIELD_PRESETS", "TfdsSource", "allow_audio_without_tensorflow"]

# Raw-example key → TFDS feature name. "audio" and "text" are required; the others are optional.
FIELD_PRESETS: dict[str, dict[str, str]] = {
    "librispeech": {"audio": "speech", "text": "text", "speaker": "speaker_id", "id": "id"},
    "common_voice": {"audio": "voice", "text": "sentence", "speaker": "client_id"},
    "tedlium": {"audio": "speech", "text": "text", "speaker": "speaker_id", "id": "id"},
    "vctk": {"audio": "speech", "text": "text", "speaker": "speaker", "id": "id"},
    "ljspeech": {"audio": "speech", "text": "text_normalized", "id": "id"},
    "xtreme_s": {"audio": "audio", "text": "transcription", "id": "id", "language": "language"},
}
_KEYS = ("audio", "text", "id", "domain", "language", "speaker")


def allow_audio_without_tensorflow() -> None:
    """Let ``tfds.features.Audio`` be built when TensorFlow is not installed.

    tensorflow-datasets 4.9.10 converts the numpy dtype to a ``tf.DType`` in
    ``_AudioDecoder.__init__`` and in ``Audio.to_json_content``, so any dataset with an audio
    feature (librispeech...) fails with ``No module named 'tensorflow'`` both when it is read
    through `tfds.data_source` and when it is built (tensorflow/datasets#11233). Neither value
    is needed on the numpy path, so we replace those two methods with TF-free ones. Does
    nothing when TensorFlow is importable; safe to call repeatedly.
    """
    if importlib.util.find_spec("tensorflow") is not None:
        return
    from tensorflow_datasets.core.features import audio_feature
    from tensorflow_datasets.core.features import feature as feature_lib
    from tensorflow_datasets.core.proto import feature_pb2

    if getattr(audio_feature, "_jaxasr_no_tf", False):
        return

    def decoder_init(self, file_format, np_dtype, shape):
        self._file_format = file_format
        self._np_dtype = np_dtype
        self._dtype = np_dtype  # only the TF decode path reads it, and that needs TF anyway
        self._shape = shape
        self._channels = shape[1] if len(shape) > 1 else 1

    def to_json_content(self):
        return feature_pb2.AudioFeature(
            shape=feature_lib.to_shape_proto(self.shape),
            dtype=feature_lib.dtype_to_str(self.np_dtype),  # the original uses self.dtype (a tf.DType)
            file_format=self._file_format,
            sample_rate=self._sample_rate,
            encoding=self._encoding.name,
            lazy_decode=self._lazy_decode,
        )

    audio_feature._AudioDecoder.__init__ = decoder_init
    audio_feature.Audio.to_json_content = to_json_content
    audio_feature._jaxasr_no_tf = True


def _to_str(value: Any) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    return "" if value is None else str(value)


def _samples(audio: np.ndarray) -> np.ndarray:
    """TFDS audio array → mono int16 or float32 samples, as the raw-example contract wants.

    TFDS stores decoded PCM as integers (int64 by default, int16 when the builder says so);
    integer data inside the int16 range is 16-bit PCM and stays int16, wider integers are
    taken as 32-bit PCM. Floats pass through as float32.
    """
    audio = np.asarray(audio)
    if audio.ndim == 2:  # (samples, channels)
        audio = audio.astype(np.float32).mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]
    if np.issubdtype(audio.dtype, np.integer):
        if audio.dtype == np.int16:
            return audio
        if audio.size == 0 or (audio.min() >= -32768 and audio.max() <= 32767):
            return audio.astype(np.int16)
        return (audio.astype(np.float64) / 2**31).astype(np.float32)
    return audio.astype(np.float32, copy=False)


class TfdsSource:
    """A TFDS split (array_record format) as a Grain random-access source of raw examples.

    ``fields`` is a `FIELD_PRESETS` name or a mapping like ``{"audio": "speech", "text":
    "text", "speaker": "speaker_id"}``; default: the preset named like the dataset
    (``"librispeech/clean100"`` → "librispeech"). ``domain``/``language`` fill those keys
    when the dataset has no such feature. ``download=False`` by default: preparing most
    speech datasets needs TensorFlow (and Beam), which this stack does not install.
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        data_dir: str | os.PathLike | None = None,
        fields: str | Mapping[str, str] | None = None,
        domain: str = "",
        language: str = "",
        builder_kwargs: dict[str, Any] | None = None,
        download: bool = False,
    ):
        if fields is None:
            fields = name.split("/")[0].split(":")[0]
        if isinstance(fields, str):
            if fields not in FIELD_PRESETS:
                raise ValueError(f"no field preset {fields!r}; pass a mapping or one of {sorted(FIELD_PRESETS)}")
            fields = FIELD_PRESETS[fields]
        fields = dict(fields)
        unknown = set(fields) - set(_KEYS)
        if unknown or not {"audio", "text"} <= set(fields):
            raise ValueError(f"fields need 'audio' and 'text' and may have {_KEYS}; got {sorted(fields)}")
        self.name, self.split, self.fields = name, split, fields
        self.data_dir = None if data_dir is None else os.fspath(data_dir)
        self.domain, self.language = domain, language
        self.builder_kwargs, self.download = builder_kwargs, download
        self._source = None
        self._open()

    def _open(self) -> None:
        import tensorflow_datasets as tfds

        allow_audio_without_tensorflow()
        self._source = tfds.data_source(
            self.name, split=self.split, data_dir=self.data_dir, download=self.download,
            builder_kwargs=self.builder_kwargs,
        )  # fmt: skip
        features = self._source.dataset_info.features
        audio_feature = features[self.fields["audio"]]
        missing = [f for f in self.fields.values() if f not in features]
        if missing:
            raise ValueError(f"{self.name} has no features {missing}; it has {sorted(features.keys())}")
        # The rate is metadata on tfds.features.Audio; some builders leave it unset.
        self.sample_rate = int(getattr(audio_feature, "sample_rate", None) or 0)
        self._lazy = bool(getattr(audio_feature, "_lazy_decode", False))  # encoded bytes, not samples
        if not self.sample_rate and not self._lazy:
            raise ValueError(f"{self.name}: audio feature {self.fields['audio']!r} declares no sample_rate")

    # Grain sends sources to worker processes by pickling: reopen there rather than pickle TFDS
    # objects (whose unpickling would need the no-TF patch applied before it runs).
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_source"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._convert(self._source[index], index)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self._convert(r, i) for r, i in zip(self._source.__getitems__(indices), indices)]

    def _convert(self, record: Mapping[str, Any], index: int) -> dict[str, Any]:
        f = self.fields
        text = record[f["text"]]
        example: dict[str, Any] = {
            # bytes: TFDS Text features arrive undecoded and the pipeline checks the UTF-8.
            "text": bytes(text) if isinstance(text, (bytes, np.bytes_)) else _to_str(text),
            "id": _to_str(record[f["id"]]) if "id" in f else f"{self.name}/{self.split}/{index}",
            "domain": _to_str(record[f["domain"]]) if "domain" in f else self.domain,
            "language": _to_str(record[f["language"]]) if "language" in f else self.language,
            "speaker": _to_str(record[f["speaker"]]) if "speaker" in f else "",
        }
        audio = record[f["audio"]]
        if self._lazy:
            example["audio_bytes"] = bytes(audio)
            example["duration"] = math.nan
        else:
            samples = _samples(audio)
            example["audio"] = samples
            example["sample_rate"] = self.sample_rate
            example["duration"] = len(samples) / self.sample_rate
        return example

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} examples, {self.sample_rate} Hz)"
