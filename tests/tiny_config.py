"""A train config small enough for tests: the demo task on a 1+1-layer, d_model=32 model.

python -m t5x_lite.train --config tests/tiny_config.py:steps=40 --workdir DIR
"""

from __future__ import annotations

import os

from t5x_lite import config_files

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py")


def get_config(arg: str | None = None):
    options = dict(part.split("=") for part in filter(None, (arg or "").split(",")))
    steps = int(options.pop("steps", 12))
    config = config_files.load_config(f"{DEMO}:steps={steps},batch_size={options.pop('batch_size', 8)}")
    if options:
        raise ValueError(f"tests/tiny_config.py: unknown options {sorted(options)}")
    config.model_overrides.update(
        dict(d_model=32, d_ff=64, num_heads=2, d_kv=16, num_encoder_layers=1, num_decoder_layers=1, scan_layers=True)
    )
    config.warmup_steps = 2
    config.decay_steps = 12
    config.log_every_steps = 3
    config.eval_every_steps = 12
    config.eval_examples = 16
    config.eval_batch_size = 8
    config.checkpoint_every_steps = 6
    return config
