"""Convert any supported Whisper source to a Hugging Face directory (or a jaxasr one).

    python -m jaxasr.convert bundled:tiny.en out/whisper-tiny.en-hf
    python -m jaxasr.convert /path/to/faster-whisper-small out/small-hf --dtype float16
    python -m jaxasr.convert openai/whisper-tiny out/tiny-jaxasr --to jaxasr
"""

from __future__ import annotations

import argparse
import sys

from jaxasr.convert.export import DTYPES, export_hf, save_native
from jaxasr.convert.sources import load_checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxasr.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="Hugging Face dir or hub id, CTranslate2 dir, jaxasr model dir, or bundled:tiny.en")
    p.add_argument("out_dir")
    p.add_argument("--to", choices=["hf", "jaxasr"], default="hf", help="output format")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights dtype of a HF export")
    args = p.parse_args(argv)
    try:
        ckpt = load_checkpoint(args.source)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = export_hf(ckpt, args.out_dir, dtype=args.dtype) if args.to == "hf" else save_native(ckpt, args.out_dir)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
