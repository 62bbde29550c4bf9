"""Random-access sources of raw examples, one per configured dataset.

A raw example is a dict with ``id``, ``text`` (str, or bytes when it is not valid UTF-8),
``domain``, ``language``, ``speaker``, ``duration`` and the audio as either ``audio_bytes`` (an
encoded file) or ``audio`` + ``sample_rate`` (samples). Precomputed encoder outputs come as
``encoded`` instead. A source never raises for one bad example: it returns a skip marker
(`jaxasr.data.errors.skip_marker`) that the pipeline counts by reason.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxasr.data.errors import DataError, skip_marker

__all__ = ["InMemorySource", "ManifestSource", "SafeSource", "make_source"]

Example = dict[str, Any]


class SafeSource:
    """Wraps a source so that a DataError for one index (e.g. a corrupt record) becomes a marker."""

    def __init__(self, source: Any, name: str = ""):
        self.source, self.name = source, name

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Example:
        try:
            return self.source[index]
        except DataError as e:
            return skip_marker(e, f"{self.name}[{index}]")

    def __repr__(self) -> str:
        return f"SafeSource({self.source!r})"


class InMemorySource:
    """A list of raw examples (tests, precomputed encoder outputs)."""

    def __init__(self, examples: Sequence[Example]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


class ManifestSource:
    """A JSONL/TSV/CSV manifest (see `jaxasr.data.prepare.read_manifest`); the audio file's bytes
    are read in `__getitem__`, so only the rows are held in memory. Relative audio paths are
    resolved against the manifest's folder; a missing file is DataError("audio_missing")."""

    def __init__(self, path: str | os.PathLike):
        from jaxasr.data.prepare import read_manifest

        self.path = Path(path)
        self.base = self.path.resolve().parent
        self.rows = read_manifest(self.path)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Example:
        row = self.rows[index]
        audio = row["audio"] if isinstance(row["audio"], str) else os.fsdecode(row["audio"])
        path = Path(audio) if Path(audio).is_absolute() else self.base / audio
        example = {k: v for k, v in row.items() if k != "audio"}
        try:
            example["audio_bytes"] = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise DataError("audio_missing", f"{row['id']}: cannot read {path} ({e.strerror})") from None
        return example

    def __repr__(self) -> str:
        return f"ManifestSource({str(self.path)!r}, {len(self)} rows)"


def make_source(ds_cfg: Mapping[str, Any]) -> SafeSource:
    """The source a dataset config names (``source``: 'arrayrecord', 'manifest' or 'tfds').

    arrayrecord: ``path`` is a shard, a folder of shards, a glob, or a comma-separated list.
    manifest: ``path`` is the manifest file. tfds: ``tfds_name``, ``split``, ``data_dir`` and
    ``fields`` (a preset name or 'key=feature,key=feature'; empty: the preset named like the
    dataset)."""
    kind = ds_cfg.get("source", "arrayrecord")
    path = str(ds_cfg.get("path", "") or "")
    if kind == "arrayrecord":
        from jaxasr.data.records import ArrayRecordSource

        if not path:
            raise ValueError("an 'arrayrecord' dataset needs `path`")
        source = ArrayRecordSource([p for p in path.split(",") if p] if "," in path else path)
    elif kind == "manifest":
        if not path:
            raise ValueError("a 'manifest' dataset needs `path`")
        source = ManifestSource(path)
    elif kind == "tfds":
        from jaxasr.data.tfds_source import TfdsSource

        name = ds_cfg.get("tfds_name", "")
        if not name:
            raise ValueError("a 'tfds' dataset needs `tfds_name`")
        source = TfdsSource(name, split=ds_cfg.get("split", "train") or "train",
                            data_dir=ds_cfg.get("data_dir", "") or None, fields=_fields(ds_cfg.get("fields", "")))
    else:
        raise ValueError(f"unknown source {kind!r}; expected 'arrayrecord', 'manifest' or 'tfds'")
    return SafeSource(source, path or ds_cfg.get("tfds_name", ""))


def _fields(value: Any) -> str | dict[str, str] | None:
    if not value:
        return None
    if isinstance(value, Mapping):
        return dict(value)
    value = str(value)
    if "=" not in value:
        return value  # a preset name
    return dict(item.split("=", 1) for item in value.split(",") if item)
