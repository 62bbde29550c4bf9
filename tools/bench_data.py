"""Benchmark the host data pipeline against transformers' WhisperFeatureExtractor + tokenizer.

    python tools/bench_data.py [--clips 64] [--batch-size 16] [--repeats 5] [--epochs 1]
                               [--codecs flac pcm16] [--worker-batches 16] [--skip-workers] [--profile]

Data: `--clips` synthesized English utterances (jaxasr.audio.tts, espeak voices, 2-15 s, spread
evenly over that range) in one-shard ArrayRecord datasets, one per record codec (the two that
`python -m jaxasr.data.prepare --codec` writes: FLAC, or raw int16 PCM), cached under
build/bench_data/ so reruns skip the synthesis.

Timed work, the same clips read from the same records on both sides, for each codec:
  jaxasr        build_train_iter(...) with speed perturbation (0.9/1.0/1.1), coloured noise, gain
                and SpecAugment on; multi-scale concatenation off, and on as a second row (its rows
                then hold several utterances each). Whole pipeline: record read, decode (FLAC, or
                int16 to float32), augmentation, log-mel, tokenization, fixed-shape batches of
                `--batch-size`. Per-core rows run in-process with read_threads=0 (Grain's
                synchronous path: every step on the calling thread).
  transformers  soundfile decode of the same FLAC bytes (PCM records: the int16 samples / 32768),
                WhisperFeatureExtractor(...)(audio, sampling_rate=16000, return_tensors="np") per
                clip, tokenizer(text).input_ids, and a batch of `--batch-size` collated with
                padding. No augmentation (it has none). Two rows: the torch STFT that transformers
                uses whenever torch is installed, and its NumPy STFT (`_np_extract_fbank_features`,
                used when torch is absent).

Per-core rows run interleaved (one warm-up pass each, excluded), each pass one epoch of the clips
(`--epochs` more), `--repeats` times; the best pass counts. All thread pools are held to one thread
(OMP/MKL/OpenBLAS, torch.set_num_threads(1)), so examples per process-CPU-second is examples per
second per core; wall-clock rates are printed beside it (on a loaded host they are lower). Worker
rows (Grain mp_prefetch, 1 and 2 processes, read_threads=1 each) run afterwards on their own: after
a warm-up that also drains their buffers, `--worker-batches` batches are timed, overall examples/s.
`--profile` adds cProfile of the in-process jaxasr iterator and a per-step time breakdown (FLAC).
The ratios (jaxasr without multi-scale over the faster transformers row, per core) print last,
one per codec, PCM last. FLAC decoding (libsndfile, 1.3-4 ms a clip on the machines measured)
costs both sides the same, which bounds the FLAC ratio however fast the rest of jaxasr's pipeline is.
Freed heap memory is retained in this process for both sides (`jaxasr.host_memory`, as the train
CLI does; the pipeline's Grain workers do it themselves).
"""

from __future__ import annotations

import os

# One thread per pool: the per-core figures must not borrow other cores. Set before numpy loads.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

from jaxasr.host_memory import retain_freed_memory  # noqa: E402

# For both sides alike, as the train CLI (and each Grain worker of the pipeline) does: before any
# thread allocates. JAXASR_RETAIN_FREED_MEMORY=0 measures glibc's defaults.
RETAINED = retain_freed_memory()

import argparse  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import pstats  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from jaxasr.kernels import audio as audio_kernels  # noqa: E402

SAMPLE_RATE = 16000
ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "build" / "bench_data"
MIN_SECONDS, MAX_SECONDS = 2.0, 15.0

# Written for this benchmark; clips take runs of words from this text.
TEXT = (
    "The weather is lovely today, so we are going for a long walk by the river. "
    "Take the amoxicillin twice daily with food until the whole course is finished. "
    "I would like to transfer money from my savings account to my current account. "
    "The patient reported chest pain and shortness of breath after climbing the stairs. "
    "Please remember to water the plants and feed the cat while I am away. "
    "The bank approved our mortgage application this morning after a long wait. "
    "Drink plenty of water and rest for a few days until the fever goes down. "
    "Turn left at the next corner and the post office will be on your right. "
    "Your credit card payment is due at the end of the month, so please pay it online. "
    "The children built a sandcastle on the beach and watched the waves come in. "
    "Tell the pharmacist if you are allergic to penicillin or any other medicine. "
    "Our flight was cancelled, so we spent the night at a hotel near the airport. "
).split()
VOICES = ["en-us", "en-gb", "en-us+f3", "en-us+m3", "en-gb+f2"]
RATES = [140, 160, 175]


# --------------------------------------------------------------------------- data


def make_dataset(n: int, seed: int = 0, codec: str = "flac") -> Path:
    """An ArrayRecord dataset of n synthesized clips of 2-15 s; cached by its settings. The PCM
    one holds the FLAC one's samples (int16 either way), so both codecs carry the same clips."""
    out = CACHE / f"clips{n}-seed{seed}" if codec == "flac" else CACHE / f"clips{n}-seed{seed}-{codec}"
    if (out / "done.json").is_file():
        return out
    from jaxasr.data.records import ArrayRecordSource, write_shards

    if codec != "flac":
        flac = make_dataset(n, seed, "flac")
        source = ArrayRecordSource(flac)
        write_shards([source[i] for i in range(n)], out, codec=codec)
        (out / "done.json").write_text((flac / "done.json").read_text())
        return out
    from jaxasr.audio.tts import synthesize

    rng = np.random.default_rng(seed)
    targets = np.linspace(MIN_SECONDS + 0.3, MAX_SECONDS - 0.3, n)
    rng.shuffle(targets)
    examples, start = [], time.perf_counter()
    for i, target in enumerate(targets):
        voice, rate = VOICES[i % len(VOICES)], int(rng.choice(RATES))
        words = max(3, round(target * rate / 60 * 1.28))  # espeak speaks ~1.28x its nominal rate
        offset = int(rng.integers(len(TEXT)))
        text = " ".join(TEXT[(offset + k) % len(TEXT)] for k in range(words))
        audio = synthesize(text, voice=voice, rate=rate)
        for _ in range(4):  # nudge the rate until the clip lies in [2, 15] s
            seconds = len(audio) / SAMPLE_RATE
            if MIN_SECONDS <= seconds <= MAX_SECONDS:
                break
            rate = int(np.clip(rate * seconds / target, 80, 450))
            audio = synthesize(text, voice=voice, rate=rate)
        examples.append(dict(id=f"bench{i:04d}", text=text, audio=audio, sample_rate=SAMPLE_RATE,
                             duration=len(audio) / SAMPLE_RATE, language="en", speaker=voice))
    write_shards(examples, out, codec="flac")
    seconds = [e["duration"] for e in examples]
    (out / "done.json").write_text(json.dumps(dict(clips=n, seconds=sum(seconds), min=min(seconds),
                                                   max=max(seconds))))
    print(f"synthesized {n} clips ({sum(seconds):.0f} s of audio) into {out} "
          f"in {time.perf_counter() - start:.0f} s")
    return out


def data_config(path: Path, *, batch_size: int, multiscale: bool, workers: int, read_threads: int):
    from jaxasr.data.pipeline import dataset_config, default_data_config

    cfg = default_data_config()
    cfg.batch_size = batch_size
    cfg.num_workers = workers
    cfg.read_threads = read_threads
    cfg.train = {"bench": dataset_config(path=str(path))}
    for name in ("speed", "noise", "gain", "spec_augment"):
        cfg.augment[name].enabled = True
    cfg.augment.multiscale.enabled = multiscale
    return cfg


# --------------------------------------------------------------------------- the two sides


class JaxasrSide:
    """A persistent in-process training iterator; one call = `n_batches` batches."""

    def __init__(self, path: Path, targets, *, batch_size: int, multiscale: bool, n_batches: int,
                 workers: int = 0, read_threads: int = 0):
        from jaxasr.data.pipeline import build_train_iter

        cfg = data_config(path, batch_size=batch_size, multiscale=multiscale, workers=workers,
                          read_threads=read_threads)
        self.ds = build_train_iter(cfg, targets, n_mels=80)
        self.it = iter(self.ds)
        self.n_batches, self.batch_size = n_batches, batch_size

    def __call__(self) -> int:
        for _ in range(self.n_batches):
            batch = next(self.it)
        assert batch["features"].shape == (self.batch_size, 80, 3000)
        return self.n_batches * self.batch_size


class TransformersSide:
    """Same records -> soundfile decode -> WhisperFeatureExtractor + tokenizer -> padded batches."""

    def __init__(self, path: Path, tokenizer, *, batch_size: int, backend: str, n_batches: int):
        from transformers import WhisperFeatureExtractor

        from jaxasr.data.records import ArrayRecordSource

        self.source = ArrayRecordSource(path)
        self.extractor = WhisperFeatureExtractor(feature_size=80)
        if backend == "numpy":  # transformers picks torch whenever it is installed; force its NumPy path
            self.extractor._torch_extract_fbank_features = self.extractor._np_extract_fbank_features
        self.tokenizer, self.pad_id = tokenizer, tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.batch_size, self.n_batches, self.next_index = batch_size, n_batches, 0

    def example(self, index: int) -> tuple[np.ndarray, list[int]]:
        import soundfile as sf

        rec = self.source[index % len(self.source)]
        if "audio_bytes" in rec:
            audio, _ = sf.read(io.BytesIO(rec["audio_bytes"]), dtype="float32")
        else:  # PCM records: int16 samples
            audio = rec["audio"].astype(np.float32) / 32768.0
        features = self.extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]
        return features, self.tokenizer(rec["text"]).input_ids

    def __call__(self) -> int:
        for _ in range(self.n_batches):
            rows = [self.example(self.next_index + i) for i in range(self.batch_size)]
            self.next_index += self.batch_size
            length = max(len(ids) for _, ids in rows)
            features = np.stack([f for f, _ in rows])
            labels = np.full((len(rows), length), self.pad_id, np.int32)
            mask = np.zeros((len(rows), length), np.float32)
            for i, (_, ids) in enumerate(rows):
                labels[i, : len(ids)] = ids
                mask[i, : len(ids)] = 1.0
        assert features.shape == (self.batch_size, 80, 3000)
        return self.n_batches * self.batch_size


# --------------------------------------------------------------------------- timing


def interleaved(fns: dict[str, Callable[[], int]], repeats: int) -> dict[str, dict[str, float]]:
    """Best examples/s (wall and process CPU) of each callable, run round-robin after one warm-up
    call each, so that load from other processes on a shared host hits them all alike."""
    for fn in fns.values():
        fn()
    walls: dict[str, list[float]] = {k: [] for k in fns}
    cpus: dict[str, list[float]] = {k: [] for k in fns}
    counts: dict[str, int] = {}
    for _ in range(repeats):
        for k, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            counts[k] = fn()
            walls[k].append(time.perf_counter() - start)
            cpus[k].append(time.process_time() - start_cpu)
    return {k: dict(cpu=counts[k] / min(cpus[k]), wall=counts[k] / min(walls[k]),
                    wall_median=counts[k] / float(np.median(walls[k]))) for k in fns}


def worker_rate(path: Path, targets, *, batch_size: int, workers: int, batches: int) -> tuple[float, float]:
    """(examples/s, start-up s) of the pipeline with `workers` Grain processes, steady state."""
    start = time.perf_counter()
    side = JaxasrSide(path, targets, batch_size=batch_size, multiscale=False, n_batches=1,
                      workers=workers, read_threads=1)
    side()  # worker start-up (spawn, imports) and the first batch
    startup = time.perf_counter() - start
    side.n_batches = 2 * workers + 2  # drain what the workers buffered meanwhile
    side()
    side.n_batches = batches
    start = time.perf_counter()
    n = side()
    rate = n / (time.perf_counter() - start)
    del side.it  # stop the workers before the next row
    return rate, startup


# --------------------------------------------------------------------------- profile


def profile(path: Path, targets, tokenizer, args) -> None:
    """cProfile of the in-process iterator, then each step's share, timed step by step."""
    import soundfile as sf

    from jaxasr.data import transforms as T
    from jaxasr.data.pipeline import Augmentation, Collate
    from jaxasr.data.records import ArrayRecordSource

    for multiscale in (False, True):
        side = JaxasrSide(path, targets, batch_size=args.batch_size, multiscale=multiscale,
                          n_batches=args.clips // args.batch_size)
        side()
        prof = cProfile.Profile()
        prof.enable()
        n = side()
        prof.disable()
        total = pstats.Stats(prof).total_tt
        print(f"\ncProfile, in-process jaxasr, multiscale {'on' if multiscale else 'off'}: {n} examples, "
              f"{total:.2f} s profiled ({1e3 * total / n:.1f} ms/example); top by own time:")
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
        print("\n".join(line for line in out.getvalue().splitlines()[6:] if line.strip()))

    # Step by step on the same clips: the pipeline's own transform objects, in its order.
    cfg = data_config(path, batch_size=args.batch_size, multiscale=False, workers=0, read_threads=0)
    aug = Augmentation.from_config(cfg.augment)
    source = ArrayRecordSource(path)
    rng = np.random.default_rng(0)
    decode, logmel, tok = T.DecodeAudio(SAMPLE_RATE), T.LogMel(80), T.Tokenize(targets, max_tokens=224)
    steps: dict[str, float] = {k: 0.0 for k in ("read record", "clean text", "decode FLAC", "speed",
                                                 "noise", "gain", "log-mel", "SpecAugment", "tokenize",
                                                 "collate", "hf: sf.read", "hf: feature extractor",
                                                 "hf: tokenizer")}
    from transformers import WhisperFeatureExtractor
    hf = WhisperFeatureExtractor(feature_size=80)
    reps = max(1, args.repeats // 2)
    rows = []

    def timed(key, fn, *a, **kw):  # CPU time of this thread: robust to other load on the host
        t = time.thread_time()
        out = fn(*a, **kw)
        steps[key] += time.thread_time() - t
        return out

    for _ in range(reps):
        rows = []
        for i in range(len(source)):
            ex = timed("read record", source.__getitem__, i)
            raw_bytes = ex["audio_bytes"]
            ex = timed("clean text", T.CleanText().map, ex)
            ex = timed("decode FLAC", decode.map, ex)
            ex = timed("speed", aug.speed.random_map, ex, rng)
            ex = timed("noise", aug.noise.random_map, ex, rng)
            ex = timed("gain", aug.gain.random_map, ex, rng)
            ex = timed("log-mel", logmel.map, ex)
            ex = timed("SpecAugment", aug.spec_augment.random_map, ex, rng)
            ex = timed("tokenize", tok.map, ex)
            rows.append(("bench", ex))
            audio, _ = timed("hf: sf.read", sf.read, io.BytesIO(raw_bytes), dtype="float32")
            timed("hf: feature extractor", lambda a: hf(a, sampling_rate=SAMPLE_RATE, return_tensors="np"), audio)
            timed("hf: tokenizer", lambda t: tokenizer(t).input_ids, ex["text"])
        collate = Collate(80, (32, 64, 128, 224), int(targets.eot), ["bench"])
        for b in range(0, len(rows), args.batch_size):
            timed("collate", collate, rows[b : b + args.batch_size], {})
    n = reps * len(source)
    ours = sum(v for k, v in steps.items() if not k.startswith("hf"))
    print(f"\nstep by step (multiscale off), {n} examples, CPU ms/example (share of jaxasr's steps):")
    for k, v in steps.items():
        share = "" if k.startswith("hf") else f" ({100 * v / ours:4.1f}%)"
        print(f"  {k:22s} {1e3 * v / n:7.2f}{share}")
    print(f"  {'jaxasr steps total':22s} {1e3 * ours / n:7.2f}")


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=1, help="epochs of the clips per timed pass")
    parser.add_argument("--worker-batches", type=int, default=16, help="batches timed per worker row")
    parser.add_argument("--codecs", nargs="+", choices=("flac", "pcm16"), default=["flac", "pcm16"],
                        help="record codecs to run, each on the same clips")
    parser.add_argument("--skip-workers", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if args.clips % args.batch_size:
        parser.error("--clips must be a multiple of --batch-size")

    import torch
    import transformers

    from jaxasr.convert.sources import load_checkpoint
    from jaxasr.data.text import WhisperTargets

    torch.set_num_threads(1)
    paths = {codec: make_dataset(args.clips, codec=codec) for codec in args.codecs}
    info = json.loads((paths[args.codecs[0]] / "done.json").read_text())
    ckpt = load_checkpoint("bundled:tiny.en")
    tokenizer = ckpt.tokenizer
    targets = WhisperTargets(tokenizer, ckpt.generation_config)
    n_batches = args.epochs * args.clips // args.batch_size

    common = dict(batch_size=args.batch_size, n_batches=n_batches)
    methods: dict[str, Callable[[], int]] = {}
    for codec, path in paths.items():
        methods |= {
            f"{codec} jaxasr": JaxasrSide(path, targets, multiscale=False, **common),
            f"{codec} jaxasr multiscale": JaxasrSide(path, targets, multiscale=True, **common),
            f"{codec} hf torch STFT": TransformersSide(path, tokenizer, backend="torch", **common),
            f"{codec} hf numpy STFT": TransformersSide(path, tokenizer, backend="numpy", **common),
        }
    rates = interleaved(methods, args.repeats)

    worker_rows = {}
    if not args.skip_workers:
        for codec, path in paths.items():
            for workers in (1, 2):
                worker_rows[codec, workers] = worker_rate(path, targets, batch_size=args.batch_size,
                                                          workers=workers, batches=args.worker_batches)

    if args.profile:
        profile(make_dataset(args.clips), targets, tokenizer, args)

    print(f"\n{args.clips} clips, {info['seconds']:.0f} s of audio ({info['min']:.1f}-{info['max']:.1f} s), "
          f"ArrayRecord ({', '.join(args.codecs)}); batch {args.batch_size}, {n_batches * args.batch_size} "
          f"examples per pass, best of {args.repeats} interleaved; transformers {transformers.__version__}, torch "
          f"{torch.__version__} ({torch.get_num_threads()} thread), tokenizer {type(tokenizer).__name__}; "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; freed heap memory retained "
          f"(jaxasr.host_memory, both sides): {RETAINED}; native audio kernels: {audio_kernels.available()}")
    print("augmentation (jaxasr rows): speed 0.9/1.0/1.1, noise p=0.5, gain p=0.5, SpecAugment; "
          "the transformers rows do none")
    print(f"{'row':34s} {'ex/s/core':>10s} {'ex/s wall':>10s} {'(median)':>9s} {'ms/ex/core':>11s}")
    for name, r in rates.items():
        print(f"{name + ' (1 core)':34s} {r['cpu']:10.1f} {r['wall']:10.1f} {r['wall_median']:9.1f} "
              f"{1e3 / r['cpu']:11.2f}")
    for (codec, workers), (rate, startup) in worker_rows.items():
        label = f"{codec} jaxasr {workers} worker{'s' if workers > 1 else ''} (overall)"
        print(f"{label:34s} {'':>10s} {rate:10.1f} {'':>9s} {'':>11s}  start-up {startup:.1f} s")
    for codec in args.codecs:
        hf_best = max(rates[f"{codec} hf torch STFT"]["cpu"], rates[f"{codec} hf numpy STFT"]["cpu"])
        print(f"ratio jaxasr-multiscale/transformers, {codec} records (examples/s per core): "
              f"{rates[f'{codec} jaxasr multiscale']['cpu'] / hf_best:.2f}x")
    for codec in args.codecs:
        hf_best = max(rates[f"{codec} hf torch STFT"]["cpu"], rates[f"{codec} hf numpy STFT"]["cpu"])
        print(f"ratio jaxasr/transformers, {codec} records (examples/s per core): "
              f"{rates[f'{codec} jaxasr']['cpu'] / hf_best:.2f}x")


if __name__ == "__main__":
    main()
