"""A tiny Yuan-like tokenizer trained here: the real vocabulary cannot be shipped, so tests and the demo use this."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

from ..common import ConversionError
from ..tokenizer import EOD_TOKEN, YUAN_EXTRA_TOKENS, convert_tokenizer

__all__ = ["DEMO_TEXT", "build_demo_tokenizer"]

#: Training text for :func:`build_demo_tokenizer` (written for this project; English, Chinese, code).
DEMO_TEXT = """\
Yuan is a family of large language models. This demo tokenizer is tiny and only exists for tests.
A mixture of experts routes every token to two of its experts, chosen by an attention router.
The quick brown fox jumps over the lazy dog. How are you today? I am fine, thank you!
Please write a short poem about the sea, the wind and the stars.
The answer is 42. Numbers such as 3.14159, 2024 and 100000 are split into digits.
Hello, world! Good morning. Good night. See you tomorrow.
你好，世界！今天天气很好，我们一起去公园散步吧。
请问目前最先进的机器学习算法有哪些？
北京是中华人民共和国的首都，上海是一座国际化大都市。
机器学习是人工智能的一个分支，深度学习是机器学习的一种方法。
这个模型使用注意力路由器来选择专家，每个词元由两个专家处理。
我们的目标是让大模型更加高效、更加开放、更加易用。
春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。
def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)
for i in range(10):
    print(i, fibonacci(i))
class Router(nn.Module):
    def forward(self, hidden_states):
        scores = self.query(hidden_states) @ self.key(hidden_states).T
        return torch.softmax(scores, dim=-1)
import torch
x = torch.zeros(2, 3)
if x.sum() == 0:
    print("all zeros")
{"role": "user", "content": "hello"}
<html><body><p>Hello</p></body></html>
SELECT name, count(*) FROM users WHERE age > 18 GROUP BY name;
"""

_DEMO_VOCAB_RANGE = (512, 1024)
_DEMO_SPM_OPTIONS: dict[str, Any] = dict(
    model_type="bpe",
    byte_fallback=True,  # like Yuan: unknown characters become <0x..> byte pieces
    split_digits=True,
    allow_whitespace_only_pieces=True,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    character_coverage=1.0,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    num_threads=1,  # with the fixed input order below this makes training deterministic
    shuffle_input_sentence=False,
    input_sentence_size=0,
    max_sentence_length=4096,
    hard_vocab_limit=True,
    minloglevel=2,
)


def build_demo_tokenizer(dst: str | os.PathLike, *, vocab_size: int = 512, overwrite: bool = False) -> Path:
    """Train a tiny Yuan-like SentencePiece BPE model on :data:`DEMO_TEXT` and convert it like the real one.

    The model has Yuan's layout: ``<unk>``=0, ``<s>``=1, ``</s>``=2, then ``<eod>`` and the 15
    :data:`YUAN_EXTRA_TOKENS` as user-defined pieces (``<eod>``=3, ``<sep>``=4, ``<pad>``=5, ...,
    ``<empty_output>``=18), then 256 byte pieces and the learned pieces, so ``len(tokenizer) == vocab_size``.
    Ids are deterministic; look them up with ``tokenizer.convert_tokens_to_ids`` or ``eos_token_id`` /
    ``pad_token_id`` / ``sep_token_id``. Training takes well under a second on CPU.

    Returns ``dst`` as an absolute path.
    """
    import sentencepiece as spm

    if not _DEMO_VOCAB_RANGE[0] <= vocab_size <= _DEMO_VOCAB_RANGE[1]:
        raise ConversionError(
            f"vocab_size={vocab_size} is outside {_DEMO_VOCAB_RANGE[0]}..{_DEMO_VOCAB_RANGE[1]}: the demo vocabulary "
            "holds 3 meta, 16 special and 256 byte pieces plus every character of DEMO_TEXT, and the few KB of "
            "training text support about a thousand pieces"
        )
    lines = [line for line in DEMO_TEXT.splitlines() if line.strip()]
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=buffer,
            vocab_size=vocab_size,
            user_defined_symbols=[EOD_TOKEN, *YUAN_EXTRA_TOKENS],
            **_DEMO_SPM_OPTIONS,
        )
    except RuntimeError as err:
        raise ConversionError(
            f"training the demo SentencePiece model (vocab_size={vocab_size}) failed: {err}"
        ) from None
    with tempfile.TemporaryDirectory(prefix="yuan-demo-spm-") as src:
        model_file = Path(src) / "tokenizer.model"
        model_file.write_bytes(buffer.getvalue())
        return convert_tokenizer(model_file, dst, overwrite=overwrite)
