"""Loading models: from several threads of one process at once, and the
unembedding's matmul when only the last position's logits are kept.

transformers builds a model's modules under a global "empty weights" (meta
device) patch while `from_pretrained` runs, so a module created at the same
moment in another thread (the reward head, the policy's layers) can end up
on the meta device and silently keep no weights. The policy and reward
services' hot-swap workers load checkpoints in background threads, and one
process may host both (the e2e tests do, and a round promotes an RM and a
policy together), so every load goes through one lock
(services/common/models.py).
"""

from __future__ import annotations

import threading

import torch

from services.common.models import RewardModel, load_causal_lm


def _meta_tensors(model: torch.nn.Module) -> list[str]:
    return [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]


def test_concurrent_loads_never_leave_weights_on_the_meta_device(tmp_path, tiny_model_dir):
    rm_dir = tmp_path / "rm"
    RewardModel.from_causal_lm(tiny_model_dir).save_pretrained(rm_dir)
    broken: list[str] = []
    errors: list[BaseException] = []

    def load(kind: str) -> None:
        try:
            for _ in range(12):
                model = RewardModel.from_pretrained(rm_dir) if kind == "rm" else load_causal_lm(tiny_model_dir)
                broken.extend(f"{kind}: {name}" for name in _meta_tensors(model))
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=load, args=(kind,)) for kind in ("rm", "policy", "rm", "policy")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert not broken, f"weights left on the meta device by a concurrent load: {sorted(set(broken))[:5]}"


def test_last_position_logits_of_a_frozen_bf16_model_never_copy_the_unembedding(tiny_model_dir):
    """`logits_to_keep=1` hands the unembedding a strided slice; for a frozen bf16
    weight torch's matmul would then broadcast the [vocab, hidden] weight to every
    row and copy it (an 8-prompt prefill of SmolLM2-135M: 1.46 s instead of 0.26 s).
    The loader's hook makes the slice contiguous, so the rows fold into one mm."""
    from torch.profiler import profile

    model = load_causal_lm(tiny_model_dir, dtype=torch.bfloat16).requires_grad_(False)
    vocab, hidden = model.get_output_embeddings().weight.shape
    ids = torch.randint(10, 1000, (4, 12))
    with torch.inference_mode(), profile(record_shapes=True) as prof:
        logits = model(input_ids=ids, use_cache=True, logits_to_keep=1).logits
    assert logits.shape == (4, 1, vocab)
    copies = [e for e in prof.events() if e.name == "aten::copy_" and [4, hidden, vocab] in e.input_shapes]
    assert not copies, "the unembedding weight was broadcast and copied per row"
    with torch.inference_mode():
        full = model(input_ids=ids, use_cache=True).logits[:, -1:]
    torch.testing.assert_close(logits, full)
