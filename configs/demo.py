"""The main job: adapt the bundled Whisper tiny.en to a pharmacy domain on a CPU.

    make demo      # synthesizes the data below, then runs:
    python -m jaxasr.train --config configs/demo.py --workdir runs/demo

Data: sentences written for this project (configs/demo_text/), spoken by libespeak-ng voices at
random rates and pitches (tools/synthesize.py -> ArrayRecord shards under build/demo/). Recipe:
the encoder is frozen and its outputs computed once per clip (on a CPU the encoder over 30 s
windows dominates a step); the decoder is fine-tuned with AdamW. Eval: the domain dev set drives
the schedule and picks the best checkpoint; the domain test set and a general-domain set
(forgetting) are measured before and after.
"""

from jaxasr.data.pipeline import dataset_config
from jaxasr.training.trainer import default_config

DATA = "build/demo"


def _set(name: str) -> dict:
    return dataset_config(source="arrayrecord", path=f"{DATA}/{name}/arrayrecord")


def get_config():
    c = default_config()
    c.model.init = "bundled:tiny.en"
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.data.batch_size = 16
    c.data.label_buckets = (32, 48, 64)
    c.data.max_label_tokens = 64
    c.data.train = {"pharmacy": _set("pharmacy_train")}
    c.optimizer.peak_lr = 1e-4
    c.optimizer.warmup_steps = 20
    c.optimizer.weight_decay = 0.01
    c.optimizer.clip_norm = 1.0
    # The encoder, and the cross-attention keys/values computed from it: with both frozen a step
    # runs no projection of the 1500 encoder frames backwards.
    c.optimizer.freeze = ("^encoder/", "^decoder/layers/encoder_attn/(k_proj|v_proj)/")
    c.optimizer.wer_patience = 2
    c.train.steps = 60
    c.train.log_every = 10
    c.train.eval_every = 30
    c.train.checkpoint_every = 30
    c.train.cache_encoder = True
    c.eval.sets = {"pharmacy_dev": _set("pharmacy_dev"), "pharmacy_test": _set("pharmacy_test"),
                   "general_test": _set("general_test")}
    c.eval.best_set = "pharmacy_dev"
    c.eval.batch_size = 16
    c.eval.max_new_tokens = 64
    return c
