"""LoRA experts on the demo's synthesized speech: one adapter per domain, same base and LoRA.

    python tools/train_lora_experts.py --config configs/experts_demo.py --workdir runs/experts

then combine them (`jaxasr.merging.lora_experts`): weighted_sum with a known domain id or weights
learned on dev data, merge_experts("tsv_m", ...), or distill into one student LoRA that needs no
domain id. The data are `make demo`'s ArrayRecord sets under build/demo/; the second domain
("general") needs a general_train set next to general_test (tools/synthesize.py).
"""

from jaxasr.data.pipeline import dataset_config
from jaxasr.training.trainer import default_config

DATA = "build/demo"


def _set(name: str) -> dict:
    return dataset_config(source="arrayrecord", path=f"{DATA}/{name}/arrayrecord")


def get_config():
    c = default_config()
    c.model.init = "bundled:tiny.en"
    # One LoRA for every expert (overrides of model.* are refused): combining deltas needs equal shapes.
    c.model.lora = dict(targets=("decoder/layers/(self_attn|encoder_attn)/(q_proj|v_proj)$",
                                 "decoder/layers/mlp/(fc1|fc2)$"), rank=8, alpha=16.0, dropout=0.0)
    c.data.batch_size = 16
    c.data.label_buckets = (32, 48, 64)
    c.data.max_label_tokens = 64
    c.optimizer.peak_lr = 1e-3
    c.optimizer.warmup_steps = 20
    c.optimizer.clip_norm = 1.0
    c.optimizer.wer_patience = 2
    c.train.steps = 100
    c.train.log_every = 10
    c.train.eval_every = 50
    c.train.checkpoint_every = 50
    c.train.cache_encoder = True  # the encoder is not adapted: encode each clip once
    c.eval.batch_size = 16
    c.eval.max_new_tokens = 64
    # Per expert: its training data and the dev set that picks its best checkpoint (replaced whole).
    c.experts = {
        "pharmacy": {"data": {"train": {"pharmacy": _set("pharmacy_train")}},
                     "eval": {"sets": {"pharmacy_dev": _set("pharmacy_dev")}, "best_set": "pharmacy_dev"}},
        "general": {"data": {"train": {"general": _set("general_train")}},
                    "eval": {"sets": {"general_test": _set("general_test")}, "best_set": "general_test"}},
    }
    return c
