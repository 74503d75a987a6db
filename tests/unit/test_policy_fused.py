"""The fused decode step (services/policy/fused.py): the same logits and keys/values as
the model's own forward over the same KV window, step after step, with rows joining and
leaving between steps; models it cannot run keep transformers' forward."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from services.common.config import load_settings
from services.common.models import load_causal_lm, pad_batch, position_ids_from_mask
from services.policy.engine import prepare_for_serving
from services.policy.fused import FusedDecoder, unsupported
from services.policy.kernels import decode_ops
from services.policy.kv import KvWindow, use_gqa_sdpa


def prefill(model, prompts):
    ids, mask = pad_batch(prompts, 0, side="left")
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True)
    return [(layer.keys, layer.values) for layer in out.past_key_values.layers], mask, out.logits[:, -1].argmax(-1)


def model_step(model, kv: KvWindow, last: torch.Tensor) -> torch.Tensor:
    mask, positions = kv.decode_inputs(slice(0, kv.n))
    out = model(
        input_ids=last[:, None],
        attention_mask=mask,
        position_ids=positions,
        cache_position=torch.tensor([kv.width]),
        past_key_values=kv,
        use_cache=True,
    )
    return out.logits[:, -1]


@pytest.mark.parametrize("kernels", ["torch", "native"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_steps_match_the_models_forward_as_rows_join_and_leave(tiny_model_dir, dtype, kernels, tmp_path):
    model = load_causal_lm(tiny_model_dir, dtype=dtype)
    use_gqa_sdpa(model)
    ops, reason = decode_ops(dtype, torch.device("cpu"), kernels == "native", tmp_path)
    assert ops.name == kernels, reason
    fused = FusedDecoder(model, rows=4, ops=ops)
    ours = KvWindow(model, torch.device("cpu"), dtype, 4096, 8)
    with torch.inference_mode():
        kv, mask, last = prefill(model, [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]])
        ours.append_rows(kv, mask, torch.arange(3))
        theirs = copy.deepcopy(ours)
        for step in range(6):
            if step == 2:  # a row leaves: the last row moves into its slot
                ours.keep([0, 2])
                theirs.keep([0, 2])
                last = last[[0, 2]]
            if step == 4:  # a longer prompt joins (widens the window) with two samples
                kv, mask, first = prefill(model, [[20, 21, 22, 23, 24, 25, 26, 27, 28, 29]])
                ours.append_rows(kv, mask, torch.tensor([0, 0]))
                theirs.append_rows(kv, mask, torch.tensor([0, 0]))
                last = torch.cat([last, first, first])
            ours.reserve(ours.n, right=1)
            theirs.reserve(theirs.n, right=1)
            got = fused.step(last, ours, slice(0, ours.n))
            want = model_step(model, theirs, last)
            ours.commit()
            theirs.commit()
            # Same arithmetic in the same order: equal (a broken rotary or mask moves these by ~1e-3).
            # The native norm sums a row's squares in another order, which bf16 rounding can show.
            assert got.dtype == want.dtype
            close = 2e-2 if (kernels, dtype) == ("native", torch.bfloat16) else 1e-6
            torch.testing.assert_close(got, want, atol=close, rtol=0)
            for a, b in zip(ours.k + ours.v, theirs.k + theirs.v, strict=True):
                torch.testing.assert_close(a[: ours.n, :, ours.start : ours.end], b[: ours.n, :, ours.start : ours.end])
            last = want.argmax(-1)


def test_fused_weights_are_copies_taken_when_built(tiny_model_dir):
    """The decoder reads its own fused copies: a serving model's weights never change, and a
    trainer's model (whose weights do) never gets one (prepare_for_serving is LocalBackend's)."""
    model = load_causal_lm(tiny_model_dir)
    fused = FusedDecoder(model, rows=2)
    kv = KvWindow(model, torch.device("cpu"), torch.float32, 1024, 4)
    with torch.inference_mode():
        cache, mask, last = prefill(model, [[5, 6, 7]])
        kv.append_rows(cache, mask, torch.arange(1))
        before = copy.deepcopy(kv)
        kv.reserve(1, right=1)
        want = fused.step(last, kv, slice(0, 1))
        model.model.layers[0].self_attn.q_proj.weight.mul_(2)
        before.reserve(1, right=1)
        assert torch.equal(fused.step(last, before, slice(0, 1)), want)


def test_models_without_a_fused_step_keep_transformers_forward(tiny_model_dir, caplog):
    model = load_causal_lm(tiny_model_dir)
    assert unsupported(model) is None
    model.train()
    assert "training" in unsupported(model)
    with pytest.raises(ValueError, match="training"):
        FusedDecoder(model, rows=2)
    model.eval()
    model.config.model_type = "qwen2"
    assert "qwen2" in unsupported(model)
    model.config.model_type = "llama"
    model.config.mlp_bias = True
    assert "biases" in unsupported(model)


def test_serving_preparation_attaches_the_fused_step_unless_switched_off(tiny_model_dir, caplog):
    caplog.set_level(logging.INFO)
    served = prepare_for_serving(load_causal_lm(tiny_model_dir), load_settings({}))
    assert isinstance(served.rlhf_fused, FusedDecoder)
    plain = prepare_for_serving(load_causal_lm(tiny_model_dir), load_settings({"RLHF_FUSED_DECODE": "false"}))
    assert getattr(plain, "rlhf_fused", None) is None
    assert "RLHF_FUSED_DECODE=false" in caplog.text


def test_a_served_bf16_model_frees_the_plain_weights_its_packed_layers_never_read(tiny_model_dir):
    reference = load_causal_lm(tiny_model_dir, dtype=torch.bfloat16)
    served = prepare_for_serving(load_causal_lm(tiny_model_dir, dtype=torch.bfloat16), load_settings({}))
    if not any(hasattr(m, "rlhf_packed_weight") for m in served.modules()):
        pytest.skip("this PyTorch build has no oneDNN bf16 linear prepacking")
    layers = [m for m in served.model.layers.modules() if type(m) is torch.nn.Linear]
    assert layers and all(m.weight.numel() == 0 for m in layers)
    assert served.get_output_embeddings().weight.numel() > 0  # tied to the input embedding
    ids = torch.randint(0, reference.config.vocab_size, (2, 7))
    with torch.inference_mode():
        assert torch.equal(served(input_ids=ids).logits, reference(input_ids=ids).logits)


@pytest.mark.parametrize("head_dim", [16, 32], ids=["rope after the matmul", "rope in the matmul"])
def test_a_layer_as_one_native_call_gives_the_bits_of_its_jobs_one_by_one(tiny_model_dir, head_dim, tmp_path):
    """Where every matmul of a bf16 model runs on AMX tiles, each layer of a decode step is one
    native call (kernels.c decode_layer_bf16): the same logits and keys/values, bit for bit, as
    the layer's jobs called one by one, step after step. Head sizes of 32 take rope into the q/k/v
    matmul's last pass; 16 (the tiny preset) rotate after it."""
    ops, reason = decode_ops(torch.bfloat16, torch.device("cpu"), True, tmp_path)
    model = load_causal_lm(tiny_model_dir, dtype=torch.bfloat16)
    if head_dim != model.config.head_dim:
        config = copy.deepcopy(model.config)
        config.head_dim, config.num_attention_heads, config.num_key_value_heads = head_dim, 2, 1
        torch.manual_seed(0)
        model = type(model)(config).to(torch.bfloat16).eval()
    use_gqa_sdpa(model)
    fused = FusedDecoder(model, rows=4, ops=ops)
    if ops.name != "native" or not ops._amx:  # no AMX here: the jobs stay separate calls
        assert not fused.whole_layers
        return
    assert fused.whole_layers
    whole = KvWindow(model, torch.device("cpu"), torch.bfloat16, 4096, 8)
    with torch.inference_mode():
        kv, mask, last = prefill(model, [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]])
        whole.append_rows(kv, mask, torch.arange(3))
        apart = copy.deepcopy(whole)
        for _ in range(4):
            logits = {}
            for kind, window in (("whole", whole), ("apart", apart)):
                fused.whole_layers = kind == "whole"
                window.reserve(window.n, right=1)
                logits[kind] = fused.step(last, window, slice(0, window.n))
                window.commit()
            assert torch.equal(logits["whole"], logits["apart"])
            for a, b in zip(whole.k + whole.v, apart.k + apart.v, strict=True):
                assert torch.equal(a, b)
            last = logits["whole"].argmax(-1)


def test_the_rotation_table_gives_the_rotary_modules_own_values(tiny_model_dir):
    """FusedDecoder takes cos/sin from a table of the rotary module's outputs by position: bit
    for bit the module's own for each row's position, also past the table's first size."""
    model = load_causal_lm(tiny_model_dir, dtype=torch.bfloat16)
    fused = FusedDecoder(model, rows=4)
    x = torch.zeros(1, dtype=torch.bfloat16)
    half = model.config.head_dim // 2
    with torch.inference_mode():
        for positions in (torch.tensor([[0], [7], [511]]), torch.tensor([[3], [1500], [2]])):
            cos, sin = fused._rotation(x, positions)
            want_cos, want_sin = model.model.rotary_emb(x, positions)
            assert torch.equal(cos, want_cos[:, 0, :half]) and torch.equal(sin, want_sin[:, 0, :half])
    assert fused._turns[0].shape[0] > 1500  # grown for the second batch
