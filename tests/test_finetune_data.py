"""SFT data: IEIT `<sep>` masks, chat masks, JSONL errors with line numbers, over-long samples, packing, collator."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from yuan_hf.finetune import SFTDataCollator, SFTDataError, build_sft_dataset, encode_chat, encode_ieit, pack_examples
from yuan_hf.finetune.data import IGNORE_INDEX
from yuan_hf.finetune.toy import TOY_CHAT_TEMPLATE_NO_MARKERS, toy_tokenizer

X = IGNORE_INDEX


@pytest.fixture(scope="module")
def tokenizer():
    return toy_tokenizer()  # <eod> = 3, <sep> = 4, <pad> = 5, word wN = id N


def write_lines(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------- masks


def test_ieit_sep_mask_on_hand_built_examples(tokenizer):
    assert encode_ieit("w7 w8", "w9 w10", tokenizer) == {
        "input_ids": [7, 8, 4, 9, 10, 3],
        "labels": [X, X, X, 9, 10, 3],  # everything up to and including <sep> masked; answer and <eod> learned
    }
    assert encode_ieit("w20", "w21", tokenizer) == {"input_ids": [20, 4, 21, 3], "labels": [X, X, 21, 3]}
    # a <sep> inside the prompt (IEIT's multi-turn history) is prompt too: only the one we add ends it
    assert encode_ieit("w7<sep>w8", "w9", tokenizer) == {"input_ids": [7, 4, 8, 4, 9, 3], "labels": [X, X, X, X, 9, 3]}


def test_ieit_errors(tokenizer):
    with pytest.raises(ValueError, match="no answer"):
        encode_ieit("w7", "   ", tokenizer)
    with pytest.raises(SFTDataError, match="has no sep_token"):
        encode_ieit("w7", "w8", _TokenizerWithoutSep(toy_tokenizer()))


class _TokenizerWithoutSep:
    """Delegates to a tokenizer but knows no `<sep>` (as a generic LLaMA-style tokenizer)."""

    def __init__(self, inner):
        self._inner = inner
        self.sep_token = None
        self.unk_token_id = inner.unk_token_id

    def convert_tokens_to_ids(self, token):
        return self.unk_token_id if token == "<sep>" else self._inner.convert_tokens_to_ids(token)

    def __getattr__(self, name):
        return getattr(self._inner, name)


CONVERSATION = [
    {"role": "user", "content": "w7 w8"},
    {"role": "assistant", "content": "w9"},
    {"role": "user", "content": "w11"},
    {"role": "assistant", "content": "w12 w13"},
]


def test_chat_mask_keeps_only_assistant_answers(tokenizer):
    # toy template: user<sep>answer<eod> per turn, every answer (with its <eod>) learned
    assert encode_chat(CONVERSATION, tokenizer) == {
        "input_ids": [7, 8, 4, 9, 3, 11, 4, 12, 13, 3],
        "labels": [X, X, X, 9, 3, X, X, 12, 13, 3],
    }


def test_chat_mask_without_generation_markers_matches(tokenizer):
    no_markers = toy_tokenizer(chat_template=TOY_CHAT_TEMPLATE_NO_MARKERS)
    assert encode_chat(CONVERSATION, no_markers) == encode_chat(CONVERSATION, tokenizer)


def test_chat_errors(tokenizer):
    with pytest.raises(ValueError, match="no answer"):
        encode_chat([{"role": "user", "content": "w7"}], tokenizer)
    with pytest.raises(ValueError, match="chat template rejected"):
        encode_chat([{"role": "tool", "content": "w7"}, {"role": "assistant", "content": "w8"}], tokenizer)
    bare = toy_tokenizer(chat_template=None)
    with pytest.raises(SFTDataError, match="no chat_template"):
        encode_chat(CONVERSATION, bare)


def test_yuan_tokenizer_ieit_and_chat_formats_agree():
    """With the converted Yuan tokenizer's template a one-turn chat is exactly IEIT's prompt<sep>answer<eod>,
    and in a multi-turn chat only the answer after the last user turn is learned (IEIT's format)."""
    tokenizer_module = pytest.importorskip(
        "yuan_hf.conversion.writers.tokenizer", reason="the Yuan tokenizer converter is not in this checkout"
    )
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        yuan = AutoTokenizer.from_pretrained(tokenizer_module.build_demo_tokenizer(tmp + "/tok"))
    ieit = encode_ieit("hello world", "the answer", yuan)
    chat = encode_chat(
        [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "the answer"}], yuan
    )
    assert ieit == chat
    sep = ieit["input_ids"].index(yuan.sep_token_id)
    assert ieit["labels"][: sep + 1] == [X] * (sep + 1) and ieit["labels"][sep + 1 :] == ieit["input_ids"][sep + 1 :]
    two_turns = encode_chat(
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "ciao"},
        ],
        yuan,
    )
    learned = [t for t in two_turns["labels"] if t != X]
    assert learned == yuan("<sep>ciao<eod>", add_special_tokens=False)["input_ids"][1:]


# -------------------------------------------------------------------------------------------------- JSONL files


def test_malformed_lines_are_reported_with_line_numbers(tmp_path, tokenizer):
    path = write_lines(
        tmp_path / "train.jsonl",
        [
            json.dumps({"prompt": "w7", "response": "w8"}),  # 1 ok
            "{not json",  # 2
            json.dumps(["w7", "w8"]),  # 3 not an object
            json.dumps({"prompt": "w7"}),  # 4 missing response
            json.dumps({"prompt": "w7", "response": ""}),  # 5 no answer
            "",  # 6 blank: ignored
            json.dumps({"prompt": "w7", "response": "w8", "messages": []}),  # 7 two formats
            json.dumps({"messages": [{"role": "user", "content": "w7"}]}),  # 8 chat without answer
            json.dumps({"messages": [{"role": "user", "content": "w9"}, {"role": "assistant", "content": "w10"}]}),
        ],
    )
    with pytest.raises(SFTDataError) as error:
        build_sft_dataset(path, tokenizer, max_length=32)
    message = str(error.value)
    for number in (2, 3, 4, 5, 7, 8):
        assert f"line {number}:" in message
    assert "line 1:" not in message and "line 6:" not in message and "line 9:" not in message
    assert "6 malformed record(s)" in message and "on_malformed" in message
    assert "invalid JSON" in message and "missing key(s) ['response']" in message and "no answer" in message

    dataset = build_sft_dataset(path, tokenizer, max_length=32, on_malformed="skip", packing=False)
    assert dataset.stats.malformed == 6 and dataset.stats.malformed_lines == [2, 3, 4, 5, 7, 8]
    assert dataset.stats.samples == 2 and dataset.stats.records == 8
    assert [row["input_ids"] for row in dataset] == [[7, 4, 8, 3], [9, 4, 10, 3]]


def test_empty_and_missing_datasets_are_clear_errors(tmp_path, tokenizer):
    with pytest.raises(SFTDataError, match="no usable sample.*0 records"):
        build_sft_dataset(write_lines(tmp_path / "empty.jsonl", []), tokenizer, max_length=32)
    with pytest.raises(SFTDataError, match="not found"):
        build_sft_dataset(tmp_path / "missing.jsonl", tokenizer, max_length=32)
    only_bad = write_lines(tmp_path / "bad.jsonl", ["[]"])
    with pytest.raises(SFTDataError, match="no usable sample.*1 malformed"):
        build_sft_dataset(only_bad, tokenizer, max_length=32, on_malformed="skip")


def test_overlong_samples_truncate_or_drop_and_are_counted(tokenizer):
    records = [
        {"prompt": "w7", "response": "w8"},  # 4 tokens
        {"prompt": "w7 w7 w7", "response": "w8 w8 w8 w8"},  # 9 tokens: truncated to 6 keeps 2 answer tokens
        {"prompt": "w7 w7 w7 w7 w7 w7", "response": "w8"},  # 9 tokens, answer starts at 8: nothing left at 6
    ]
    truncated = build_sft_dataset(records, tokenizer, max_length=6, packing=False, overlong="truncate")
    assert (truncated.stats.truncated, truncated.stats.dropped_overlong, truncated.stats.samples) == (1, 1, 2)
    assert truncated.rows[1] == {"input_ids": [7, 7, 7, 4, 8, 8], "labels": [X, X, X, X, 8, 8]}
    assert "1 truncated to 6 tokens, 1 dropped as over-long" in truncated.stats.summary()
    dropped = build_sft_dataset(records, tokenizer, max_length=6, packing=False, overlong="drop")
    assert (dropped.stats.truncated, dropped.stats.dropped_overlong, dropped.stats.samples) == (0, 2, 1)


# ------------------------------------------------------------------------------------------------------ packing


def test_packing_best_fit_decreasing_keeps_every_sample_once():
    lengths = [5, 4, 3, 3, 2, 1]  # 18 tokens: 3 rows of 8 is optimal
    samples = [{"input_ids": [10 + i] * n, "labels": [X] + [20 + i] * (n - 1)} for i, n in enumerate(lengths)]
    rows = pack_examples(samples, 8)
    assert len(rows) == 3 and all(len(r["input_ids"]) <= 8 for r in rows)
    seen = Counter()
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        bounds = starts + [len(row["position_ids"])]
        for start, end in zip(bounds, bounds[1:], strict=False):  # consecutive pairs
            assert row["position_ids"][start:end] == list(range(end - start))
            assert row["labels"][start] == X  # never trained across a sample boundary
            seen[tuple(row["input_ids"][start:end])] += 1
    assert seen == Counter(tuple(s["input_ids"]) for s in samples)
    with pytest.raises(ValueError, match="max_length"):
        pack_examples([{"input_ids": [1] * 9, "labels": [1] * 9}], 8)


def test_built_dataset_packs_and_counts(tokenizer):
    records = [{"prompt": " ".join(["w7"] * n), "response": "w8 w9"} for n in (1, 2, 3, 4, 5, 6)]  # 5..10 tokens
    dataset = build_sft_dataset(records, tokenizer, max_length=16)
    assert dataset.packed and dataset.stats.samples == 6 and dataset.stats.tokens == 45
    assert dataset.stats.rows == len(dataset) == 3  # 45 tokens in rows of 16
    assert dataset.stats.target_tokens == 18  # w8 w9 <eod> per sample
    with pytest.raises(ValueError, match="already packed"):
        dataset.to_hf_dataset()


# ----------------------------------------------------------------------------------------------------- collator


def test_padding_free_collator_concatenates_rows_without_attention_mask():
    rows = [
        {"input_ids": [7, 4, 8, 3, 9, 4, 3], "labels": [X, X, 8, 3, 9, 9, 3], "position_ids": [0, 1, 2, 3, 0, 1, 2]},
        {"input_ids": [10, 4, 11], "labels": [10, X, 11]},  # no positions: one sample; labels as given
    ]
    batch = SFTDataCollator(pad_token_id=5, pad_to_multiple_of=8)(rows)
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[7, 4, 8, 3, 9, 4, 3, 10, 4, 11, 5, 5, 5, 5, 5, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 4, 5]]
    # first label of every sample (and the padding pseudo-sample) is ignored
    assert batch["labels"].tolist() == [[X, X, 8, 3, X, 9, 3, X, X, 11, X, X, X, X, X, X]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 4, 7, 10, 16] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 6


def test_padded_collator_and_its_guard():
    padded = SFTDataCollator(pad_token_id=5, padding_free=False)(
        [{"input_ids": [7, 4, 8], "labels": [X, X, 8]}, {"input_ids": [9, 4], "labels": [X, 4]}]
    )
    assert padded["input_ids"].tolist() == [[7, 4, 8], [9, 4, 5]]
    assert padded["labels"].tolist() == [[X, X, 8], [X, 4, X]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    with pytest.raises(ValueError, match="padding_free=True"):
        SFTDataCollator(pad_token_id=5, padding_free=False)([{"input_ids": [7], "labels": [7], "position_ids": [0]}])
