"""Merge expert checkpoints into their base: `python -m jaxasr.merge --config configs/merge/demo.py`.

    --config.key.sub=value   override any config field (e.g. --config.alphas="(0.5, 1.0)" --config.out=out/m)
Computes the merged delta of the experts' task vectors once, decodes the eval sets at every alpha of
the grid, prints WER per set per alpha, and writes the best alpha's model to OUT/jaxasr (jaxasr model
directory) and OUT/hf (Hugging Face), the grid to OUT/alpha_grid.tsv and OUT/alpha_grid.json.
Checkpoints: HF directory or hub id, CTranslate2 or jaxasr directory, bundled:tiny.en, or a training
run as workdir:DIR[@best|@STEP]. See jaxasr/merging/runner.py.
"""

from __future__ import annotations

import logging
import sys

from jaxasr.host_memory import retain_freed_memory


def main(argv=None) -> int:
    retain_freed_memory()  # before JAX starts its threads
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("orbax", "jax._src", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from jaxasr.merging.runner import main as run

    return run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
