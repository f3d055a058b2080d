"""Generate a tiny Llama model and a byte-level BPE tokenizer offline (no model hub).

    python scripts/make_tiny_model.py OUT_DIR

Deterministic: the tokenizer is trained on seeded generated text and the weights are
seeded, so every machine builds the same model (6-7 MB). Needs torch, transformers and
tokenizers (the real-stack venv has them).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

VOCAB = 4096
CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def corpus(n_lines: int = 20000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    syllables = ["ka", "ve", "lo", "mi", "tur", "an", "sel", "po", "ri", "chen", "da", "us", "or", "ne", "qua",
                 "bri", "ton", "el", "sa", "mo", "ix", "ru", "pe", "zo"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    words += ["the", "a", "of", "and", "to", "in", "is", "cache", "token", "server", "model", "memory", "disk"]
    lines = []
    for _ in range(n_lines):
        sent = " ".join(rng.choice(words) for _ in range(rng.randint(5, 30)))
        lines.append(sent.capitalize() + rng.choice([".", "?", "!", ",", ";"]) + " " + str(rng.randint(0, 9999)))
    return lines


def build_tokenizer(out: Path) -> None:
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": None,
        "model_max_length": 8192, "add_bos_token": False, "add_eos_token": False,
        "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, indent=2))


def build_model(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192,
        bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False, torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, "do_sample": False}, indent=2))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    build_model(out)
    (out / ".kvcache-model-stamp").write_text("tiny-llama v1\n")
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"tiny model in {out} ({size / 1e6:.1f} MB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
