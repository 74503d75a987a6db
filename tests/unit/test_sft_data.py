"""SFT examples: chat template, response-only targets, EOS kept."""

from services.common.models import load_tokenizer, render_prompt
from trainers.sft import IGNORE, collate, encode_example


def test_only_response_tokens_and_eos_are_targets(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    short = encode_example(tok, "Say hi.", "Hello there!", max_tokens=128)
    long = encode_example(tok, "Tell me about the sea. " * 20, "Waves.", max_tokens=24)  # prompt cut from the left
    ids, mask, labels = collate([short, long], tok.pad_token_id)
    assert tok.decode(ids[0, : short[1]]) == render_prompt(tok, "Say hi.")
    targets = labels[0][labels[0] != IGNORE].tolist()
    assert tok.decode(targets) == "Hello there!<|im_end|>"
    assert targets[-1] == tok.eos_token_id
    assert len(long[0]) == 24 and tok.decode(labels[1][labels[1] != IGNORE].tolist()) == "Waves.<|im_end|>"
    assert (labels[mask == 0] == IGNORE).all()  # padding is never a target
