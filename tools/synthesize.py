"""Turn sentences into a small speech dataset: 16 kHz WAV files plus a JSONL manifest.

    python tools/synthesize.py OUT_DIR                     # the built-in example sentences
    python tools/synthesize.py OUT_DIR --text corpus.txt --limit 200 --voices en-us en-gb+f2

Each sentence is spoken by one of the voices (round robin) at a rate drawn from --rates, with
libespeak-ng (no system packages needed) or flite/espeak-ng voices when installed. The manifest
has one object a line: {"audio": "0000.wav", "text": ..., "voice": ..., "duration": ...}.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import soundfile as sf

from jaxasr.audio.tts import synthesize

# Written for this project: everyday speech with some clinic and bank vocabulary.
EXAMPLES = [
    "Take the amoxicillin twice daily with food for ten days.",
    "The patient reported chest pain and shortness of breath last night.",
    "Please transfer five hundred dollars from checking to savings.",
    "My card payment was declined at the pharmacy this morning.",
    "The train to the city leaves from platform four at noon.",
    "We planted tomatoes and beans along the south fence this spring.",
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--text", type=Path, help="UTF-8 text file, one sentence a line (default: built-in examples)")
    p.add_argument("--limit", type=int, default=None, help="use at most this many sentences")
    p.add_argument("--voices", nargs="+", default=["en-us", "en-gb", "en-us+f3", "en-us+m3"])
    p.add_argument("--rates", nargs="+", type=int, default=[140, 160, 175])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    if args.text:
        sentences = [s.strip() for s in args.text.read_text(encoding="utf-8").splitlines() if s.strip()]
    else:
        sentences = EXAMPLES
    sentences = sentences[: args.limit]
    rng = random.Random(args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with (args.out_dir / "manifest.jsonl").open("w", encoding="utf-8") as manifest:
        for i, text in enumerate(sentences):
            voice = args.voices[i % len(args.voices)]
            audio = synthesize(text, voice=voice, rate=rng.choice(args.rates))
            name = f"{i:04d}.wav"
            sf.write(args.out_dir / name, audio, 16000, subtype="PCM_16")
            entry = {"audio": name, "text": text, "voice": voice, "duration": round(len(audio) / 16000, 3)}
            manifest.write(json.dumps(entry, ensure_ascii=False) + "\n")
    print(f"wrote {len(sentences)} clips and {args.out_dir / 'manifest.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
