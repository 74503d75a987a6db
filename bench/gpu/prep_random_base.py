"""On the GPU machine: build the `base` preset's architecture with random
weights (the 98 MB GGUF cannot travel), so serving speed can be measured."""

import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

cache = Path(sys.argv[1])
here = Path(__file__).resolve().parents[2] / ".gpu"
(cache / "base").mkdir(parents=True, exist_ok=True)
shutil.copytree(here / "tokenizer", cache / "tokenizer", dirs_exist_ok=True)
cfg = LlamaConfig(
    **{
        k: v
        for k, v in json.loads((here / "base_config.json").read_text()).items()
        if k not in ("architectures", "transformers_version")
    }
)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg)
model.save_pretrained(cache / "base", safe_serialization=True)
AutoTokenizer.from_pretrained(cache / "tokenizer").save_pretrained(cache / "base")
print("random-init base architecture:", sum(p.numel() for p in model.parameters()) / 1e6, "M params")
