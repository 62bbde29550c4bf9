"""TSV-M merge of two domain fine-tunes of tiny.en, alpha picked on the pharmacy dev set.

    python -m jaxasr.merge --config configs/merge/tsv_m.py [--config.out=out/merge/tsv_m]
    python -m jaxasr.merge --config configs/merge/tsv_m.py:boosted_tsv_m    # same, BoostedTSV-M (beta 0.3)

Experts are training runs of configs/demo.py-style recipes (their best checkpoints); any Hugging
Face / CTranslate2 / jaxasr directory or hub id works as well. Eval sets are the demo's shards
(build/demo/, `make demo` synthesizes them).
"""

from jaxasr.data.pipeline import dataset_config
from jaxasr.merging.runner import default_config

DATA = "build/demo"


def _set(name: str) -> dict:
    return dataset_config(source="arrayrecord", path=f"{DATA}/{name}/arrayrecord")


def get_config(method: str = "tsv_m"):
    c = default_config()
    c.base = "bundled:tiny.en"
    c.experts = {"pharmacy": "workdir:runs/demo@best", "banking": "workdir:runs/banking@best"}
    c.method = method
    c.params = {"beta": 0.3} if method == "boosted_tsv_m" else {}
    c.alphas = (0.3, 0.5, 0.7, 1.0)
    c.eval.sets = {"pharmacy_dev": _set("pharmacy_dev"), "general_test": _set("general_test")}
    c.eval.best_set = "pharmacy_dev"
    c.eval.batch_size = 16
    c.eval.max_new_tokens = 64
    c.out = f"out/merge/{method}"
    return c
