"""The host pipeline: sources -> per-example transforms -> mixed, fixed-shape NumPy batches.

    component datasets (MapDataset: this process's shard, shuffled per epoch, repeated)
      -> decode -> multi-scale crop/concat -> speed, noise, gain -> log-mel -> SpecAugment -> tokens
      -> MixedBatches: exact rows per component in every batch, bad examples skipped and counted
      -> optional worker processes (Grain mp_prefetch)

Every batch is a dict of arrays with fixed shapes (labels padded to one of a few length buckets)
plus `skipped`: how many examples were dropped while assembling it, by reason. Summing `skipped`
over batches gives exact totals, also with several worker processes.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from jaxasr.audio import augment
from jaxasr.audio.features import N_FRAMES, SAMPLE_RATE
from jaxasr.data import transforms as T
from jaxasr.data.mixing import batch_plan, exact_counts
from jaxasr.data.text import WhisperTargets

Example = dict[str, Any]


class MultiScale(grain.MapDataset):
    """Multi-scale temporal transform: with probability `prob`, draw a target length from
    `scales` (seconds, up to 30) and concatenate whole utterances (this one and the next ones in
    shuffled order) with their transcripts until it is reached. Seeded per index, so it is
    deterministic and resumable. Transcripts are never cut: cropping only whole utterances keeps
    audio and text aligned."""

    def __init__(self, parent: grain.MapDataset, *, seed: int, scales: Sequence[float] = (5.0, 10.0, 20.0, 30.0),
                 prob: float = 0.5, gap_seconds: float = 0.2, max_parts: int = 8,
                 max_seconds: float = N_FRAMES / 100):
        super().__init__(parent)
        self.seed, self.scales, self.prob = seed, tuple(scales), prob
        self.gap_seconds, self.max_parts, self.max_seconds = gap_seconds, max_parts, max_seconds

    def __len__(self) -> int:
        return len(self._parent)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        first = self._parent[index]
        rng = np.random.default_rng([self.seed, index])
        if T.skipped(first) or rng.random() >= self.prob:
            return first
        target = min(augment.draw_target_seconds(rng, self.scales), self.max_seconds)
        rate = first["sample_rate"]
        audios, texts = [first["audio"]], [first["text"]]
        total = len(first["audio"]) / rate
        for k in range(1, self.max_parts):
            if total >= target:
                break
            nxt = self._parent[index + k]
            if T.skipped(nxt):
                continue
            extra = len(nxt["audio"]) / rate + self.gap_seconds
            if total + extra > min(target, self.max_seconds):
                break
            audios.append(nxt["audio"])
            texts.append(nxt["text"])
            total += extra
        if len(audios) == 1:
            return first
        audio, text = augment.concat_utterances(audios, texts, self.gap_seconds, rate)
        return {**first, "audio": audio, "text": text, "id": f"{first.get('id', '')}+{len(audios) - 1}"}


@dataclasses.dataclass(frozen=True)
class Collate:
    """Rows -> fixed-shape batch. Labels are padded to the smallest bucket that fits the longest."""

    n_mels: int
    label_buckets: Sequence[int]
    pad_id: int
    components: Sequence[str]
    text_buckets: Sequence[int] = ()

    def __call__(self, rows: Sequence[tuple[str, Example]], skipped: Mapping[str, int]) -> dict[str, Any]:
        b = len(rows)
        longest = max(len(ex["decoder_input_ids"]) for _, ex in rows)
        length = _bucket(longest, self.label_buckets, "label")
        batch = {
            "features": np.zeros((b, self.n_mels, N_FRAMES), np.float32),
            "decoder_input_ids": np.full((b, length), self.pad_id, np.int32),
            "labels": np.full((b, length), self.pad_id, np.int32),
            "loss_mask": np.zeros((b, length), np.float32),
            "is_text": np.zeros((b,), bool),
            "component": np.zeros((b,), np.int32),
        }
        if self.text_buckets:
            longest_text = max((len(ex.get("text_tokens", ())) for _, ex in rows), default=1)
            batch["text_tokens"] = np.full((b, _bucket(max(longest_text, 1), self.text_buckets, "text")),
                                           self.pad_id, np.int32)
            batch["text_mask"] = np.zeros(batch["text_tokens"].shape, bool)
        for i, (name, ex) in enumerate(rows):
            n = len(ex["decoder_input_ids"])
            batch["decoder_input_ids"][i, :n] = ex["decoder_input_ids"]
            batch["labels"][i, :n] = ex["labels"]
            batch["loss_mask"][i, :n] = ex["loss_mask"]
            batch["component"][i] = self.components.index(name)
            if "features" in ex:
                batch["features"][i] = ex["features"]
            if "text_tokens" in ex:
                batch["is_text"][i] = True
                m = len(ex["text_tokens"])
                batch["text_tokens"][i, :m] = ex["text_tokens"]
                batch["text_mask"][i, :m] = True
        batch["skipped"] = dict(skipped)
        return batch


def _bucket(n: int, buckets: Sequence[int], what: str) -> int:
    for size in sorted(buckets):
        if n <= size:
            return size
    raise ValueError(f"{what} length {n} exceeds the largest bucket {max(buckets)}")


class MixedBatches(grain.IterDataset):
    """Batches with exactly `counts[name]` rows from each component, rows shuffled per batch."""

    def __init__(self, components: Mapping[str, grain.IterDataset], counts: Mapping[str, int], collate: Collate,
                 *, seed: int, give_up_after: Mapping[str, int]):
        self.names = list(components)
        super().__init__([components[n] for n in self.names])
        self.counts, self.collate, self.seed, self.give_up_after = dict(counts), collate, seed, dict(give_up_after)

    def __iter__(self):
        return _MixedBatchIterator(self)


class _MixedBatchIterator(grain.DatasetIterator):
    def __init__(self, ds: MixedBatches):
        super().__init__([p.__iter__() for p in ds.parents])
        self._ds = ds
        self._iters = dict(zip(ds.names, self._parents))
        self._batch_index = 0
        self._failures = {n: 0 for n in ds.names}  # consecutive bad examples per component

    def __next__(self) -> dict[str, Any]:
        ds = self._ds
        rows, skipped = [], collections.Counter()
        for name in batch_plan(ds.counts, self._batch_index, ds.seed):
            while True:
                ex = next(self._iters[name])
                if not T.skipped(ex):
                    self._failures[name] = 0
                    rows.append((name, ex))
                    break
                skipped[ex["skip"]] += 1
                self._failures[name] += 1
                if self._failures[name] >= ds.give_up_after[name]:
                    raise RuntimeError(
                        f"dataset {name!r}: the last {self._failures[name]} examples all failed "
                        f"(e.g. {ex['message']}); check the data (skips so far in this batch: {dict(skipped)})")
        self._batch_index += 1
        return ds.collate(rows, skipped)

    def get_state(self) -> dict[str, Any]:
        return {"batch_index": self._batch_index, "failures": dict(self._failures),
                "components": {n: it.get_state() for n, it in self._iters.items()}}

    def set_state(self, state: dict[str, Any]) -> None:
        self._batch_index = int(state["batch_index"])
        self._failures = {n: int(v) for n, v in state["failures"].items()}
        for n, it in self._iters.items():
            it.set_state(state["components"][n])


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Which augmentations run and how (config `data.augment`)."""

    speed: T.SpeedPerturb | None = None
    noise: T.AddNoise | None = None
    gain: T.Gain | None = None
    spec_augment: T.SpecAugment | None = None
    multiscale: Mapping[str, Any] | None = None  # MultiScale keyword arguments


def example_dataset(source, *, kind: str, targets: WhisperTargets, n_mels: int, seed: int,
                    augmentation: Augmentation | None, shuffle: bool = True, repeat: bool = True,
                    process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """One component: this process's shard of `source`, transformed example by example.

    kind "audio": speech with transcripts; kind "text": transcripts only, corrupted, for
    text-only adaptation of a speech LLM.
    """
    ds = grain.MapDataset.source(source)
    if process_count > 1:
        ds = ds[process_index::process_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if kind == "text":
        ds = ds.map(T.TextOnly(targets, seed=seed))
        return ds.repeat(None) if repeat else ds
    if kind != "audio":
        raise ValueError(f"unknown dataset kind {kind!r}; expected 'audio' or 'text'")
    aug = augmentation or Augmentation()
    ds = ds.map(T.DecodeAudio(SAMPLE_RATE, max_seconds=None if aug.multiscale else N_FRAMES / 100))
    if aug.multiscale:
        ds = MultiScale(ds, seed=seed, **aug.multiscale)
        # Whole utterances longer than 30 s cannot be cropped without cutting their transcript.
        ds = ds.map(T.DecodeAudio(SAMPLE_RATE, max_seconds=N_FRAMES / 100))
    for step in (aug.speed, aug.noise, aug.gain):
        if step is not None:
            ds = ds.random_map(step, seed=seed)
    ds = ds.map(T.LogMel(n_mels))
    if aug.spec_augment is not None:
        ds = ds.random_map(aug.spec_augment, seed=seed)
    ds = ds.map(T.Tokenize(targets))
    return ds.repeat(None) if repeat else ds
