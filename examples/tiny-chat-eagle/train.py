"""Trains tiny-chat-eagle: an EAGLE head for ../tiny-chat, so that speculative decoding with a head
has real acceptance on the local cluster (a random head's drafts are almost never kept).

The head is EAGLE-1's: `fc` over (embedding of token p+1, tiny-chat's final normed hidden state at
p), then one Llama decoder layer without an input norm, trained on tiny-chat's own corpus to predict
the hidden state at p+1 (smooth L1) and, through tiny-chat's frozen LM head, token p+2 (cross
entropy), with EAGLE's uniform noise on the input features. Run `python
examples/tiny-chat-eagle/train.py` to rebuild config.json and model.safetensors in this folder;
deterministic for a given torch version, about a CPU-minute.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

HERE = Path(__file__).resolve().parent
CHAT = HERE.parent / "tiny-chat"
STEPS = 800
NOISE = 0.1  # EAGLE-1's: features + U(-0.1, 0.1) while training


def corpus() -> list[str]:
    spec = importlib.util.spec_from_file_location("tiny_chat_train", CHAT / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    texts: list[str] = module.conversations()
    return texts


def main() -> None:
    torch.manual_seed(0)
    tokenizer = Tokenizer.from_file(str(CHAT / "tokenizer.json"))
    target = LlamaForCausalLM.from_pretrained(CHAT, dtype=torch.float32).eval()
    for p in target.parameters():
        p.requires_grad_(False)
    config = LlamaConfig.from_pretrained(CHAT)
    config.num_hidden_layers = 1
    layer = LlamaModel(config)
    layer.layers[0].input_layernorm = torch.nn.Identity()  # EAGLE-1: fc's output enters attention as is
    layer.norm = torch.nn.Identity()
    layer.embed_tokens.requires_grad_(False)  # the target's embedding serves; this one is not saved
    h = config.hidden_size
    fc = torch.nn.Linear(2 * h, h, bias=False)

    pad = config.pad_token_id
    sequences = [torch.tensor(tokenizer.encode(text).ids) for text in corpus()]
    batch = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=pad)
    mask = (batch != pad).long()
    with torch.no_grad():
        features = target.model(input_ids=batch, attention_mask=mask).last_hidden_state
        embeds = target.model.embed_tokens(batch)
    head_mask = mask[:, 1:]  # position p has an input when token p + 1 exists
    next_tokens = batch[:, 2:].masked_fill(mask[:, 2:] == 0, -100)

    params = [*fc.parameters(), *(p for p in layer.parameters() if p.requires_grad)]
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, STEPS)
    for step in range(STEPS):
        noisy = features[:, :-1] + (torch.rand_like(features[:, :-1]) * 2 - 1) * NOISE
        inputs = fc(torch.cat([embeds[:, 1:], noisy], dim=-1))
        out = layer(inputs_embeds=inputs, attention_mask=head_mask).last_hidden_state
        valid = head_mask.bool()
        feature_loss = torch.nn.functional.smooth_l1_loss(out[valid], features[:, 1:][valid])
        logits = target.lm_head(out[:, :-1])
        token_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), next_tokens.flatten())
        loss = feature_loss + 0.1 * token_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 100 == 0 or step == STEPS - 1:
            print(f"step {step:4d} feature loss {feature_loss.item():.4f} token loss {token_loss.item():.4f}")

    weights = {"fc.weight": fc.weight.detach().clone()}
    for name, tensor in layer.layers[0].state_dict().items():
        weights[f"layers.0.{name}"] = tensor.detach().clone().contiguous()
    save_file(weights, str(HERE / "model.safetensors"), metadata={"format": "pt"})
    head_config = json.loads((CHAT / "config.json").read_text()) | {"num_hidden_layers": 1}
    (HERE / "config.json").write_text(json.dumps(head_config, indent=2) + "\n")


if __name__ == "__main__":
    main()
