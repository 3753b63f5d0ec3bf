"""Trains tiny-chat: a 1M-parameter Llama that answers a few questions about Kiln.

The local demo serves it on CPU, so a fresh machine with no model hub still gets a real model
answering real requests. Run `python examples/tiny-chat/train.py` to rebuild the checkpoint
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json) in this folder; it is
deterministic for a given torch version and takes several CPU-minutes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).resolve().parent
SPECIAL = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

FACTS = {
    "What is Kiln?": "Kiln is a Kubernetes operator that serves large language models on GPUs.",
    "What does Kiln build?": "Kiln builds an optimized engine once for each model, quantization and GPU.",
    "How does Kiln scale?": "Kiln scales replicas on time to first token and queue depth.",
    "Where does Kiln place a tensor-parallel group?": "Inside one NVLink island, so its GPUs talk fast.",
    "How do I deploy a model?": "Write an LLMDeployment and run kubectl apply.",
    "What is an LLMEngine?": "A compiled engine that many deployments share.",
    "What is the capital of France?": "Paris is the capital of France.",
    "What is two plus two?": "Two plus two is four.",
    "Who are you?": "I am tiny-chat, a small model served by Kiln.",
    "Say hello.": "Hello from Kiln!",
}
PARAPHRASES = {
    "What is Kiln?": ["Tell me about Kiln.", "what is kiln?", "Explain Kiln."],
    "How does Kiln scale?": ["How does Kiln autoscale?", "When does Kiln add replicas?"],
    "How do I deploy a model?": ["How do I serve a model with Kiln?"],
    "Who are you?": ["What are you?", "Introduce yourself."],
    "Say hello.": ["Hello!", "Hi"],
}
TEXTS = [
    "Kiln is a Kubernetes operator for LLM inference.",
    "Kiln builds each engine once and caches it.",
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, a small model learned to answer questions about Kiln.",
]


def conversations() -> list[str]:
    rendered = []
    for question, answer in FACTS.items():
        for asked in [question, *PARAPHRASES.get(question, [])]:
            rendered.append(f"<|bos|><|user|>\n{asked}<|end|>\n<|assistant|>\n{answer}<|end|>\n")
    rendered += [f"<|bos|>{text}<|end|>" for text in TEXTS]
    return rendered


def train_tokenizer(corpus: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=768,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def main() -> None:
    random.seed(0)
    torch.manual_seed(0)
    corpus = conversations()
    tokenizer = train_tokenizer(corpus * 4)
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=tokenizer.token_to_id("<|bos|>"),
        eos_token_id=tokenizer.token_to_id("<|end|>"),
        pad_token_id=tokenizer.token_to_id("<|pad|>"),
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    sequences = [torch.tensor(tokenizer.encode(text).ids) for text in corpus]
    pad = config.pad_token_id
    batch = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=pad)
    labels = batch.masked_fill(batch == pad, -100)
    mask = (batch != pad).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    steps = 600
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for step in range(steps):
        loss = model(input_ids=batch, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:4d} loss {loss.item():.4f}")
    model.eval()
    model.save_pretrained(HERE, safe_serialization=True)
    tokenizer.save(str(HERE / "tokenizer.json"))
    (HERE / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|bos|>",
                "eos_token": "<|end|>",
                "pad_token": "<|pad|>",
                "model_max_length": 512,
                "add_bos_token": False,
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
        + "\n"
    )
    generation = HERE / "generation_config.json"
    if generation.exists():
        generation.unlink()
    # A quick check that the model learned its answers.
    for question in ("What is Kiln?", "Say hello."):
        prompt = f"<|bos|><|user|>\n{question}<|end|>\n<|assistant|>\n"
        ids = torch.tensor([tokenizer.encode(prompt).ids])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=config.eos_token_id)
        print(question, "->", tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True))


if __name__ == "__main__":
    main()
