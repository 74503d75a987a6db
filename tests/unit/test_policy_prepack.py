"""Prepacked oneDNN linear layers (services/policy/fused.py prepack_linears): a bf16
model serves from the packed weights, with exactly the plain model's logits."""

from __future__ import annotations

import pytest
import torch

from services.common.models import load_causal_lm
from services.policy.fused import prepack_linears
from services.policy.kv import use_gqa_sdpa


def test_prepacked_bf16_model_gives_identical_logits_from_the_packed_weights(tiny_model_dir):
    reference = load_causal_lm(tiny_model_dir, dtype=torch.bfloat16)
    model = load_causal_lm(tiny_model_dir, dtype=torch.bfloat16)
    use_gqa_sdpa(model)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    packed = prepack_linears(model)
    if packed == 0:
        pytest.skip("this PyTorch build has no oneDNN bf16 linear prepacking")
    assert packed == len(linears)  # every layer, the lm_head included
    ids = torch.randint(0, reference.config.vocab_size, (3, 9))
    with torch.inference_mode():
        want = reference(input_ids=ids).logits
        assert torch.equal(model(input_ids=ids).logits, want)
        # The packed copies are what runs: the plain weights no longer matter to the forward pass.
        for m in linears:
            if m is not model.get_output_embeddings():  # tied to the input embedding, which still reads it
                m.weight.zero_()
        assert torch.equal(model(input_ids=ids).logits, want)


def test_prepack_leaves_fp32_models_alone(tiny_model_dir):
    model = load_causal_lm(tiny_model_dir)
    assert prepack_linears(model) == 0
    assert not any(hasattr(m, "rlhf_packed_weight") for m in model.modules())
