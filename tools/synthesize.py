"""Turn sentences into a small speech dataset: 16 kHz WAV files plus a JSONL manifest.

    python tools/synthesize.py OUT_DIR                     # the built-in example sentences
    python tools/synthesize.py OUT_DIR --text corpus.txt --limit 200 --voices en-us en-gb+f2
    python tools/synthesize.py OUT_DIR --text corpus.txt --voices all --workers 4 \\
        --domain banking --language en --arrayrecord           # + ArrayRecord shards

Each sentence gets a voice, a rate (from --rates) and a pitch (from --pitches) drawn at random
with --seed, so the dataset is the same for any --workers. Voices are libespeak-ng's (no
system packages needed) plus flite's when the flite program is installed (--voices all);
flite voices always use pitch 50, the only one they support. The manifest has one object a
line: {"audio": "0000.wav", "text", "voice", "speaker", "rate", "pitch", "duration", "domain",
"language"}. --arrayrecord also runs `jaxasr.data.prepare` on it (into OUT_DIR/arrayrecord).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
from pathlib import Path

import soundfile as sf

from jaxasr.audio.tts import available_voices, synthesize

SAMPLE_RATE = 16000

# Written for this project: everyday speech with some clinic and bank vocabulary.
EXAMPLES = [
    "Take the amoxicillin twice daily with food for ten days.",
    "The patient reported chest pain and shortness of breath last night.",
    "Please transfer five hundred dollars from checking to savings.",
    "My card payment was declined at the pharmacy this morning.",
    "The train to the city leaves from platform four at noon.",
    "We planted tomatoes and beans along the south fence this spring.",
]
DEFAULT_VOICES = ["en-us", "en-gb", "en-us+f3", "en-us+m3"]


def plan(sentences: list[str], voices: list[str], rates: list[int], pitches: list[int], seed: int) -> list[dict]:
    """Voice, rate and pitch for every sentence, drawn up front so workers don't change them."""
    rng = random.Random(seed)
    jobs = []
    for i, text in enumerate(sentences):
        voice = rng.choice(voices)
        rate = rng.choice(rates)
        pitch = rng.choice(pitches)
        if voice.startswith("flite:"):
            pitch = 50  # flite has no pitch control
        jobs.append({"index": i, "text": text, "voice": voice, "rate": rate, "pitch": pitch})
    return jobs


def _speak(job: dict, out_dir: Path) -> dict:
    audio = synthesize(job["text"], voice=job["voice"], rate=job["rate"], pitch=job["pitch"], sample_rate=SAMPLE_RATE)
    name = f"{job['index']:04d}.wav"
    sf.write(out_dir / name, audio, SAMPLE_RATE, subtype="PCM_16")
    return {"audio": name, "duration": round(len(audio) / SAMPLE_RATE, 3)}


def _speak_star(args):
    return _speak(*args)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--text", type=Path, help="UTF-8 text file, one sentence a line (default: built-in examples)")
    p.add_argument("--limit", type=int, default=None, help="use at most this many sentences")
    p.add_argument("--voices", nargs="+", default=DEFAULT_VOICES,
                   help="voice specs (see jaxasr.audio.tts), or 'all' for every voice available here")  # fmt: skip
    p.add_argument("--rates", nargs="+", type=int, default=[140, 160, 175], help="words per minute to draw from")
    p.add_argument("--pitches", nargs="+", type=int, default=[50], help="espeak pitches (0-100) to draw from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="synthesis processes")
    p.add_argument("--domain", default="", help="domain column for every row")
    p.add_argument("--language", default="en", help="language column for every row")
    p.add_argument("--arrayrecord", nargs="?", const="", default=None, metavar="DIR",
                   help="also write ArrayRecord shards (default DIR: OUT_DIR/arrayrecord)")  # fmt: skip
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--codec", choices=("flac", "pcm16"), default="flac")
    args = p.parse_args(argv)

    if args.text:
        sentences = [s.strip() for s in args.text.read_text(encoding="utf-8").splitlines() if s.strip()]
    else:
        sentences = EXAMPLES
    sentences = sentences[: args.limit]
    voices = available_voices() if args.voices == ["all"] else args.voices
    if not voices:
        p.error("no voices available on this machine")
    jobs = plan(sentences, voices, args.rates, args.pitches, args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    work = [(job, args.out_dir) for job in jobs]
    if args.workers > 1 and len(jobs) > 1:
        # spawn: each worker loads its own libespeak-ng copy; fork would copy the parent's lock state.
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            results = pool.map(_speak_star, work, chunksize=max(1, len(work) // (4 * args.workers)))
    else:
        results = [_speak_star(w) for w in work]

    manifest_path = args.out_dir / "manifest.jsonl"
    with manifest_path.open("w", encoding="utf-8") as manifest:
        for job, result in zip(jobs, results):
            entry = {
                "audio": result["audio"], "text": job["text"], "voice": job["voice"], "speaker": job["voice"],
                "rate": job["rate"], "pitch": job["pitch"], "duration": result["duration"],
                "domain": args.domain, "language": args.language,
            }  # fmt: skip
            manifest.write(json.dumps(entry, ensure_ascii=False) + "\n")
    print(f"wrote {len(jobs)} clips and {manifest_path}")

    if args.arrayrecord is not None:
        from jaxasr.data.prepare import prepare

        out = Path(args.arrayrecord) if args.arrayrecord else args.out_dir / "arrayrecord"
        report = prepare(manifest_path, out, num_shards=args.num_shards, workers=args.workers,
                         codec=args.codec, max_seconds=0, progress=False)  # fmt: skip
        print(f"wrote {report['written']} examples in {len(report['shards'])} shard(s) to {out}")
        if report["skipped"]:
            print(f"  skipped {report['skipped_by_reason']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
