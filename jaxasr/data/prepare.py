"""Manifest of audio files + transcripts → validated ArrayRecord shards.

    python -m jaxasr.data.prepare MANIFEST OUT_DIR [--num-shards N] [--workers W]
        [--codec flac|pcm16] [--sample-rate 16000] [--max-seconds 30] [--prefix data]

MANIFEST is JSONL, TSV or CSV (chosen by extension). Columns: ``audio`` (a path; relative
paths are resolved against the manifest's folder), ``text``, and optionally ``id``, ``domain``,
``language``, ``speaker``, ``duration``. TSV/CSV files may have a header row naming the
columns; without one the columns are taken in that order (audio, text, domain, language,
speaker, duration). Every input is decoded, checked and resampled to --sample-rate; bad ones
are skipped and counted by reason (see `jaxasr.data.errors`). Writes
``OUT_DIR/<prefix>-NNNNN-of-NNNNN.array_record``, ``dataset_info.json`` and
``prepare_report.json``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import multiprocessing
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from jaxasr.audio.io import AudioError, load_audio
from jaxasr.data.errors import DataError
from jaxasr.data.records import encode_record, write_shards

__all__ = ["COLUMNS", "main", "prepare", "read_manifest"]

COLUMNS = ("audio", "text", "domain", "language", "speaker", "duration")
_AUDIO_KEYS = ("audio", "path", "audio_filepath", "file")  # audio_filepath: NeMo manifests
_EXAMPLES_PER_REASON = 5


def _to_text(value: Any) -> str | bytes:
    """Undo the surrogateescape decoding: text that was not UTF-8 comes back as bytes."""
    if not isinstance(value, str):
        return "" if value is None else str(value)
    try:
        return value.encode("utf-8").decode("utf-8")
    except UnicodeEncodeError:  # lone surrogates = bytes that were not UTF-8
        return value.encode("utf-8", "surrogateescape")


def read_manifest(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a .jsonl/.json, .tsv or .csv manifest as dicts with `COLUMNS` keys (+ ``id``).

    Text that is not valid UTF-8 is returned as ``bytes`` (the row is rejected later, with a
    reason, instead of the whole manifest failing to load).
    """
    path = Path(path)
    # surrogateescape: a bad byte in one transcript must not make every row unreadable.
    content = path.read_bytes().decode("utf-8", "surrogateescape")
    suffix = path.suffix.lower()
    raw: list[dict[str, Any]] = []
    if suffix in (".jsonl", ".json"):
        for n, line in enumerate(content.splitlines(), 1):
            if line.strip():
                try:
                    raw.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON object ({e})") from e
    elif suffix in (".tsv", ".csv"):
        # TSV as Common Voice writes it: no quoting, so a transcript may contain '"'.
        tsv = dict(delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = list(csv.reader(io.StringIO(content), **(tsv if suffix == ".tsv" else {})))
        rows = [r for r in rows if any(cell.strip() for cell in r)]
        header = list(COLUMNS)
        if rows and rows[0] and rows[0][0].strip().lower() in _AUDIO_KEYS:
            header = [c.strip().lower() for c in rows.pop(0)]
        raw = [dict(zip(header, r)) for r in rows]
    else:
        raise ValueError(f"{path}: unknown manifest type {suffix!r}; use .jsonl, .tsv or .csv")

    out = []
    for n, row in enumerate(raw):
        audio = next((row[k] for k in _AUDIO_KEYS if row.get(k)), None)
        if audio is None:
            raise ValueError(f"{path}: row {n + 1} has no audio path (one of {_AUDIO_KEYS})")
        duration = row.get("duration")
        try:
            duration = float(duration) if duration not in (None, "") else math.nan
        except ValueError:
            duration = math.nan
        entry = {
            "audio": _to_text(audio),
            "text": _to_text(row.get("text", "")),
            "id": _to_text(row.get("id") or audio),
            "duration": duration,
        }
        for key in ("domain", "language", "speaker"):
            entry[key] = _to_text(row.get(key) or "")
        out.append(entry)
    return out


def _check_text(text: str | bytes, name: str) -> str:
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError("text_not_utf8", f"{name}: transcript is not UTF-8 ({e})") from e
    if not text.strip():
        raise DataError("text_empty", f"{name}: empty transcript")
    return text.strip()


def _load(path: Path, sample_rate: int, name: str):
    """`load_audio` with its failures turned into DataError reason codes."""
    if not path.is_file():
        raise DataError("audio_missing", f"{name}: no such file ({path})")
    try:
        return load_audio(path, sample_rate)
    except AudioError as e:
        raise DataError(e.reason, str(e)) from e
    except (RuntimeError, ValueError) as e:  # soxr and friends on very odd inputs
        raise DataError("audio_undecodable", f"{name}: {e}") from e


def _process(job: tuple) -> tuple[bytes | None, float, str, str, str]:
    """One manifest row → (record, seconds, reason, name, message); record None when skipped."""
    row, base, sample_rate, max_seconds, codec = job
    audio_field = row["audio"]
    name = audio_field if isinstance(audio_field, str) else os.fsdecode(audio_field)
    try:
        path = Path(name)
        path = path if path.is_absolute() else base / path
        text = _check_text(row["text"], name)  # before audio: cheap checks first
        audio = _load(path, sample_rate, name)
        seconds = len(audio) / sample_rate
        if max_seconds and seconds > max_seconds:
            raise DataError("audio_too_long", f"{name}: {seconds:.1f} s > --max-seconds {max_seconds}")
        example = dict(row, text=text, audio=audio, sample_rate=sample_rate, duration=seconds)
        return encode_record(example, codec), seconds, "", name, ""
    except DataError as e:
        return None, 0.0, e.reason, name, str(e)


def prepare(
    manifest: str | os.PathLike,
    out_dir: str | os.PathLike,
    num_shards: int = 1,
    workers: int = 1,
    codec: str = "flac",
    sample_rate: int = 16000,
    max_seconds: float = 30.0,
    prefix: str = "data",
    progress: bool = True,
) -> dict[str, Any]:
    """Validate, resample and write the manifest's examples as ArrayRecord shards.

    Returns the report (also written to ``out_dir/prepare_report.json``). Raises DataError
    with reason "no_valid_examples" if every input was bad (the report is written first).
    """
    from tqdm import tqdm

    if codec not in ("flac", "pcm16"):
        raise ValueError(f"codec must be 'flac' or 'pcm16', got {codec!r}")
    manifest = Path(manifest)
    out_dir = Path(out_dir)
    rows = read_manifest(manifest)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob(f"{prefix}-*-of-*.array_record"):  # a rerun must not mix in old shards
        old.unlink()

    base = manifest.resolve().parent
    jobs = [(row, base, sample_rate, max_seconds, codec) for row in rows]
    skipped: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    seconds_total = 0.0

    def records(results):
        nonlocal seconds_total
        for record, seconds, reason, name, message in tqdm(
            results, total=len(jobs), unit="clip", desc="prepare", disable=not progress
        ):
            if record is None:
                skipped[reason] += 1
                names = examples.setdefault(reason, [])
                if len(names) < _EXAMPLES_PER_REASON:
                    names.append(name)
                if progress:
                    tqdm.write(f"skip [{reason}] {message}", file=sys.stderr)
            else:
                seconds_total += seconds
            yield record

    if workers > 1 and len(jobs) > 1:
        # spawn, not fork: the caller may hold threads (JAX, grain) that fork would copy mid-lock.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers) as pool:
            results = pool.imap(_process, jobs, chunksize=max(1, min(64, len(jobs) // (4 * workers))))
            shards = write_shards(records(results), out_dir, num_shards, prefix, codec, total=len(jobs))
    else:
        shards = write_shards(records(map(_process, jobs)), out_dir, num_shards, prefix, codec, total=len(jobs))

    written = sum(s["num_examples"] for s in shards)
    report = {
        "manifest": str(manifest),
        "out_dir": str(out_dir),
        "inputs": len(jobs),
        "written": written,
        "skipped": sum(skipped.values()),
        "skipped_by_reason": dict(sorted(skipped.items())),
        "skipped_examples": {k: examples[k] for k in sorted(examples)},
        "hours": seconds_total / 3600,
        "shards": shards,
    }
    (out_dir / "prepare_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if written == 0:
        raise DataError(
            "no_valid_examples",
            f"{manifest}: none of the {len(jobs)} inputs could be used; "
            f"reasons {dict(skipped)} (see {out_dir / 'prepare_report.json'})",
        )
    info = {
        "format": "jaxasr.records",
        "record_version": 1,
        "codec": codec,
        "sample_rate": sample_rate,
        "num_examples": written,
        "total_hours": seconds_total / 3600,
        "shards": [{"file": Path(s["path"]).name, "num_examples": s["num_examples"]} for s in shards],
        "source_manifest": str(manifest),
    }
    (out_dir / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return report


def _print_summary(report: dict[str, Any]) -> None:
    print(f"wrote {report['written']} of {report['inputs']} examples "
          f"({report['hours']:.3f} h) in {len(report['shards'])} shard(s) to {report['out_dir']}")
    for reason, count in report["skipped_by_reason"].items():
        names = ", ".join(report["skipped_examples"][reason])
        print(f"  skipped {count:>6} {reason}: {names}{', ...' if count > len(report['skipped_examples'][reason]) else ''}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("manifest", type=Path, help=".jsonl, .tsv or .csv")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) - 1))
    p.add_argument("--codec", choices=("flac", "pcm16"), default="flac")
    p.add_argument("--sample-rate", type=int, default=16000)
    p.add_argument("--max-seconds", type=float, default=30.0, help="skip longer clips (0: no limit)")
    p.add_argument("--prefix", default="data", help="shard file name prefix")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-file skip lines")
    args = p.parse_args(argv)
    try:
        report = prepare(
            args.manifest, args.out_dir, num_shards=args.num_shards, workers=args.workers,
            codec=args.codec, sample_rate=args.sample_rate, max_seconds=args.max_seconds,
            prefix=args.prefix, progress=not args.quiet,
        )  # fmt: skip
    except DataError as e:
        report_path = args.out_dir / "prepare_report.json"
        if report_path.is_file():
            _print_summary(json.loads(report_path.read_text()))
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:  # unreadable or malformed manifest
        print(f"error: {e}", file=sys.stderr)
        return 1
    _print_summary(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
