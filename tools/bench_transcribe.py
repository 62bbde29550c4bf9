"""Benchmark end-to-end transcription speed: jaxasr vs transformers (PyTorch) vs faster-whisper.

    python tools/bench_transcribe.py [--clips 32] [--batch-size 16] [--model bundled:tiny.en]
                                     [--repeats 3] [--order interleaved|sequential]
                                     [--skip-jaxasr] [--skip-transformers] [--skip-faster-whisper]
                                     [--skip-int8] [--fw-mode auto|batched|sequential]
                                     [--xla-flags FLAGS] [--profile] [--show-texts]

The clips are synthesized English speech (jaxasr.audio.tts: everyday, medical and banking
sentences, five voices, a range of speaking rates, 3-8 s each), cached under the system temp dir.
Every system transcribes the same clips, greedy, no timestamps, batch `--batch-size`, in this one
process: first one warm-up run per system on the same clips (compilation, lazy initialization;
reported separately as "warm-up s"), then `--repeats` timed runs per system, round-robin over the
systems by default so that load from other processes on a shared host falls on all of them
alike; the best run counts (noise only ever adds time). Speed is audio seconds per wall second;
each system's WER/CER against the reference sentences (jaxasr.scoring.error_rates) shows that
speed is not bought with wrong output. Ratios (speed of jaxasr / speed of the other) print last.

Timed work per system (audio arrays in, texts out):
  jaxasr          Transcriber.transcribe: host log-mel, one jitted encoder+greedy program per batch,
                  detokenization;
  transformers    WhisperProcessor features + WhisperForConditionalGeneration.generate + batch_decode;
  faster-whisper  BatchedInferencePipeline.transcribe over the clips joined into one array with
                  `clip_timestamps` at the clip boundaries (so the clips form batches of
                  `--batch-size`), or, if that fails, WhisperModel.transcribe clip by clip
                  (`--fw-mode` forces either); fp32 and int8 compute types.

Threads: OMP/MKL/OpenBLAS, torch intra-op and ctranslate2 cpu_threads are all os.cpu_count();
XLA:CPU uses its default pool (all cores). `--xla-flags` sets XLA_FLAGS before jax loads, e.g.
`--xla-flags=--xla_cpu_experimental_ynn_fusion_type=` (XLA:CPU YNNPACK fusions off).

`--profile` adds a per-batch breakdown of where jaxasr and transformers spend their time
(features, encoder alone, cross K/V + prompt, decoder loop, host overhead), including the jaxasr
programs compiled with YNNPACK fusions off.
"""

from __future__ import annotations

import os

from jaxasr.host_memory import retain_freed_memory

# For all systems alike, as the CLIs do: before any thread allocates.
RETAINED = retain_freed_memory()
N_THREADS = os.cpu_count() or 1
# Thread pools that read the environment at import: set before numpy/torch/ctranslate2 load.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, str(N_THREADS))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

SAMPLE_RATE = 16000
EDGE_PAD_S = 0.25  # silence around each clip, as in a real recording
MIN_SECONDS, MAX_SECONDS = 3.0, 8.0

# Written for this benchmark: no digits or abbreviations, so the references are unambiguous.
SENTENCES: list[str] = [
    # everyday
    "The weather is lovely today, so we are going for a long walk by the river.",
    "Could you please close the kitchen window before you leave the house this morning?",
    "I usually drink a cup of strong coffee with my breakfast before work.",
    "The train to the city was late again because of the heavy rain last night.",
    "My sister practices the piano every evening after dinner with her teacher.",
    "We are planning a small party for our neighbours at the end of the summer.",
    "Please remember to water the plants and feed the cat while I am away.",
    "The children built a sandcastle on the beach and watched the waves come in.",
    "He forgot his umbrella at the office and walked home in the rain.",
    "Our flight was cancelled, so we spent the night at a hotel near the airport.",
    "The library closes early on Sundays, so we should go there in the morning.",
    "She bought fresh bread, cheese and some apples at the market on Saturday.",
    "Turn left at the next corner and the post office will be on your right.",
    "The meeting has been moved to Thursday afternoon because the manager is travelling abroad "
    "and will not be back in the office until the middle of next week.",
    # medical
    "Take the amoxicillin twice daily with food until the whole course is finished.",
    "The patient reported chest pain and shortness of breath after climbing the stairs.",
    "Your blood pressure is a little high, so we will check it again next week.",
    "Please stop taking ibuprofen at least one week before the surgery.",
    "The nurse will take a blood sample and measure your temperature first.",
    "The scan showed no sign of a fracture, but the ankle is badly sprained, so keep the weight off it "
    "and come back if the swelling gets worse.",
    "Drink plenty of water and rest for a few days until the fever goes down.",
    "The doctor prescribed a new inhaler for his asthma and a course of steroids.",
    "Tell the pharmacist if you are allergic to penicillin or any other medicine.",
    "The physiotherapist recommended gentle exercises to strengthen the lower back.",
    "Her cholesterol levels have improved since she changed her diet last spring.",
    # banking
    "I would like to transfer money from my savings account to my current account.",
    "Your credit card payment is due at the end of the month.",
    "The bank approved our mortgage application this morning after a long wait.",
    "Please enter your personal identification number and press the green button.",
    "We have noticed an unusual transaction on your account, so we blocked the card and will send "
    "you a replacement as soon as possible.",
    "The interest rate on this savings account is fixed for the first two years.",
    "You can pay your bills online or at any branch during opening hours.",
    "A new debit card will arrive by post within five working days.",
    "The loan must be repaid in monthly instalments over three years.",
    "Please never share your password with anyone, not even with bank staff.",
    "The exchange rate for euros is better at the bank than at the airport.",
    "Your salary has been paid into your account and the balance is now positive.",
]
# (voice, words per minute, pitch), cycled over the clips.
VOICES: list[tuple[str, int, int]] = [
    ("espeak:en-us", 165, 50),
    ("espeak:en-gb", 130, 45),
    ("espeak:en-us+f3", 185, 60),
    ("espeak:en-us+m3", 145, 40),
    ("espeak:en-gb+f2", 155, 55),
]


# --------------------------------------------------------------------------- clips


@dataclasses.dataclass
class Clip:
    audio: np.ndarray  # float32, 16 kHz
    text: str
    voice: str
    rate: int


def synthesize_cached(text: str, voice: str, rate: int, pitch: int, cache: Path) -> np.ndarray:
    key = hashlib.sha1(f"{text}|{voice}|{rate}|{pitch}|{EDGE_PAD_S}".encode()).hexdigest()[:16]
    path = cache / f"{key}.npy"
    if path.is_file():
        return np.load(path)
    from jaxasr.audio.tts import synthesize

    pad = np.zeros(int(EDGE_PAD_S * SAMPLE_RATE), np.float32)
    audio = np.concatenate([pad, synthesize(text, voice=voice, rate=rate, pitch=pitch), pad])
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, audio)
    tmp.replace(path)
    return audio


def make_clips(n: int, cache: Path) -> list[Clip]:
    """n clips: sentence i with voice i mod len(VOICES) (rate nudged per pass over the sentences),
    the rate adjusted so each clip lasts 3-8 s."""
    cache.mkdir(parents=True, exist_ok=True)
    clips = []
    for i in range(n):
        text = SENTENCES[i % len(SENTENCES)]
        voice, rate, pitch = VOICES[(i + i // len(SENTENCES)) % len(VOICES)]
        rate += 10 * (i // len(SENTENCES))
        audio = synthesize_cached(text, voice, rate, pitch, cache)
        for _ in range(4):  # bring the clip into [3, 8] s
            seconds = len(audio) / SAMPLE_RATE
            if MIN_SECONDS <= seconds <= MAX_SECONDS:
                break
            target = MAX_SECONDS - 0.5 if seconds > MAX_SECONDS else MIN_SECONDS + 0.5
            rate = int(np.clip(rate * seconds / target, 80, 450))
            audio = synthesize_cached(text, voice, rate, pitch, cache)
        clips.append(Clip(audio, text, voice, rate))
    return clips


# --------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Result:
    name: str
    mode: str
    load_s: float
    warmup_s: float  # first call on the clips: compilation / lazy init + one run
    times: list[float]
    cpu_times: list[float]  # process CPU seconds (all threads) of each timed run
    texts: list[str]
    wer: float = float("nan")
    cer: float = float("nan")

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def best_cpu(self) -> float:
        return self.cpu_times[self.times.index(self.best)]


@dataclasses.dataclass
class System:
    """A loaded system: `run` transcribes the clips and returns one text per clip."""

    name: str
    mode: str
    load_s: float
    run: Callable[[], list[str]]


def timed(run: Callable[[], list[str]]) -> tuple[float, float, list[str]]:
    start, start_cpu = time.perf_counter(), time.process_time()
    texts = run()
    return time.perf_counter() - start, time.process_time() - start_cpu, texts


def measure(systems: list[System], repeats: int, order: str) -> list[Result]:
    """A warm-up run of each system, then `repeats` timed runs of each: round-robin
    (`interleaved`, so that load from other processes on a shared host falls on all systems
    alike) or all runs of one system before the next (`sequential`)."""
    results = []
    for system in systems:
        warmup, _, _ = timed(system.run)
        results.append(Result(system.name, system.mode, system.load_s, warmup, [], [], []))
        if order == "sequential":
            for _ in range(repeats):
                _measure_once(system, results[-1])
    if order == "interleaved":
        for _ in range(repeats):
            for system, result in zip(systems, results):
                _measure_once(system, result)
    return results


def _measure_once(system: System, result: Result) -> None:
    wall, cpu, texts = timed(system.run)
    result.times.append(wall)
    result.cpu_times.append(cpu)
    result.texts = texts


# --------------------------------------------------------------------------- systems


def bench_jaxasr(ckpt, audios: list[np.ndarray], args) -> System:
    from jaxasr.decoding.transcriber import Transcriber

    start = time.perf_counter()
    language = args.language if ckpt.generation_config.get("is_multilingual") else None
    tr = Transcriber(ckpt, batch_size=args.batch_size, beam_size=1, language=language)
    load = time.perf_counter() - start
    return System("jaxasr", "Transcriber fp32", load, lambda: tr.transcribe(audios))


def load_transformers(hf_dir: Path):
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor
    from transformers.utils import logging as hf_logging

    # generate()'s per-call notes (no attention mask: Whisper's encoder input has no padding mask
    # to give; generation_config plus suppress lists) and the weight-loading progress bar.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    processor = WhisperProcessor.from_pretrained(hf_dir)
    model = WhisperForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return processor, model


def transformers_generate_kwargs(model, args) -> dict:
    kw = dict(num_beams=1, do_sample=False)
    if getattr(model.generation_config, "is_multilingual", False):
        kw.update(language=args.language, task="transcribe")
    return kw


def bench_transformers(hf_dir: Path, audios: list[np.ndarray], args) -> System:
    import torch

    start = time.perf_counter()
    processor, model = load_transformers(hf_dir)
    load = time.perf_counter() - start
    kw = transformers_generate_kwargs(model, args)

    def run() -> list[str]:
        texts = []
        with torch.inference_mode():
            for i in range(0, len(audios), args.batch_size):
                batch = audios[i : i + args.batch_size]
                features = processor(batch, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
                ids = model.generate(features, **kw)
                texts += [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]
        return texts

    attn = getattr(model.config, "_attn_implementation", "?")
    return System("transformers", f"PyTorch fp32 generate, attn={attn}", load, run)


def faster_whisper_dir(args, ckpt, hf_dir: Path, work: Path) -> Path:
    """The model as CTranslate2: the source itself when it is one, else converted from the HF export."""
    from jaxasr.convert import ctranslate2 as ct2_reader
    from jaxasr.convert.sources import BUNDLED_PREFIX, bundled_model_dir

    src = args.model
    path = bundled_model_dir(src[len(BUNDLED_PREFIX):]) if src.startswith(BUNDLED_PREFIX) else Path(src)
    if path.is_dir() and ct2_reader.is_ctranslate2_dir(path):
        return path
    out = work / "ct2"
    if not (out / "model.bin").is_file():
        from ctranslate2.converters import TransformersConverter

        TransformersConverter(str(hf_dir)).convert(str(out), force=True)
    return out


FW_OPTIONS = dict(beam_size=1, without_timestamps=True, condition_on_previous_text=False, temperature=0.0,
                  vad_filter=False)


def bench_faster_whisper(model_dir: Path, compute_type: str, audios: list[np.ndarray], args, mode: str) -> System:
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    start = time.perf_counter()
    model = WhisperModel(str(model_dir), device="cpu", compute_type=compute_type, cpu_threads=N_THREADS,
                         num_workers=1)
    load = time.perf_counter() - start
    language = args.language if model.model.is_multilingual else None

    def sequential() -> list[str]:
        texts = []
        for audio in audios:
            segments, _ = model.transcribe(audio, language=language, **FW_OPTIONS)
            texts.append(" ".join(s.text.strip() for s in segments).strip())
        return texts

    pipeline = BatchedInferencePipeline(model)
    bounds = np.cumsum([0] + [len(a) for a in audios])
    joined = np.concatenate(audios)
    stamps = [{"start": s / SAMPLE_RATE, "end": e / SAMPLE_RATE} for s, e in zip(bounds[:-1], bounds[1:])]
    starts_s = bounds[:-1] / SAMPLE_RATE

    def batched() -> list[str]:
        opts = {k: v for k, v in FW_OPTIONS.items() if k != "condition_on_previous_text"}  # always off there
        segments, _ = pipeline.transcribe(joined, language=language, clip_timestamps=stamps,
                                          batch_size=args.batch_size, **opts)
        parts: list[list[str]] = [[] for _ in audios]
        for seg in segments:  # each segment starts at its clip's offset (no timestamps)
            owner = int(np.searchsorted(starts_s, seg.start + 1e-3, side="right")) - 1
            parts[owner].append(seg.text.strip())
        return [" ".join(p).strip() for p in parts]

    if mode == "auto":
        try:
            got = batched()
            mode = "batched" if sum(bool(t) for t in got) >= 0.9 * len(audios) else "sequential"
        except Exception as e:  # noqa: BLE001
            print(f"faster-whisper batched pipeline failed ({type(e).__name__}: {e}); using sequential")
            mode = "sequential"
    run = batched if mode == "batched" else sequential
    label = (f"BatchedInferencePipeline batch={args.batch_size}" if mode == "batched"
             else "WhisperModel.transcribe per clip")
    short = "fp32" if compute_type == "float32" else compute_type
    return System(f"faster-whisper-{short}", f"{label}, ct2 {compute_type}", load, run)


# --------------------------------------------------------------------------- profile


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time of each callable, run round-robin (after one warm-up call each) so that
    load from other processes on a shared host hits them all alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: min(v) for k, v in times.items()}


# XLA:CPU's YNNPACK library fusions (default on in this jaxlib): "" turns them off for one program.
NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}


def profile(ckpt, hf_dir: Path | None, audios: list[np.ndarray], args) -> None:
    """Where the time goes, per batch of `batch_size` clips (best of `--repeats`, interleaved)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxasr.audio.features import log_mel_numpy_batch
    from jaxasr.decoding.generate import _start, greedy_search, max_new_tokens_for
    from jaxasr.decoding.transcriber import Transcriber

    reps = max(args.repeats, 3)
    bs = args.batch_size
    batch = audios[:bs]
    language = args.language if ckpt.generation_config.get("is_multilingual") else None
    tr = Transcriber(ckpt, batch_size=bs, beam_size=1, language=language)
    model = tr.model
    rules = tr.rules(language)
    max_new = max_new_tokens_for(model, rules, None)
    n_mels = model.cfg.num_mel_bins
    audio_s = sum(len(a) for a in batch) / SAMPLE_RATE
    feats = jnp.asarray(log_mel_numpy_batch(batch, n_mels=n_mels))
    tokens = np.asarray(greedy_search(model, feats, rules, max_new))
    steps = int(max((list(t).index(rules.eot) + 1) if rules.eot in t else len(t) for t in tokens))

    graphdef, state = nnx.split(model)

    def pure(fn, **jit_kw):  # the same program as nnx.jit, through jax.jit (which takes compiler_options)
        jitted = jax.jit(lambda st, *a: fn(nnx.merge(graphdef, st), *a), **jit_kw)
        return lambda *a: jax.block_until_ready(jitted(state, *a))

    encode = pure(lambda m, f: m.encode(f))
    start = pure(lambda m, f: _start(m, f, rules, max_new))
    greedy = pure(lambda m, f: greedy_search(m, f, rules, max_new))
    fns: dict[str, Callable[[], object]] = {
        "jaxasr features (log_mel_numpy_batch)": lambda: log_mel_numpy_batch(batch, n_mels),
        "jaxasr encoder (jit model.encode)": lambda: encode(feats),
        "jaxasr encoder + cross K/V + prompt (_start)": lambda: start(feats),
        f"jaxasr greedy_search ({steps} steps)": lambda: greedy(feats),
        "jaxasr detokenize": lambda: [tr.decode_tokens(t) for t in tokens],
        "jaxasr Transcriber.transcribe (all)": lambda: tr.transcribe(batch),
    }
    if not args.no_ynn_variant:
        encode_noynn = pure(lambda m, f: m.encode(f), compiler_options=NO_YNN)
        greedy_noynn = pure(lambda m, f: greedy_search(m, f, rules, max_new), compiler_options=NO_YNN)
        fns["jaxasr encoder, YNN fusions off"] = lambda: encode_noynn(feats)
        fns["jaxasr greedy_search, YNN fusions off"] = lambda: greedy_noynn(feats)

    if hf_dir is not None:
        import torch

        processor, tmodel = load_transformers(hf_dir)
        kw = transformers_generate_kwargs(tmodel, args)
        feats_pt = processor(batch, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        with torch.inference_mode():
            ids = tmodel.generate(feats_pt, **kw)

        def under_inference_mode(fn):
            def run():
                with torch.inference_mode():
                    return fn()
            return run

        fns.update({
            "torch features (WhisperProcessor)":
                lambda: processor(batch, sampling_rate=SAMPLE_RATE, return_tensors="pt"),
            "torch encoder (model.model.encoder)": under_inference_mode(lambda: tmodel.model.encoder(feats_pt)),
            f"torch generate ({ids.shape[1]} ids out)": under_inference_mode(lambda: tmodel.generate(feats_pt, **kw)),
            "torch batch_decode": lambda: processor.batch_decode(ids, skip_special_tokens=True),
        })

    best = interleaved(fns, reps)
    print(f"\n=== profile: one batch of {len(batch)} clips ({audio_s:.1f} s audio), best of {reps} interleaved ===")
    for name, t in best.items():
        print(f"  {name:48s} {1e3 * t:9.1f} ms")
    names = list(best)
    jax_loop = best[names[3]] - best[names[2]]
    host = best[names[5]] - best[names[0]] - best[names[3]] - best[names[4]]
    print(f"  {'=> jaxasr decoder loop (greedy - _start)':48s} {1e3 * jax_loop:9.1f} ms "
          f"= {1e3 * jax_loop / steps:.2f} ms/step")
    # a difference of separately timed best-of runs: within the machine's noise unless large
    print(f"  {'=> jaxasr transcribe - parts (host work, noise)':48s} {1e3 * host:9.1f} ms")
    if hf_dir is not None:
        gen = next(k for k in best if k.startswith("torch generate"))
        torch_loop = best[gen] - best["torch encoder (model.model.encoder)"]
        print(f"  {'=> torch decoder loop (generate - encoder)':48s} {1e3 * torch_loop:9.1f} ms "
              f"= {1e3 * torch_loop / max(ids.shape[1], 1):.2f} ms/id")
        print(f"  {'=> encoder ratio jaxasr/torch (time)':48s} "
              f"{best['jaxasr encoder (jit model.encode)'] / best['torch encoder (model.model.encoder)']:9.2f}x")
        if not args.no_ynn_variant:
            print(f"  {'=> encoder ratio jaxasr(YNN off)/torch (time)':48s} "
                  f"{best['jaxasr encoder, YNN fusions off'] / best['torch encoder (model.model.encoder)']:9.2f}x")


# --------------------------------------------------------------------------- main


def thread_report() -> str:
    parts = [f"os.cpu_count()={N_THREADS}"]
    try:
        parts.append(f"affinity={len(os.sched_getaffinity(0))}")
    except AttributeError:
        pass
    parts.append(f"OMP/MKL/OPENBLAS_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    try:
        import torch

        parts.append(f"torch intra-op={torch.get_num_threads()} inter-op={torch.get_num_interop_threads()}")
    except ImportError:
        pass
    parts.append(f"ctranslate2 cpu_threads={N_THREADS} num_workers=1")
    parts.append(f"jax: XLA CPU thread pool default (all {N_THREADS} cores)"
                 + (f", XLA_FLAGS={os.environ['XLA_FLAGS']!r}" if os.environ.get("XLA_FLAGS") else ""))
    parts.append(f"freed heap memory retained (jaxasr.host_memory, all systems): {RETAINED}")
    return "; ".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--model", default="bundled:tiny.en")
    p.add_argument("--language", default="en", help="prompt language for multilingual models")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per system after the warm-up; best counts")
    p.add_argument("--skip-jaxasr", action="store_true")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--skip-faster-whisper", action="store_true")
    p.add_argument("--skip-int8", action="store_true", help="faster-whisper fp32 only")
    p.add_argument("--order", choices=["interleaved", "sequential"], default="interleaved",
                   help="timed runs round-robin over the systems (default; fair on a shared host) or "
                        "all of one system's runs before the next's")
    p.add_argument("--fw-mode", choices=["auto", "batched", "sequential"], default="auto")
    p.add_argument("--profile", action="store_true", help="also break down jaxasr and transformers per batch")
    p.add_argument("--no-ynn-variant", action="store_true",
                   help="in --profile, skip the jaxasr variants compiled with XLA:CPU YNNPACK fusions off")
    p.add_argument("--xla-flags", default=None,
                   help="set XLA_FLAGS for this run (before jax loads), e.g. "
                        "'--xla_cpu_experimental_ynn_fusion_type='")
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "jaxasr_bench_transcribe")
    p.add_argument("--show-texts", action="store_true", help="print every hypothesis that differs from another")
    args = p.parse_args(argv)
    if args.clips < 1 or args.batch_size < 1 or args.repeats < 1:
        p.error("--clips, --batch-size and --repeats must be positive")

    if args.xla_flags is not None:
        os.environ["XLA_FLAGS"] = args.xla_flags

    import torch

    torch.set_num_threads(N_THREADS)

    import jax

    from jaxasr.convert.export import export_hf
    from jaxasr.convert.sources import load_checkpoint
    from jaxasr.scoring import error_rates

    start = time.perf_counter()
    clips = make_clips(args.clips, args.cache_dir / "clips")
    synth_s = time.perf_counter() - start
    audios = [c.audio for c in clips]
    refs = [c.text for c in clips]
    seconds = [len(a) / SAMPLE_RATE for a in audios]
    total_audio = sum(seconds)

    start = time.perf_counter()
    ckpt = load_checkpoint(args.model)
    ckpt_s = time.perf_counter() - start
    model_key = hashlib.sha1(args.model.encode()).hexdigest()[:10]
    work = args.cache_dir / f"model_{model_key}"
    hf_dir = None
    if not args.skip_transformers or args.profile or not args.skip_faster_whisper:
        hf_dir = work / "hf"
        if not (hf_dir / "model.safetensors").is_file():
            export_hf(ckpt, hf_dir)

    print(f"model {args.model} ({ckpt_s:.1f} s to load); jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"torch {torch.__version__}")
    print(f"threads: {thread_report()}")
    print(f"{len(clips)} clips, {total_audio:.1f} s of audio ({min(seconds):.1f}-{max(seconds):.1f} s each, "
          f"{len({c.voice for c in clips})} voices; synthesized/loaded in {synth_s:.1f} s, cache {args.cache_dir})")
    print(f"batch {args.batch_size}, greedy, no timestamps; a warm-up run of each system, then best of "
          f"{args.repeats} timed runs ({args.order})\n")

    systems: list[System] = []
    if not args.skip_jaxasr:
        systems.append(bench_jaxasr(ckpt, audios, args))
    if not args.skip_transformers:
        systems.append(bench_transformers(hf_dir, audios, args))
    if not args.skip_faster_whisper:
        fw_dir = faster_whisper_dir(args, ckpt, hf_dir, work)
        mode = args.fw_mode
        for compute_type in ("float32",) + (() if args.skip_int8 else ("int8",)):
            system = bench_faster_whisper(fw_dir, compute_type, audios, args, mode)
            mode = "batched" if system.mode.startswith("Batched") else "sequential"  # the same for both
            systems.append(system)

    results = measure(systems, args.repeats, args.order)
    for r in results:
        rates = error_rates(refs, r.texts)
        r.wer, r.cer = rates["wer"], rates["cer"]

    header = (f"{'system':22s} {'audio s/s':>9s} {'best s':>7s} {'median s':>8s} {'cpu s':>6s} {'warm-up s':>9s} "
              f"{'load s':>6s} {'WER %':>6s} {'CER %':>6s}  mode")
    print("\n" + header)
    print("-" * len(header))
    for r in results:
        print(f"{r.name:22s} {total_audio / r.best:9.1f} {r.best:7.2f} {statistics.median(r.times):8.2f} "
              f"{r.best_cpu:6.1f} {r.warmup_s:9.2f} {r.load_s:6.2f} {r.wer:6.2f} {r.cer:6.2f}  {r.mode}")
    print("(warm-up s: the first run on the same clips, compilation/lazy init included; load s: building the "
          "model from the checkpoint; cpu s: process CPU time of the best run, all threads, spin-waits included)")

    if args.show_texts:
        print()
        for i, ref in enumerate(refs):
            hyps = {r.name: r.texts[i] for r in results}
            if len(set(hyps.values())) > 1 or any(h.strip() != ref for h in hyps.values()):
                print(f"[{i}] ref: {ref}")
                for name, h in hyps.items():
                    print(f"     {name:20s} {h}")

    if args.profile:
        profile(ckpt, None if args.skip_transformers and hf_dir is None else hf_dir, audios, args)

    jaxasr = next((r for r in results if r.name == "jaxasr"), None)
    if jaxasr is not None:
        print()
        for r in results:
            if r is not jaxasr:
                print(f"ratio jaxasr/{r.name}: {r.best and (r.best / jaxasr.best):.2f}x")


if __name__ == "__main__":
    main()
