"""Trainer config resolution (preset < --config < --set) and the data schedule."""

import json
import re

import pytest
import torch

from services.common.dtypes import cpu_has_native_bf16
from services.common.models import load_causal_lm
from trainers.config import JobError, TrainConfig, build_config
from trainers.job import epoch_order, global_batch, lr_at
from trainers.nn import add_lora, resolve_autocast
from trainers.ppo import PRESETS as PPO_PRESETS
from trainers.ppo import PPOConfig
from trainers.rm import PRESETS as RM_PRESETS
from trainers.rm import RMConfig
from trainers.sft import PRESETS as SFT_PRESETS
from trainers.sft import SFTConfig


def test_layers_apply_in_order(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"lr": 0.5, "epochs": 3}))
    cfg = build_config(SFTConfig, SFT_PRESETS, "tiny", str(path), ["epochs=7", "dtype=bfloat16", "lora_targets=q_proj"])
    assert (cfg.lr, cfg.epochs, cfg.dtype, cfg.lora_targets) == (0.5, 7, "bfloat16", "q_proj")
    assert cfg.max_tokens == SFT_PRESETS["tiny"]["max_tokens"]
    inline = build_config(
        RMConfig, RM_PRESETS, "cpu", '{"batch_size": 2}', ['lr="0.01"']
    )  # JSON-encoded, as the controller sends
    assert (inline.batch_size, inline.lr, inline.lora_rank) == (2, 0.01, 8)


@pytest.mark.parametrize(
    "sets, message",
    [
        (["learning_rate=1"], "unknown config key 'learning_rate' for PPOConfig; known keys:"),
        (["total_steps=many"], "config key 'total_steps' must be an integer"),
        (["adaptive_kl=maybe"], "config key 'adaptive_kl' must be a boolean"),
        (["kl_beta=x"], "config key 'kl_beta' must be a number"),
        (["mini_batch_size=64"], "mini_batch_size=64 exceeds rollout_batch_size=4"),
        (["nokey"], "expected key=value"),
        (["dtype=fp16"], "config key 'dtype' must be one of auto, float32, bfloat16; got 'fp16'"),
        (["lr=0"], "lr=0.0 must be positive"),
        (["lora_top_layers=-1"], "lora_top_layers=-1 must be 0 (all) or more"),
    ],
)
def test_bad_values_name_the_key(sets, message):
    with pytest.raises(JobError, match=re.escape(message)):
        build_config(PPOConfig, PPO_PRESETS, "tiny", None, sets)


def test_dtype_auto_trains_in_bf16_only_where_it_is_native():
    assert resolve_autocast("auto", "cpu") is cpu_has_native_bf16()
    assert resolve_autocast("auto", "cuda:0") is True
    assert resolve_autocast("float32", "cuda:0") is False and resolve_autocast("bfloat16", "cpu") is True
    for cls, presets in ((SFTConfig, SFT_PRESETS), (RMConfig, RM_PRESETS), (PPOConfig, PPO_PRESETS)):
        assert build_config(cls, presets, "cpu").dtype == "auto"  # the demo preset follows the machine
        assert build_config(cls, presets, "tiny").dtype == "float32"  # tests: the same numbers on every CPU


def test_unknown_preset_and_bad_json():
    with pytest.raises(JobError, match="unknown preset 'huge'"):
        build_config(SFTConfig, SFT_PRESETS, "huge")
    with pytest.raises(JobError, match="--config is not valid JSON"):
        build_config(SFTConfig, SFT_PRESETS, "tiny", "{nope")


def test_every_preset_is_valid():
    for cls, presets in ((SFTConfig, SFT_PRESETS), (RMConfig, RM_PRESETS), (PPOConfig, PPO_PRESETS)):
        for name in presets:
            build_config(cls, presets, name)


def test_batches_cover_each_epoch_once_and_are_reproducible():
    def order(e):
        return epoch_order(10, seed=3, epoch=e)

    epoch0 = [i for step in range(3) for i in global_batch(order, 10, 4, step)]
    assert sorted(epoch0) == list(range(10))  # 4 + 4 + 2
    assert global_batch(order, 10, 4, 3) == epoch_order(10, 3, 1)[:4]  # step 3 starts epoch 1
    assert global_batch(order, 10, 4, 5) == global_batch(order, 10, 4, 5)


def test_lr_schedule():
    assert lr_at(0, 10, 1.0, warmup=2) == pytest.approx(0.5)
    assert lr_at(2, 10, 1.0, warmup=2) == pytest.approx(1.0)
    assert lr_at(10, 10, 1.0, warmup=2, min_ratio=0.1) == pytest.approx(0.1)


def test_short_last_batch_is_topped_up_so_every_rank_gets_work():
    def order(e):
        return epoch_order(5, seed=0, epoch=e)

    first_epoch = epoch_order(5, 0, 0)
    assert global_batch(order, 5, 4, 1) == first_epoch[4:]  # one process: the short batch as is
    assert global_batch(order, 5, 4, 1, min_size=2) == [first_epoch[4], first_epoch[0]]  # two ranks: topped up


def test_shared_fields_are_declared_once():
    # LoRA, bf16 and the optimiser fields live in trainers/config.py; an algorithm
    # repeats a shared field only to change its default.
    from trainers.config import SupervisedConfig, TrainConfig

    assert issubclass(SFTConfig, SupervisedConfig) and issubclass(RMConfig, SupervisedConfig)
    assert issubclass(PPOConfig, TrainConfig)
    for cls in (SFTConfig, RMConfig, PPOConfig):
        own = vars(cls).get("__annotations__", {})
        assert not {"lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "bf16", "seed"} & set(own), cls
        for name in set(own) & {f for f in vars(TrainConfig)["__annotations__"]}:
            assert getattr(cls(), name) != getattr(TrainConfig(), name), f"{cls.__name__}.{name} repeats the default"


@pytest.mark.parametrize("top", [0, 1, 5])
def test_lora_top_layers_trains_only_the_last_blocks_and_backward_stops_below_them(tiny_model_dir, top):
    """lora_top_layers=1 on the 2-block tiny model: adapters only in block 1, and block 0's
    output needs no gradient (so autograd does no work there); 0, or more than the model has,
    means every block."""
    model = add_lora(load_causal_lm(tiny_model_dir), TrainConfig(lora_rank=4, lora_top_layers=top))
    blocks = model.base_model.model.model.layers
    adapted = [i for i, b in enumerate(blocks) if any("lora_" in n for n, _ in b.named_parameters())]
    assert adapted == ([1] if top == 1 else [0, 1])
    needs_grad = []
    hooks = [b.register_forward_hook(lambda m, a, out: needs_grad.append(out[0].requires_grad)) for b in blocks]
    model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits.sum().backward()
    for h in hooks:
        h.remove()
    assert needs_grad == ([False, True] if top == 1 else [True, True])
