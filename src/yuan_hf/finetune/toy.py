"""A toy setup for tests, demos and benchmarks: a word-level tokenizer with Yuan's special ids and a synthetic task.

The tokenizer mirrors what the SFT code needs from the real Yuan tokenizer: `<eod>` (eos, id 3), `<sep>` (4),
`<pad>` (5), a chat template with `{% generation %}` markers, and fast-tokenizer offsets. Words are `w6` ...
`w{vocab_size - 1}`, whitespace-separated. The synthetic task: the prompt is a few words from a small range, the
answer maps every word to a fixed partner in another range, in reverse order; a tiny model learns it visibly
within tens of steps.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "<n>", "<eod>", "<sep>", "<pad>")  # ids 0..5, as tiny_config
PROMPT_WORDS = range(10, 42)  # prompt vocabulary: w10 .. w41
ANSWER_OFFSET = 100  # w{i} is answered by w{i + 100}

# Every assistant answer is learned (unlike Yuan's template, which trains the answer after the last user turn only).
TOY_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- message['content'] ~ '<sep>' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] ~ '<eod>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- raise_exception('toy template: unknown role ' ~ message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
# The same rendering without generation markers (exercises the prefix-difference masking path).
TOY_CHAT_TEMPLATE_NO_MARKERS = TOY_CHAT_TEMPLATE.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")


def toy_tokenizer(*, vocab_size: int = 512, chat_template: str | None = TOY_CHAT_TEMPLATE) -> Any:
    """A fast word-level tokenizer: ids 0..5 are `<unk> <s> <n> <eod> <sep> <pad>`, then words `w6` ...

    `eos_token="<eod>"` (also bos, as in `tiny_config`), `sep_token="<sep>"`, `pad_token="<pad>"`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<eod>",  # as tiny_config (bos = eos = 3); the real Yuan tokenizer names <s> but never adds it
        eos_token="<eod>",
        sep_token="<sep>",
        pad_token="<pad>",
        additional_special_tokens=["<n>"],
        model_max_length=1 << 20,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def toy_sft_records(
    n: int, *, seed: int = 0, min_words: int = 2, max_words: int = 8, chat_fraction: float = 0.0
) -> list[dict[str, Any]]:
    """`n` records of the synthetic task; a `chat_fraction` share is written as `messages` instead of prompt/response.

    Prompt: `min_words`..`max_words` words from w10..w41; answer: each word's partner (w{i+100}), reversed.
    """
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        words = [rng.choice(PROMPT_WORDS) for _ in range(rng.randint(min_words, max_words))]
        prompt = " ".join(f"w{i}" for i in words)
        response = " ".join(f"w{i + ANSWER_OFFSET}" for i in reversed(words))
        if rng.random() < chat_fraction:
            records.append(
                {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}
            )
        else:
            records.append({"prompt": prompt, "response": response})
    return records


def write_jsonl(records: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write records one JSON object per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return path


def write_toy_setup(
    directory: str | os.PathLike, *, n_train: int = 64, seed: int = 0, **config_overrides: Any
) -> dict[str, Path]:
    """A tiny random Yuan checkpoint + toy tokenizer (one folder) and a training JSONL, for runs of the recipes.

    Returns `{"model": folder, "train_file": jsonl path}`.
    """
    import torch

    from ..modeling import YuanM32ForCausalLM
    from ..testing import tiny_config

    directory = Path(directory)
    torch.manual_seed(seed)
    model = YuanM32ForCausalLM(tiny_config(**config_overrides))
    model.save_pretrained(directory / "model")
    toy_tokenizer(vocab_size=model.config.vocab_size).save_pretrained(directory / "model")
    train_file = write_jsonl(toy_sft_records(n_train, seed=seed), directory / "train.jsonl")
    return {"model": directory / "model", "train_file": train_file}


__all__ = [
    "TOY_CHAT_TEMPLATE",
    "TOY_CHAT_TEMPLATE_NO_MARKERS",
    "toy_sft_records",
    "toy_tokenizer",
    "write_jsonl",
    "write_toy_setup",
]
