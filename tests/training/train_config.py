"""A training config for tests: small model, short run; paths come from --config overrides."""

from jaxasr.data.pipeline import dataset_config
from jaxasr.training.trainer import default_config


def get_config():
    c = default_config()
    c.model.init = ""
    c.data.batch_size = 4
    c.data.label_buckets = (32,)
    c.data.max_label_tokens = 32
    c.data.read_threads = 1
    c.data.train = {"speech": dataset_config(source="arrayrecord")}
    c.optimizer.peak_lr = 1e-3
    c.optimizer.clip_norm = 1.0
    c.train.steps = 6
    c.train.log_every = 1
    c.train.eval_every = 1000
    c.train.checkpoint_every = 2
    c.train.zero_shot_eval = False
    c.train.progress_bar = False
    c.eval.max_new_tokens = 8
    c.eval.batch_size = 4
    return c
