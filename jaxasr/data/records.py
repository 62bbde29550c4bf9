"""The jaxasr ArrayRecord record format: one speech example per record.

Layout of one record (all integers little-endian)::

    b"JXA1"                  magic; the trailing "1" is the format version
    uint32  header_len
    header  header_len bytes of UTF-8 JSON, keys:
              id, domain, language, speaker: str
              duration: float seconds, or null when unknown
              codec: "flac" | "pcm16" | "file"
              sample_rate: int, num_samples: int (0 for "file": unknown until decoded)
              text_len: int, text_utf8: bool (false: the text bytes were never valid UTF-8)
              audio_len: int
    text    text_len bytes (UTF-8 when text_utf8)
    audio   audio_len bytes: a FLAC file ("flac", 16 bit), raw int16 little-endian samples
            ("pcm16", mono), or any encoded file stored as given ("file")

`decode_record` returns a raw example (the contract between sources and the pipeline):
"flac"/"file" give ``audio_bytes``, "pcm16" gives ``audio`` (int16) plus ``sample_rate``.
Text and audio live outside the JSON so that arbitrary bytes survive and nothing is escaped.
"""

from __future__ import annotations

import glob
import io
import json
import math
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from jaxasr.data.errors import DataError

__all__ = [
    "CODECS",
    "MAGIC",
    "ArrayRecordSource",
    "decode_record",
    "encode_record",
    "find_shards",
    "shard_name",
    "write_shards",
]

MAGIC = b"JXA1"
CODECS = ("flac", "pcm16", "file")
_LEN = struct.Struct("<I")
_META = ("id", "domain", "language", "speaker")


def _to_int16(audio: np.ndarray) -> np.ndarray:
    """Mono int16 samples; float input is taken as [-1, 1) full scale and clipped."""
    audio = np.asarray(audio)
    if audio.ndim == 2:  # (samples, channels): mix down, the pipeline wants mono
        audio = audio.astype(np.float32).mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]
    if audio.ndim != 1:
        raise ValueError(f"audio must be 1-D (or samples x channels), got shape {audio.shape}")
    if audio.dtype == np.int16:
        return audio
    if np.issubdtype(audio.dtype, np.integer):
        raise ValueError(f"integer audio must be int16, got {audio.dtype}")
    if not np.isfinite(audio).all():  # NaN would turn into arbitrary integers
        raise DataError("audio_nonfinite", "audio has NaN or inf samples")
    # x 32768, as libsndfile reads int16 to float: int16 -> float -> int16 is then exact.
    return np.clip(np.round(audio.astype(np.float64) * 32768.0), -32768, 32767).astype(np.int16)


def encode_record(example: dict[str, Any], codec: str = "flac") -> bytes:
    """Serialize a raw example (``audio`` + ``sample_rate``, or ``audio_bytes``) to one record.

    ``codec`` says how samples are stored: "flac" (16-bit, lossless for int16 input),
    "pcm16" (raw int16), or "file" (``audio_bytes`` kept exactly as given, not re-encoded).
    ``audio_bytes`` with "flac"/"pcm16" is decoded at its own rate and re-encoded.
    """
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
    if ("audio" in example) == ("audio_bytes" in example):
        raise ValueError("example needs exactly one of 'audio' and 'audio_bytes'")

    sample_rate = int(example.get("sample_rate") or 0)
    num_samples = 0
    if codec == "file":
        if "audio_bytes" not in example:
            raise ValueError("codec 'file' stores 'audio_bytes' as given; this example has decoded 'audio'")
        payload = bytes(example["audio_bytes"])
    else:
        if "audio_bytes" in example:
            samples, sample_rate = sf.read(io.BytesIO(example["audio_bytes"]), dtype="int16")
        else:
            samples = example["audio"]
            if sample_rate <= 0:
                raise ValueError("example with 'audio' needs a positive 'sample_rate'")
        pcm = _to_int16(samples)
        num_samples = len(pcm)
        if codec == "pcm16":
            payload = pcm.astype("<i2").tobytes()
        else:
            buf = io.BytesIO()
            sf.write(buf, pcm, sample_rate, format="FLAC", subtype="PCM_16")
            payload = buf.getvalue()

    text = example.get("text", "")
    text_utf8 = True
    if isinstance(text, str):
        text_bytes = text.encode("utf-8", "surrogateescape")  # lone surrogates: keep the bytes
    else:
        text_bytes = bytes(text)
    try:
        text_bytes.decode("utf-8")
    except UnicodeDecodeError:
        text_utf8 = False  # kept as bytes; the pipeline counts it as text_not_utf8

    duration = example.get("duration", math.nan)
    duration = None if duration is None or not math.isfinite(float(duration)) else float(duration)
    header = {key: str(example.get(key, "") or "") for key in _META}
    header.update(
        duration=duration,
        codec=codec,
        sample_rate=sample_rate,
        num_samples=num_samples,
        text_len=len(text_bytes),
        text_utf8=text_utf8,
        audio_len=len(payload),
    )
    head = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return b"".join([MAGIC, _LEN.pack(len(head)), head, text_bytes, payload])


def decode_record(data: bytes) -> dict[str, Any]:
    """Parse one record back into a raw example; DataError("record_invalid") if it is not one."""
    data = memoryview(data)
    if bytes(data[:4]) != MAGIC:
        raise DataError("record_invalid", f"not a jaxasr record (magic {bytes(data[:4])!r}, want {MAGIC!r})")
    try:
        (head_len,) = _LEN.unpack_from(data, 4)
        start = 4 + _LEN.size
        header = json.loads(bytes(data[start : start + head_len]).decode("utf-8"))
        text_start = start + head_len
        audio_start = text_start + header["text_len"]
        audio_end = audio_start + header["audio_len"]
        codec = header["codec"]
    except (struct.error, ValueError, KeyError) as e:
        raise DataError("record_invalid", f"corrupt jaxasr record header: {e}") from e
    if audio_end != len(data) or codec not in CODECS:
        raise DataError("record_invalid", f"jaxasr record {header.get('id')!r}: bad lengths or codec")

    text_bytes = bytes(data[text_start:audio_start])
    duration = header.get("duration")
    example: dict[str, Any] = {key: header.get(key, "") for key in _META}
    example["text"] = text_bytes.decode("utf-8") if header.get("text_utf8", True) else text_bytes
    example["duration"] = math.nan if duration is None else float(duration)
    example["sample_rate"] = int(header.get("sample_rate", 0))
    payload = data[audio_start:audio_end]
    if codec == "pcm16":
        example["audio"] = np.frombuffer(payload, dtype="<i2").astype(np.int16, copy=False)  # read-only view
    else:
        example["audio_bytes"] = bytes(payload)
        if codec == "file":
            del example["sample_rate"]  # unknown until decoded: the file's own rate is used
    return example


# --------------------------------------------------------------------------- shards


def shard_name(prefix: str, index: int, num_shards: int) -> str:
    """``<prefix>-00000-of-00004.array_record``."""
    return f"{prefix}-{index:05d}-of-{num_shards:05d}.array_record"


def find_shards(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard files from a directory, a glob pattern, one file, or a list of those (sorted per entry)."""
    entries = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    found: list[str] = []
    for entry in entries:
        entry = os.fspath(entry)
        if os.path.isdir(entry):
            # Ours end in .array_record; TFDS names its files "<name>-<split>.array_record-00000-of-00001".
            hits = sorted(glob.glob(os.path.join(entry, "*.array_record*")))
        elif glob.has_magic(entry):
            hits = sorted(glob.glob(entry))
        else:
            hits = [entry] if os.path.isfile(entry) else []
        if not hits:
            raise FileNotFoundError(f"no ArrayRecord shards at {entry}")
        found += hits
    return found


class ArrayRecordSource:
    """Grain random-access source over jaxasr record shards; ``source[i]`` is a raw example.

    Shards are read in the order given (a directory or glob: sorted by name), so shards written
    by `write_shards` read back in the order their examples were written.
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike]):
        import grain

        self.paths = find_shards(paths)
        self._source = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return decode_record(self._source[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [decode_record(r) for r in self._source.__getitems__(indices)]

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self.paths)} shards, {len(self)} records)"


def write_shards(
    examples: Iterable[dict[str, Any] | bytes | None],
    out_dir: str | os.PathLike,
    num_shards: int = 1,
    prefix: str = "data",
    codec: str = "flac",
    total: int | None = None,
) -> list[dict[str, Any]]:
    """Write examples (raw dicts or encoded records; ``None`` = skipped) into ``num_shards`` files.

    The i-th item of ``examples`` goes to shard ``i * num_shards // total``, so the shards hold
    contiguous runs and read back in input order. ``total`` is ``len(examples)`` when it has a
    length; a plain iterator without ``total`` is read into memory first. Shards left empty
    (every item in their range was None) are dropped and the rest renamed ``-of-<kept>``.
    Returns ``[{"path", "num_examples"}]`` per written shard.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if total is None:
        if not hasattr(examples, "__len__"):
            examples = list(examples)
        total = len(examples)  # type: ignore[arg-type]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    num_shards = max(1, min(num_shards, total))
    tmp_paths = [out_dir / (shard_name(prefix, i, num_shards) + ".tmp") for i in range(num_shards)]
    counts = [0] * num_shards
    writer, current = None, -1
    try:
        for i, item in enumerate(examples):
            if i >= total:
                raise ValueError(f"more than total={total} examples")
            shard = i * num_shards // total
            if shard != current:
                if writer is not None:
                    writer.close()
                # group_size:1 makes every record its own chunk: fast random access (as TFDS does).
                # Uncompressed: FLAC is compressed already, and raw PCM is the codec for speed
                # (its default zstd saved 22% of a PCM shard but cost 0.3 ms a read).
                writer = ArrayRecordWriter(str(tmp_paths[shard]), "group_size:1,uncompressed")
                current = shard
            if item is None:
                continue
            writer.write(item if isinstance(item, bytes) else encode_record(item, codec))
            counts[shard] += 1
    finally:
        if writer is not None:
            writer.close()

    kept = [i for i in range(num_shards) if counts[i] > 0]
    shards = []
    for new_index, i in enumerate(kept):
        path = out_dir / shard_name(prefix, new_index, len(kept))
        os.replace(tmp_paths[i], path)
        shards.append({"path": str(path), "num_examples": counts[i]})
    for i in range(num_shards):
        if counts[i] == 0:
            tmp_paths[i].unlink(missing_ok=True)
    return shards
