"""Merge the two domain experts of the demo (pharmacy, banking) into tiny.en; alpha picked on the
mean dev WER of both domains.

    python -m jaxasr.merge --config configs/merge/demo.py                  # TSV-M
    python -m jaxasr.merge --config configs/merge/demo.py:boosted_tsv_m    # BoostedTSV-M (beta 0.3)
    python -m jaxasr.merge --config configs/merge/demo.py:ties             # or soup, iso_c, ... (jaxasr.merging.METHODS)

The experts are the best checkpoints of `python -m jaxasr.train --config configs/demo.py:<domain>`
runs (tools/merge_demo.py trains them into runs/merge_demo/); any Hugging Face / CTranslate2 /
jaxasr directory or hub id works as well. Eval sets are the demo's shards under build/demo/.
"""

from jaxasr.data.pipeline import dataset_config
from jaxasr.merging.runner import default_config

DATA = "build/demo"
RUNS = "runs/merge_demo"
# Method parameters other than the defaults (jaxasr.merging.METHODS[m].defaults).
PARAMS = {"ties": {"density": 0.3}, "dare_ties": {"density": 0.3}}
# The scale of a merged delta differs by method: a soup averages (alpha 2 = the sum of the task
# vectors), BoostedTSV-M raises the small singular values of steep spectra (a much larger delta).
ALPHAS = {"boosted_tsv_m": (0.05, 0.1, 0.2, 0.3, 0.5), "soup": (1.0, 1.5, 2.0, 2.5, 3.0),
          "ties": (1.0, 1.5, 2.0, 2.5, 3.0)}


def _set(name: str) -> dict:
    return dataset_config(source="arrayrecord", path=f"{DATA}/{name}/arrayrecord")


def get_config(method: str = "tsv_m"):
    c = default_config()
    c.base = "bundled:tiny.en"
    c.experts = {d: f"workdir:{RUNS}/{d}@best" for d in ("pharmacy", "banking")}
    c.method = method
    c.params = PARAMS.get(method, {})
    c.alphas = ALPHAS.get(method, (0.5, 0.75, 1.0, 1.25, 1.5))
    c.eval.sets = {"pharmacy_dev": _set("pharmacy_dev"), "banking_dev": _set("banking_dev")}
    c.eval.best_set = "pharmacy_dev+banking_dev"
    c.eval.batch_size = 16
    c.eval.max_new_tokens = 64
    c.out = f"out/merge/{method}"
    return c
