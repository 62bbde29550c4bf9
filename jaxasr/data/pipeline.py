"""The host pipeline: sources -> per-example transforms -> mixed, fixed-shape NumPy batches.

    component datasets (MapDataset: shuffled per epoch, repeated, every N-th example for process i of N)
      -> text check -> decode -> multi-scale concat -> speed, noise, gain -> log-mel -> SpecAugment
      -> tokens  (kind 'text': corrupted text tokens instead of audio; 'encoded': no audio steps)
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
import ml_collections
import numpy as np

from jaxasr.audio.features import N_FRAMES, SAMPLE_RATE
from jaxasr.data import sources as S
from jaxasr.data import transforms as T
from jaxasr.data.mixing import batch_plan, exact_counts
from jaxasr.data.shuffle import shuffle as shuffle_dataset
from jaxasr.data.text import WhisperTargets
from jaxasr.host_memory import retain_freed_memory

Example = dict[str, Any]
KINDS = ("audio", "text", "encoded")
# A component whose last this-many examples all failed is broken (or nearly all bad): stop with
# an error naming it instead of spinning through it forever.
MAX_CONSECUTIVE_SKIPS = 1000


def dataset_config(**overrides: Any) -> dict[str, Any]:
    """One entry of `data.train` with its defaults."""
    cfg = dict(source="arrayrecord", path="", tfds_name="", split="train", data_dir="", fields="",
               weight=1.0, kind="audio")
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"unknown dataset config keys {sorted(unknown)}")
    return {**cfg, **overrides}


def default_data_config() -> ml_collections.ConfigDict:
    """`config.data` defaults; `train` is filled with `dataset_config(...)` entries by name."""
    return ml_collections.ConfigDict(dict(
        batch_size=16, label_buckets=(32, 64, 128, 224), max_label_tokens=224, text_buckets=(),
        seed=0, num_workers=0, read_threads=4,
        train=dict(),
        augment=dict(speed=dict(enabled=False, factors=(0.9, 1.0, 1.1), prob=1.0),
                     noise=dict(enabled=False, prob=0.5, snr_db=(5.0, 30.0), exponents=(0.0, 1.0, 2.0), loops=8),
                     gain=dict(enabled=False, prob=0.5, gain_db=(-6.0, 6.0)),
                     spec_augment=dict(enabled=False, num_freq_masks=2, freq_mask_width=27, num_time_masks=10,
                                       time_mask_width=100, time_mask_ratio=0.05),
                     multiscale=dict(enabled=False, prob=0.5, scales=(5.0, 10.0, 20.0, 30.0), gap_seconds=0.2))))


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Which augmentations run and how (config `data.augment`)."""

    speed: T.SpeedPerturb | None = None
    noise: T.AddNoise | None = None
    gain: T.Gain | None = None
    spec_augment: T.SpecAugment | None = None
    multiscale: Mapping[str, Any] | None = None  # MultiScale keyword arguments

    @classmethod
    def from_config(cls, aug: Mapping[str, Any]) -> Augmentation:
        def on(key):
            sub = aug.get(key) if aug else None
            return {k: v for k, v in dict(sub).items() if k != "enabled"} if sub and sub.get("enabled") else None

        def tup(d, *keys):
            return d and {**d, **{k: tuple(d[k]) for k in keys if k in d}}

        speed, noise, gain = on("speed"), on("noise"), on("gain")
        spec, multi = on("spec_augment"), on("multiscale")
        return cls(speed=T.SpeedPerturb(**tup(speed, "factors")) if speed else None,
                   noise=T.AddNoise(**tup(noise, "snr_db", "exponents")) if noise else None,
                   gain=T.Gain(**tup(gain, "gain_db")) if gain else None,
                   spec_augment=T.SpecAugment(**spec) if spec else None,
                   multiscale=tup(multi, "scales"))


def example_dataset(source, *, kind: str, targets: WhisperTargets, n_mels: int, seed: int,
                    augmentation: Augmentation | None = None, shuffle: bool = True, repeat: bool = True,
                    process_index: int = 0, process_count: int = 1, max_label_tokens: int | None = None,
                    max_text_tokens: int | None = None) -> grain.MapDataset:
    """One component: this process's share of `source` (see `_process_share`), transformed example by example.

    kind "audio": speech with transcripts; "text": transcripts only, corrupted, for text-only
    adaptation of a speech LLM; "encoded": precomputed encoder outputs with transcripts.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {KINDS}")
    ds = grain.MapDataset.source(source)
    if len(ds) == 0:
        raise ValueError(f"no examples in {source!r}")
    if shuffle:
        ds = shuffle_dataset(ds, seed=T.derive_seed(seed, "shuffle"))
    ds = ds.map(T.CleanText())
    if kind == "text":
        ds = ds.map(T.TextOnly(targets, seed=seed, max_tokens=max_label_tokens, max_text_tokens=max_text_tokens))
        return _process_share(ds.repeat(None) if repeat else ds, process_index, process_count)
    aug = augmentation or Augmentation()
    if kind == "audio":
        ds = ds.map(T.DecodeAudio(SAMPLE_RATE, max_seconds=None if aug.multiscale else T.MAX_SECONDS))
        if aug.multiscale:
            ds = T.MultiScale(ds, seed=T.derive_seed(seed, "multiscale"), **aug.multiscale)
            # A single utterance over 30 s cannot be cropped without cutting its transcript.
            ds = ds.map(T.LimitDuration(T.MAX_SECONDS))
        # Each random step gets its own seed: with one seed, steps would draw the same numbers.
        for step_name in ("speed", "noise", "gain"):
            step = getattr(aug, step_name)
            if step is not None:
                ds = ds.random_map(step, seed=T.derive_seed(seed, step_name))
        if aug.spec_augment is None:
            ds = ds.map(T.LogMel(n_mels))
        else:  # one step: the masks go into the fresh features in place
            ds = ds.random_map(T.LogMelSpecAugment(T.LogMel(n_mels), aug.spec_augment),
                               seed=T.derive_seed(seed, "spec_augment"))
    ds = ds.map(T.Tokenize(targets, max_tokens=max_label_tokens))
    return _process_share(ds.repeat(None) if repeat else ds, process_index, process_count)


def _process_share(ds: grain.MapDataset, process_index: int, process_count: int) -> grain.MapDataset:
    """Every `process_count`-th example of the whole (shuffled, repeated) stream, from `process_index`.

    Sharding last, on global positions, makes the processes' batches together the very rows a single
    process would batch (same shuffle, same per-example random seeds), so the loss of a global batch
    does not depend on how many processes feed it; each process still reads only its own examples
    (the dataset is lazy: only the indices asked for are read and transformed).
    """
    return ds[process_index::process_count] if process_count > 1 else ds


@dataclasses.dataclass(frozen=True)
class Collate:
    """Rows -> fixed-shape batch. Labels (and text tokens) are padded to the smallest bucket that
    fits the longest row. Rows with `encoded` fill batch["encoded"] instead of "features"; text-only
    rows leave both at zero and set `is_text`."""

    n_mels: int
    label_buckets: Sequence[int]
    pad_id: int
    components: Sequence[str]
    text_buckets: Sequence[int] = ()

    def __call__(self, rows: Sequence[tuple[str, Example]], skipped: Mapping[str, int]) -> dict[str, Any]:
        b = len(rows)
        length = _bucket(max(len(ex["labels"]) for _, ex in rows), self.label_buckets, "label")
        batch: dict[str, Any] = {}
        encoded = [ex["encoded"] for _, ex in rows if "encoded" in ex]
        if encoded:
            batch["encoded"] = np.zeros((b, *encoded[0].shape), encoded[0].dtype)
        if any("features" in ex for _, ex in rows) or not encoded:
            # Uninitialized, then rows without features zeroed: zero-filling all of it first wrote
            # ~1 MB an example twice.
            batch["features"] = np.empty((b, self.n_mels, N_FRAMES), np.float32)
            for i, (_, ex) in enumerate(rows):
                if "features" not in ex:
                    batch["features"][i] = 0.0
        batch.update(decoder_input_ids=np.full((b, length), self.pad_id, np.int32),
                     labels=np.full((b, length), self.pad_id, np.int32),
                     loss_mask=np.zeros((b, length), np.float32),
                     is_text=np.zeros((b,), bool), component=np.zeros((b,), np.int32))
        if self.text_buckets:
            longest = max((len(ex.get("text_tokens", ())) for _, ex in rows), default=0)
            shape = (b, _bucket(max(longest, 1), self.text_buckets, "text"))
            batch["text_tokens"] = np.full(shape, self.pad_id, np.int32)
            batch["text_mask"] = np.zeros(shape, bool)
        for i, (name, ex) in enumerate(rows):
            n = len(ex["labels"])
            batch["decoder_input_ids"][i, :n] = ex["decoder_input_ids"]
            batch["labels"][i, :n] = ex["labels"]
            batch["loss_mask"][i, :n] = ex["loss_mask"]
            batch["component"][i] = self.components.index(name)
            for key in ("features", "encoded"):
                if key in ex:
                    batch[key][i] = ex[key]
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

    def __str__(self) -> str:
        return f"MixedBatches(counts={self.counts})"


class _MixedBatchIterator(grain.DatasetIterator):
    def __init__(self, ds: MixedBatches):
        super().__init__([p.__iter__() for p in ds.parents])
        self._ds = ds
        self._iters = dict(zip(ds.names, self._parents))
        self._batch_index = 0  # batches made by this iterator (in this worker)
        self._failures = {n: 0 for n in ds.names}  # consecutive bad examples per component

    def _plan_index(self) -> int:
        # In worker w of n (mp_prefetch), this iterator makes global batches w, w + n, ...; using the
        # global index keeps every batch's row order different.
        mp = self._ctx.mp_context
        return self._batch_index * max(mp.process_count, 1) + mp.process_index

    def __next__(self) -> dict[str, Any]:
        ds = self._ds
        rows, skipped = [], collections.Counter()
        for name in batch_plan(ds.counts, self._plan_index(), ds.seed):
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
                        f"(e.g. {ex['skip']}: {ex['message']}); check the data "
                        f"(skips in this batch so far: {dict(skipped)})")
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


def component_names(data_cfg: Mapping[str, Any]) -> list[str]:
    """Names of `data_cfg.train` in the order of batch["component"] ids (sorted)."""
    return sorted(data_cfg["train"])


def build_train_iter(data_cfg: Mapping[str, Any], targets: WhisperTargets, *, n_mels: int,
                     process_index: int = 0, process_count: int = 1,
                     sources: Mapping[str, Any] | None = None) -> grain.IterDataset:
    """The training batches of this process as an endless `grain.IterDataset` (see module doc).

    `sources` replaces the configured source of the named components (e.g. in-memory precomputed
    encoder outputs); everything else about those components still comes from the config.
    """
    names = component_names(data_cfg)
    if not names:
        raise ValueError("data.train names no datasets")
    batch_size, seed = int(data_cfg["batch_size"]), int(data_cfg["seed"])
    if batch_size % process_count:
        raise ValueError(f"data.batch_size={batch_size} is not divisible by {process_count} processes")
    per_process = batch_size // process_count
    train = data_cfg["train"]
    counts = exact_counts({n: float(train[n].get("weight", 1.0)) for n in names}, per_process)
    label_buckets = tuple(int(b) for b in data_cfg["label_buckets"])
    text_buckets = tuple(int(b) for b in data_cfg.get("text_buckets", ()) or ())
    max_label = min(int(data_cfg.get("max_label_tokens") or max(label_buckets)), max(label_buckets))
    kinds = {n: train[n].get("kind", "audio") or "audio" for n in names}
    if "text" in kinds.values() and not text_buckets:
        raise ValueError("text-only datasets (kind='text') need data.text_buckets")
    augmentation = Augmentation.from_config(data_cfg.get("augment") or {})
    read = grain.ReadOptions(num_threads=int(data_cfg.get("read_threads", 4)),
                             prefetch_buffer_size=max(4, 2 * max(counts.values())))

    components, give_up = {}, {}
    for name in names:
        source = sources[name] if sources and name in sources else S.make_source(train[name])
        ds = example_dataset(S.SafeSource(source, name), kind=kinds[name], targets=targets, n_mels=n_mels,
                             seed=T.derive_seed(seed, name), augmentation=augmentation,
                             process_index=process_index, process_count=process_count,
                             max_label_tokens=max_label,
                             max_text_tokens=max(text_buckets) if text_buckets else None)
        shard_len = -(-(len(source) - process_index) // process_count)
        give_up[name] = min(MAX_CONSECUTIVE_SKIPS, max(64, 4 * shard_len))
        components[name] = ds.to_iter_dataset(read)
    pad_id = int(targets.eot)  # padded labels are masked out; eot is a token every vocabulary has
    collate = Collate(n_mels, label_buckets, pad_id, names, text_buckets)
    batches = MixedBatches(components, counts, collate, seed=seed, give_up_after=give_up)
    workers = int(data_cfg.get("num_workers", 0) or 0)
    if workers > 0:
        _absl_flags_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers),
                                      worker_init_fn=_init_worker)
    return batches


def _init_worker(worker_index: int, worker_count: int) -> None:
    """First thing in each Grain worker: Grain spawns them (no fork), so the parent's malloc
    settings are not inherited, and a worker's per-example arrays (decoded audio, noise, spectra:
    hundreds of KB each, above glibc's mmap threshold) would page-fault in afresh every time."""
    del worker_index, worker_count
    retain_freed_memory()


def _absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags; outside an absl app nobody parses them, and
    reading one then raises UnparsedFlagAccessError. Take the defaults, as an absl app would."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class EvalSet(list):
    """Decoded evaluation examples; `skipped` counts the bad ones by reason."""

    skipped: dict[str, int]


def load_eval_set(ds_cfg: Mapping[str, Any], *, process_index: int = 0, process_count: int = 1,
                  max_examples: int | None = None, read_threads: int = 4) -> tuple[EvalSet, dict[str, int]]:
    """(examples, skipped): this process's share of an evaluation set, decoded in source order.

    Examples are `{"id", "audio" (float32, 16 kHz, any length), "text"}`. `max_examples` takes the
    first ones of the whole set before sharding, so all processes together see the same subset.
    Bad examples are skipped and counted by reason (also as `examples.skipped`). RuntimeError if
    nothing is usable.
    """
    source = S.make_source(ds_cfg)
    ds = grain.MapDataset.source(source)
    if max_examples:
        ds = ds[: int(max_examples)]
    if process_count > 1:
        ds = ds[process_index::process_count]
    ds = ds.map(T.CleanText()).map(T.DecodeAudio(SAMPLE_RATE, max_seconds=None))
    examples, skipped = EvalSet(), collections.Counter()
    for ex in ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=16)):
        if T.skipped(ex):
            skipped[ex["skip"]] += 1
        else:
            examples.append({"id": str(ex.get("id", "")), "audio": ex["audio"], "text": ex["text"]})
    examples.skipped = dict(skipped)
    if not examples and len(ds):
        raise RuntimeError(f"evaluation set {ds_cfg.get('path') or ds_cfg.get('tfds_name')!r}: none of "
                           f"{len(ds)} examples could be used; reasons {dict(skipped)}")
    return examples, dict(skipped)
