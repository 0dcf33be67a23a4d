"""Every config file in configs/ resolves, and the configs that cannot run here say what they would run."""

from __future__ import annotations

import glob
import os

import pytest

from t5x_lite import optimizers
from t5x_lite.config_files import load_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
# refuse to resolve without the checkpoint they start from
NEEDS_OPTIONS = {
    "t5_finetune.py": ":init_from=/nonexistent/converted",
    "multi30k_transfer.py": ":init_from=/nonexistent/m30k",
}


@pytest.mark.parametrize("name", sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIGS, "*.py"))))
def test_every_config_resolves_with_its_documented_command(name):
    path = os.path.join(CONFIGS, name)
    with open(path, encoding="utf-8") as f:
        doc = f.read()
    for field in ("Command:", "Hardware:", "Time:", "Result:"):
        assert field in doc, f"{name}'s docstring has no {field} line"
    config = load_config(path + NEEDS_OPTIONS.get(name, ""))
    assert config.num_train_steps > 0 and config.task


def test_wmt14_follows_vaswani_et_al():
    base = load_config(os.path.join(CONFIGS, "wmt14_ende.py"))
    big = load_config(os.path.join(CONFIGS, "wmt14_ende.py:size=big"))
    assert (base.model, base.num_train_steps, base.keep_checkpoints) == ("transformer_base", 100_000, 5)
    assert (big.model, big.num_train_steps, big.keep_checkpoints) == ("transformer_big", 300_000, 20)
    assert big.model_overrides.dropout_rate == 0.3 and base.model_overrides.dropout_rate == 0.1
    # the paper's peak learning rate: d_model**-0.5 * warmup**-0.5 at the end of the 4,000 warm-up steps
    for config, width in ((base, 512), (big, 1024)):
        peak = float(optimizers.make_schedule(config)(4000))
        assert peak == pytest.approx(width**-0.5 * 4000**-0.5, rel=1e-5)
    assert load_config(os.path.join(CONFIGS, "wmt14_ende.py:steps=10")).num_train_steps == 10
    with pytest.raises(ValueError, match="size='huge' is unknown"):
        load_config(os.path.join(CONFIGS, "wmt14_ende.py:size=huge"))


def test_t5_finetune_needs_a_checkpoint_and_chooses_on_validation_only():
    path = os.path.join(CONFIGS, "t5_finetune.py")
    with pytest.raises(ValueError, match="needs init_from=DIR"):
        load_config(path)
    with pytest.raises(ValueError, match="size='tiny' is unknown"):
        load_config(path + ":size=tiny,init_from=x")
    with pytest.raises(ValueError, match="unknown task .no_such_task"):
        load_config(path + ":task=no_such_task,init_from=x")
    enro = load_config(path + ":init_from=x")  # WMT16 En-Ro has no local validation split
    assert (enro.eval_split, enro.keep_best_checkpoints, enro.model) == ("test", 0, "t5_v1_1_small")
    aeslc = load_config(path + ":task=aeslc,size=xl,init_from=x")
    assert (aeslc.eval_split, aeslc.best_metric, aeslc.keep_best_checkpoints) == ("validation", "eval/rougeL", 1)
    assert aeslc.partitioning == "fsdp" and aeslc.model == "t5_v1_1_xl"


@pytest.mark.parametrize("name", ["scitldr.py", "multi30k_t5.py"])
def test_local_finetune_validates_once_at_the_last_step_by_default(name):
    """``eval_every=0`` follows ``steps``, so a longer run still validates (and checkpoints) at its last step."""
    config = load_config(os.path.join(CONFIGS, name) + ":steps=37")
    assert (config.num_train_steps, config.eval_every_steps, config.checkpoint_every_steps) == (37, 37, 37)
    config = load_config(os.path.join(CONFIGS, name) + ":steps=40,eval_every=10")
    assert config.eval_every_steps == 10


def test_multi30k_transfer_targets():
    """Each ``tgt`` reads its own task; the reverse direction (``tgt=en``) is De->En on the tok/ files."""
    path = os.path.join(CONFIGS, "multi30k_transfer.py") + ":init_from=/nonexistent/m30k"
    tasks = {tgt: load_config(f"{path},tgt={tgt}").task for tgt in ("fr", "cs", "en", "ted")}
    assert tasks == {
        "fr": "multi30k_enfr_tok",
        "cs": "multi30k_encs_tok",
        "en": "multi30k_deen_tok",
        "ted": "iwslt14_ende_tok",
    }
    with pytest.raises(ValueError, match="tgt='xx' is unknown"):
        load_config(f"{path},tgt=xx")
