"""Transcribe audio files with a Whisper model.

    python -m jaxasr.transcribe --model bundled:tiny.en a.wav b.flac
    python -m jaxasr.transcribe --model openai/whisper-small --language de --manifest in.jsonl --output out.jsonl

Prints `path<TAB>text` per file; with a manifest (one JSON object a line with `audio` and
optionally `text`), writes each object with its `hypothesis` added and prints WER and CER when
references are present. A file that cannot be read gets a one-line error naming it, the others are
still transcribed, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxasr.audio.io import AudioError, load_audio
from jaxasr.convert.sources import load_checkpoint
from jaxasr.decoding.transcriber import Transcriber
from jaxasr.host_memory import retain_freed_memory
from jaxasr.scoring import error_rates, normalizer


def read_manifest(path: Path) -> list[dict]:
    """Manifest entries with `audio` resolved against the manifest's folder."""
    entries = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(entry, dict) or "audio" not in entry:
            raise ValueError(f"{path}:{n}: expected an object with an 'audio' field")
        audio = Path(entry["audio"])
        entry["_path"] = audio if audio.is_absolute() else path.parent / audio
        entries.append(entry)
    return entries


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxasr.transcribe", description=__doc__.split("\n\n")[0])
    p.add_argument("audio", nargs="*", help="audio files (any format libsndfile reads, any sample rate)")
    p.add_argument("--model", default="bundled:tiny.en",
                   help="Hugging Face dir or hub id, CTranslate2 dir, jaxasr model dir, or bundled:tiny.en")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--beam-size", type=int, default=1, help="1 is greedy search")
    p.add_argument("--language", default=None, help="language code for multilingual models (default: detect)")
    p.add_argument("--task", default="transcribe", choices=["transcribe", "translate"])
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--manifest", type=Path, help="JSONL with 'audio' (and optional 'text') per line")
    p.add_argument("--output", type=Path, help="JSONL to write manifest results to")
    args = p.parse_args(argv)
    if bool(args.audio) == bool(args.manifest):
        p.error("give audio files or --manifest, not both and not neither")
    if args.output and not args.manifest:
        p.error("--output goes with --manifest")
    if args.batch_size < 1 or args.beam_size < 1:
        p.error("--batch-size and --beam-size must be at least 1")
    return args


def main(argv=None) -> int:
    retain_freed_memory()  # before JAX starts its threads
    args = parse_args(argv)
    try:
        entries = read_manifest(args.manifest) if args.manifest else [{"audio": a, "_path": Path(a)} for a in args.audio]
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    audios, ok, failed = [], [], 0
    for entry in entries:
        try:
            audios.append(load_audio(entry["_path"]))
            ok.append(entry)
        except AudioError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1

    transcriber = Transcriber(load_checkpoint(args.model), batch_size=args.batch_size, beam_size=args.beam_size,
                              language=args.language, task=args.task, max_new_tokens=args.max_new_tokens,
                              dtype=args.dtype)
    texts = transcriber.transcribe(audios) if audios else []

    if not args.manifest:
        for entry, text in zip(ok, texts):
            print(f"{entry['audio']}\t{text}")
    else:
        results = [{**{k: v for k, v in e.items() if k != "_path"}, "hypothesis": t} for e, t in zip(ok, texts)]
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            with args.output.open("w", encoding="utf-8") as f:
                for r in results:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        scored = [r for r in results if isinstance(r.get("text"), str)]
        if scored:
            rates = error_rates([r["text"] for r in scored], [r["hypothesis"] for r in scored],
                                normalizer(args.language))
            print(f"WER {rates['wer']:.2f}%  CER {rates['cer']:.2f}%  over {rates['utterances']} utterances")
        else:
            for r in results:
                print(f"{r['audio']}\t{r['hypothesis']}")
    if failed:
        print(f"{failed} of {len(entries)} files could not be read", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
