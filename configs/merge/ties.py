"""TIES merge (density 0.2 per expert, sign consensus) of Hugging Face Whisper fine-tunes, no grid.

    python -m jaxasr.merge --config configs/merge/ties.py \
        --config.experts.a=path/to/hf-expert-a --config.experts.b=path/to/hf-expert-b

Without eval sets nothing picks alpha, so `alphas` holds exactly one value; add `eval.sets` (and
more alphas) to grid-search it as in tsv_m.py.
"""

from jaxasr.merging.runner import default_config


def get_config():
    c = default_config()
    c.base = "openai/whisper-tiny.en"  # a hub id, or any local HF / CTranslate2 / jaxasr directory
    c.experts = {"a": "runs/expert_a_hf", "b": "runs/expert_b_hf"}
    c.method = "ties"
    c.params = {"density": 0.2, "weights": 1.0, "normalize": True}
    c.alphas = (1.0,)
    c.out = "out/merge/ties"
    return c
