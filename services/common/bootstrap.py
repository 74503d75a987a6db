"""First start: make sure the model preset is built and the checkpoint store
holds a promoted policy and a promoted reward model to serve.

The seed policy is the preset itself (kind `base`). The seed reward model is
the preset's transformer with a fresh, untrained scalar head; its manifest
says so (`metrics.untrained = true`) until a trained RM replaces it.
"""

from __future__ import annotations

import logging

from services.common.checkpoints import CheckpointStore
from services.common.config import Settings
from services.common.logs import get_logger, log_fields
from services.common.models import RewardModel, ensure_preset, load_tokenizer

log = get_logger(__name__)


def seed_version(settings: Settings, role: str) -> str:
    return f"{'base' if role == 'policy' else 'rm'}-{settings.model}-seed"


def ensure_seeded(settings: Settings, store: CheckpointStore | None = None) -> dict[str, str]:
    """Return {role: promoted version}, creating the seed checkpoints if needed."""
    store = store or CheckpointStore(settings.checkpoint_dir)
    preset_dir = ensure_preset(settings.model, settings.model_cache)
    out = {}
    for role in ("policy", "reward"):
        current = store.promoted(role)
        if current and store.exists(current):
            out[role] = current
            continue
        version = seed_version(settings, role)
        if not store.exists(version):
            if role == "policy":
                store.import_dir(preset_dir, "base", version=version, hyperparameters={"preset": settings.model})
            else:
                model = RewardModel.from_causal_lm(preset_dir)
                with store.stage(
                    "rm",
                    version=version,
                    parents=[seed_version(settings, "policy")],
                    hyperparameters={"preset": settings.model},
                ) as (folder, manifest):
                    model.save_pretrained(folder, tokenizer=load_tokenizer(preset_dir))
                    manifest.metrics = {"untrained": True}
        store.set_promoted(role, version, reason="seed")
        log_fields(log, logging.INFO, "seeded checkpoint", role=role, version=version)
        out[role] = version
    return out
