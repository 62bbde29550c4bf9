"""The main job: adapt the bundled Whisper tiny.en to a pharmacy domain on a CPU.

    make demo      # synthesizes the data below, then runs:
    python -m jaxasr.train --config configs/demo.py --workdir runs/demo

The same recipe on the banking domain, or on both at once (joint fine-tuning), as used by the
two-domain merging experiment (tools/merge_demo.py):

    python -m jaxasr.train --config configs/demo.py:banking --workdir runs/banking
    python -m jaxasr.train --config configs/demo.py:joint --workdir runs/joint

Data: sentences written for this project (configs/demo_text/), spoken by libespeak-ng voices at
random rates and pitches (tools/synthesize.py -> ArrayRecord shards under build/demo/). Recipe:
the encoder is frozen and its outputs computed once per clip (on a CPU the encoder over 30 s
windows dominates a step); the decoder is fine-tuned with AdamW. Eval: the domain dev set drives
the schedule and picks the best checkpoint (joint: the mean of both dev sets); the domain test
set and a general-domain set (forgetting) are measured before and after.
"""

from jaxasr.data.pipeline import dataset_config
from jaxasr.training.trainer import default_config

DATA = "build/demo"
DOMAINS = ("pharmacy", "banking")


def _set(name: str) -> dict:
    return dataset_config(source="arrayrecord", path=f"{DATA}/{name}/arrayrecord")


def get_config(domain: str = "pharmacy"):
    if domain not in (*DOMAINS, "joint"):
        raise ValueError(f"configs/demo.py:{domain}: expected one of {', '.join(DOMAINS)} or joint")
    domains = DOMAINS if domain == "joint" else (domain,)
    c = default_config()
    c.model.init = "bundled:tiny.en"
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.data.batch_size = 16
    c.data.label_buckets = (32, 48, 64)
    c.data.max_label_tokens = 64
    c.data.train = {d: _set(f"{d}_train") for d in domains}  # joint: half of every batch from each
    c.optimizer.peak_lr = 1e-4
    c.optimizer.warmup_steps = 20
    c.optimizer.weight_decay = 0.01
    c.optimizer.clip_norm = 1.0
    # The encoder, and the cross-attention keys/values computed from it: with both frozen a step
    # runs no projection of the 1500 encoder frames backwards.
    c.optimizer.freeze = ("^encoder/", "^decoder/layers/encoder_attn/(k_proj|v_proj)/")
    c.optimizer.wer_patience = 2
    c.train.steps = 60 * len(domains)
    c.train.log_every = 10
    c.train.eval_every = 30
    c.train.checkpoint_every = 30
    c.train.cache_encoder = True
    c.eval.sets = {f"{d}_{split}": _set(f"{d}_{split}") for d in domains for split in ("dev", "test")}
    c.eval.sets["general_test"] = _set("general_test")
    c.eval.best_set = "+".join(f"{d}_dev" for d in domains)
    c.eval.batch_size = 16
    c.eval.max_new_tokens = 64
    return c
