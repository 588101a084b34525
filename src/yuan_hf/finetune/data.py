"""SFT data: IEIT's `prompt<sep>answer<eod>` format and chat messages, loss masks, packing, the collator.

Records (one JSON object per line of a JSONL file):

- `{"prompt": str, "response": str}`: IEIT's instruct format. The text `prompt + "<sep>" + response + "<eod>"`
  is tokenized in one piece, as IEIT's SFT did (so the tokens right after `<sep>` are the ones the model saw);
  labels are -100 for every token up to and including `<sep>`, the answer and `<eod>` are learned.
- `{"messages": [{"role": ..., "content": ...}, ...]}`: rendered with the tokenizer's chat template; only
  assistant answers are learned. Templates with `{% generation %}` markers use transformers'
  `return_assistant_tokens_mask`; other templates are rendered turn by turn and each answer is the difference
  between the conversation up to it and the conversation before it (checked to be a prefix).

Packing puts several samples in one row of at most `max_length` tokens (best-fit decreasing) with `position_ids`
restarting at 0 for each sample and no attention mask: the model then restarts attention and its LF convolution
per sample (DESIGN.md section 6). The first label of every sample is -100, so no token is trained to predict
across a sample boundary: a packed row's loss is the token-weighted mean of its samples' losses.
"""

from __future__ import annotations

import bisect
import codecs
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100
RecordFormat = Literal["auto", "ieit", "chat"]
RECORD_FORMATS: tuple[str, ...] = ("auto", "ieit", "chat")
OVERLONG_POLICIES: tuple[str, ...] = ("truncate", "drop")
MALFORMED_POLICIES: tuple[str, ...] = ("raise", "skip")
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
_MAX_LISTED_ERRORS = 20


class SFTDataError(ValueError):
    """A dataset problem the user must fix (malformed lines, no usable samples, tokenizer without `<sep>`...)."""


class _SampleError(ValueError):
    """One record cannot be used; reported with its line number."""


@dataclass
class SFTDataStats:
    """What happened to the data; `summary()` is logged by `build_sft_dataset`."""

    source: str = "<records>"
    records: int = 0  # non-empty lines / records read
    samples: int = 0  # samples kept
    truncated: int = 0  # kept, cut to max_length
    dropped_overlong: int = 0  # longer than max_length (overlong="drop", or nothing to learn left after the cut)
    malformed: int = 0  # skipped records (on_malformed="skip")
    malformed_lines: list[int] = field(default_factory=list)
    rows: int = 0  # dataset rows (packed rows with packing, else samples)
    tokens: int = 0  # tokens in all rows
    target_tokens: int = 0  # tokens with a label (after the per-sample shift)
    max_length: int = 0
    packing: bool = False  # rows hold several samples

    def summary(self) -> str:
        fill = self.tokens / (self.rows * self.max_length) if self.rows and self.max_length else 0.0
        rows = f"{self.rows} packed rows" if self.packing else f"{self.rows} rows (no packing)"
        return (
            f"SFT data {self.source}: {self.records} records -> {self.samples} samples "
            f"({self.truncated} truncated to {self.max_length} tokens, {self.dropped_overlong} dropped as over-long, "
            f"{self.malformed} malformed skipped) -> {rows}, {self.tokens} tokens "
            f"({self.target_tokens} trained, row fill {fill:.0%})"
        )


# ----------------------------------------------------------------------------------------------- tokenizer helpers


def _special_id(tokenizer: Any, attribute: str, fallback_token: str | None) -> tuple[str, int]:
    """(token string, id) of a special token, checked to exist as a single vocabulary entry."""
    token = getattr(tokenizer, attribute, None) or fallback_token
    token_id = tokenizer.convert_tokens_to_ids(token) if token is not None else None
    if token is None or token_id is None or token_id == tokenizer.unk_token_id:
        raise SFTDataError(
            f"the tokenizer ({type(tokenizer).__name__}) has no {attribute} ({fallback_token or attribute!r} not in "
            "its vocabulary); Yuan's SFT format needs `<sep>` and `<eod>` as special tokens: use the converted "
            "Yuan tokenizer or add them with tokenizer.add_special_tokens(...)"
        )
    return token, int(token_id)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ------------------------------------------------------------------------------------------------------- encoding


def encode_ieit(prompt: str, response: str, tokenizer: Any) -> dict[str, list[int]]:
    """IEIT's format: `prompt<sep>response<eod>` -> `{"input_ids", "labels"}` (lists of the same length).

    labels: -100 for the prompt and `<sep>`, the token id for the answer and the final `<eod>`.
    """
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise _SampleError(
            f"'prompt' and 'response' must be strings, got {type(prompt).__name__} and {type(response).__name__}"
        )
    if not response.strip():
        raise _SampleError("the sample has no answer ('response' is empty)")
    sep_token, sep_id = _special_id(tokenizer, "sep_token", "<sep>")
    eos_token, eos_id = _special_id(tokenizer, "eos_token", "<eod>")
    prefix = _encode(tokenizer, prompt + sep_token)
    input_ids = _encode(tokenizer, prompt + sep_token + response + eos_token)
    if not prefix or prefix[-1] != sep_id or input_ids[: len(prefix)] != prefix or input_ids[-1] != eos_id:
        raise SFTDataError(
            f"the tokenizer does not encode {sep_token!r} (id {sep_id}) and {eos_token!r} (id {eos_id}) as single "
            "tokens that split the text; register them as special tokens (tokenizer.add_special_tokens)"
        )
    labels = [IGNORE_INDEX] * len(prefix) + input_ids[len(prefix) :]
    return {"input_ids": input_ids, "labels": labels}


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise _SampleError("'messages' must be a non-empty list of {'role', 'content'} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise _SampleError(f"messages[{index}] must be an object with a string 'role', got {message!r:.80}")
        if not isinstance(message.get("content"), str):
            raise _SampleError(f"messages[{index}]['content'] must be a string")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise _SampleError("the conversation has no answer (no non-empty assistant message)")


def _render(tokenizer: Any, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> dict[str, Any]:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True, **kwargs)
    except TemplateError as error:  # the template's raise_exception(...): roles out of order, bad content, ...
        raise _SampleError(f"the chat template rejected the conversation: {error}") from error


def encode_chat(messages: Sequence[Mapping[str, Any]], tokenizer: Any) -> dict[str, list[int]]:
    """Chat messages -> `{"input_ids", "labels"}` with labels only on assistant answers (everything else -100)."""
    _check_messages(messages)
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise SFTDataError(
            f"the tokenizer ({type(tokenizer).__name__}) has no chat_template, needed for 'messages' records; "
            "use the converted Yuan tokenizer, set tokenizer.chat_template, or write records as prompt/response"
        )
    if _GENERATION_MARKER.search(template):
        rendered = _render(tokenizer, messages, return_assistant_tokens_mask=True)
        input_ids, mask = list(rendered["input_ids"]), list(rendered["assistant_masks"])
    else:
        input_ids, mask = _assistant_mask_by_prefixes(messages, tokenizer)
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(input_ids, mask, strict=True)]
    if all(label == IGNORE_INDEX for label in labels):
        raise _SampleError(
            "the chat template marks no assistant token to learn (e.g. the conversation ends with a user turn, or "
            "the template only trains answers after the last user message)"
        )
    return {"input_ids": input_ids, "labels": labels}


def _assistant_mask_by_prefixes(messages: Sequence[Mapping[str, Any]], tokenizer: Any) -> tuple[list[int], list[int]]:
    """Templates without generation markers: answer i = render(messages[:i+1]) minus render(messages[:i], prompt)."""
    input_ids = list(_render(tokenizer, messages)["input_ids"])
    mask = [0] * len(input_ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = list(_render(tokenizer, messages[:index], add_generation_prompt=True)["input_ids"]) if index else []
        through = list(_render(tokenizer, messages[: index + 1])["input_ids"])
        if input_ids[: len(through)] != through or through[: len(before)] != before:
            raise SFTDataError(
                f"the chat template renders the conversation before assistant turn {index} differently from the full "
                "conversation, so the answer tokens cannot be located; add {% generation %} ... {% endgeneration %} "
                "around assistant answers in the template (transformers' return_assistant_tokens_mask)"
            )
        mask[len(before) : len(through)] = [1] * (len(through) - len(before))
    return input_ids, mask


def encode_record(record: Mapping[str, Any], tokenizer: Any, *, format: RecordFormat = "auto") -> dict[str, list[int]]:
    """One JSON record (`{"prompt", "response"}` or `{"messages"}`) -> `{"input_ids", "labels"}`."""
    if format not in RECORD_FORMATS:
        raise ValueError(f"format must be one of {RECORD_FORMATS}, got {format!r}")
    if not isinstance(record, Mapping):
        raise _SampleError(f"expected a JSON object, got {type(record).__name__}")
    has_chat, has_ieit = "messages" in record, "prompt" in record or "response" in record
    if has_chat and has_ieit:
        raise _SampleError("the record has both 'messages' and 'prompt'/'response'; use one format per record")
    if format == "chat" or (format == "auto" and has_chat):
        if not has_chat:
            raise _SampleError("expected a 'messages' record (format='chat')")
        return encode_chat(record["messages"], tokenizer)
    missing = [key for key in ("prompt", "response") if key not in record]
    if missing:
        keys = sorted(record)
        raise _SampleError(f"missing key(s) {missing}; expected {{'prompt', 'response'}} or {{'messages'}}, got {keys}")
    return encode_ieit(record["prompt"], record["response"], tokenizer)


# ------------------------------------------------------------------------------------------------- reading files


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, Any]]:
    """`[(line_number, parsed_object_or_error), ...]` for the non-blank lines of a JSONL file (1-based numbers).

    Lines that are not valid JSON or not UTF-8 come back as `_SampleError` instances so the caller reports them with
    the rest. A UTF-8 byte-order mark at the start of the file is ignored; a UTF-16 file is an error.
    """
    if not os.path.isfile(path):
        raise SFTDataError(f"dataset file not found: {path}")
    items: list[tuple[int, Any]] = []
    with open(path, "rb") as handle:  # bytes: one undecodable line must not hide the others
        for number, raw in enumerate(handle, start=1):
            if number == 1:
                if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
                    raise SFTDataError(
                        f"{path} is UTF-16 text (it starts with a UTF-16 byte-order mark); JSONL must be UTF-8: "
                        "save the file as UTF-8"
                    )
                raw = raw.removeprefix(codecs.BOM_UTF8)  # written by some Windows editors; not data
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                problem = f"not UTF-8 text (byte 0x{raw[error.start]:02x} at byte {error.start + 1} of the line)"
                items.append((number, _SampleError(problem + "; save the file as UTF-8")))
                continue
            if not line.strip():
                continue
            try:
                items.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                items.append((number, _SampleError(f"invalid JSON ({error.msg} at column {error.colno})")))
    return items


# --------------------------------------------------------------------------------------------- length & packing


def fit_length(
    example: dict[str, list[int]], max_length: int, overlong: str
) -> tuple[dict[str, list[int]] | None, str]:
    """Apply the over-long policy. Returns (example or None, "kept" | "truncated" | "dropped").

    `"truncate"` keeps the first `max_length` tokens (the answer's end is lost) and drops the sample when no
    answer token survives; `"drop"` drops every sample longer than `max_length`.
    """
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
    if len(example["input_ids"]) <= max_length:
        return example, "kept"
    if overlong == "drop":
        return None, "dropped"
    cut = {key: value[:max_length] for key, value in example.items()}
    if all(label == IGNORE_INDEX for label in cut["labels"][1:]):
        return None, "dropped"
    return cut, "truncated"


def pack_examples(examples: Sequence[Mapping[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Pack samples into rows of at most `max_length` tokens, best-fit decreasing (deterministic).

    Each row: `input_ids`, `labels`, `position_ids` (0..n_i-1 per sample) with the first label of every sample
    set to -100. Samples must already fit (`fit_length`).
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[list[int]] = []  # sample indices per row
    free: list[tuple[int, int]] = []  # sorted (free space, row index)
    for index in order:
        length = len(examples[index]["input_ids"])
        if length > max_length:
            raise ValueError(f"pack_examples: sample {index} has {length} tokens > max_length {max_length}")
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):  # the tightest row it fits in
            space, row = free.pop(slot)
        else:
            space, row = max_length, len(rows)
            rows.append([])
        rows[row].append(index)
        bisect.insort(free, (space - length, row))
    return [concat_samples([examples[i] for i in row]) for row in rows]


def concat_samples(samples: Iterable[Mapping[str, list[int]]]) -> dict[str, list[int]]:
    """Concatenate samples into one packed row with restarting `position_ids`; first label of each = -100."""
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for sample in samples:
        n = len(sample["input_ids"])
        row["input_ids"].extend(sample["input_ids"])
        row["labels"].extend([IGNORE_INDEX, *sample["labels"][1:]] if n else [])
        row["position_ids"].extend(range(n))
    return row


# ------------------------------------------------------------------------------------------------------ dataset


class SFTDataset(torch.utils.data.Dataset):
    """Tokenized SFT rows (`input_ids`, `labels`, and `position_ids` when packed) plus the `stats` of building them."""

    def __init__(self, rows: list[dict[str, list[int]]], stats: SFTDataStats, *, packed: bool):
        self.rows = rows
        self.stats = stats
        self.packed = packed

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.rows[index]

    def to_hf_dataset(self):
        """A `datasets.Dataset` with `input_ids` and `labels`, for TRL's SFTTrainer (which packs by itself)."""
        if self.packed:
            raise ValueError(
                "to_hf_dataset: this dataset is already packed; build it with packing=False and let SFTTrainer pack "
                "(SFTConfig(packing=True, padding_free=True))"
            )
        import datasets

        return datasets.Dataset.from_dict(
            {"input_ids": [r["input_ids"] for r in self.rows], "labels": [r["labels"] for r in self.rows]}
        )


def build_sft_dataset(
    source: str | os.PathLike | Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    max_length: int,
    packing: bool = True,
    overlong: Literal["truncate", "drop"] = "truncate",
    on_malformed: Literal["raise", "skip"] = "raise",
    format: RecordFormat = "auto",
) -> SFTDataset:
    """Read, tokenize, mask, length-check and (optionally) pack SFT data.

    Args:
        source: A JSONL file path, or a sequence of records (dicts; numbered from 1 in messages).
        tokenizer: Any Hugging Face tokenizer with `<sep>` (sep_token) and an eos token (`<eod>`); a chat template
            for `messages` records.
        max_length: Longest row (and sample) in tokens.
        packing: Pack samples into rows (with `position_ids`); else one sample per row.
        overlong: `"truncate"` or `"drop"` samples longer than `max_length` (counted in `stats`).
        on_malformed: `"raise"`: collect every bad line and raise one `SFTDataError` listing them with line
            numbers; `"skip"`: log them and go on (counted in `stats.malformed`).
        format: `"auto"` (per record), `"ieit"` or `"chat"`.

    Returns:
        An `SFTDataset`; rows are dicts of Python int lists. `dataset.stats.summary()` is logged.
    """
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    if on_malformed not in MALFORMED_POLICIES:
        raise ValueError(f"on_malformed must be one of {MALFORMED_POLICIES}, got {on_malformed!r}")
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
    if isinstance(source, (str, os.PathLike)):
        items, stats = read_jsonl(source), SFTDataStats(source=str(source))
    else:
        items, stats = list(enumerate(source, start=1)), SFTDataStats()
    stats.max_length, stats.records, stats.packing = max_length, len(items), packing
    errors: list[str] = []
    samples: list[dict[str, list[int]]] = []
    for number, record in items:
        try:
            if isinstance(record, _SampleError):
                raise record
            example = encode_record(record, tokenizer, format=format)
        except _SampleError as error:
            errors.append(f"line {number}: {error}")
            stats.malformed_lines.append(number)
            continue
        example, outcome = fit_length(example, max_length, overlong)
        if example is None:
            stats.dropped_overlong += 1
            continue
        stats.truncated += outcome == "truncated"
        samples.append(example)
    if errors:
        if len(errors) == 1:  # one line, as the CLI prints it
            message = f"malformed record in {stats.source}, {errors[0]}"
            fix = ". Fix it, or set on_malformed='skip' (data.on_malformed=skip) to skip it."
        else:
            listed = "\n  ".join(errors[:_MAX_LISTED_ERRORS])
            more = f"\n  ... and {len(errors) - _MAX_LISTED_ERRORS} more" if len(errors) > _MAX_LISTED_ERRORS else ""
            message = f"{len(errors)} malformed record(s) in {stats.source}:\n  {listed}{more}"
            fix = "\nFix them, or set on_malformed='skip' (data.on_malformed=skip) to skip them."
        if on_malformed == "raise":
            raise SFTDataError(message + fix)
        stats.malformed = len(errors)
        logger.warning(message + "\n(skipped: on_malformed='skip')")
    if not samples:
        raise SFTDataError(
            f"no usable sample in {stats.source}: {stats.records} records, {stats.malformed or len(errors)} malformed, "
            f"{stats.dropped_overlong} dropped as longer than max_length={max_length}. Check the file and max_length."
        )
    rows = pack_examples(samples, max_length) if packing else samples
    stats.samples, stats.rows = len(samples), len(rows)
    stats.tokens = sum(len(row["input_ids"]) for row in rows)
    stats.target_tokens = sum(sum(label != IGNORE_INDEX for label in s["labels"][1:]) for s in samples)
    if stats.truncated or stats.dropped_overlong:
        logger.warning(stats.summary())
    else:
        logger.info(stats.summary())
    return SFTDataset(rows, stats, packed=packing)


# ------------------------------------------------------------------------------------------------------ collator


@dataclass
class SFTDataCollator:
    """Batches `SFTDataset` rows (or any `{"input_ids", "labels"?, "position_ids"?}` features).

    `padding_free=True` (default): all rows of the batch are concatenated into one row `[1, T]` with
    `position_ids` restarting at every sample and **no attention mask**; the model detects the packing from the
    positions (sdpa / eager: block-diagonal causal mask; flash-attention: varlen, helped by the
    `cu_seq_lens_q/k` and `max_length_q/k` this collator adds). No compute is spent on padding.

    `padding_free=False`: rows are right-padded to the longest (`attention_mask` given, labels -100 on padding).
    Packed rows need `padding_free=True` (with an attention mask the model ignores the restarts).

    Output shapes: `input_ids`, `labels`, `position_ids`: `[1, T]` (padding-free) or `[b, L]` with
    `attention_mask` `[b, L]`; `cu_seq_lens_q/k`: `[num_sequences + 1]` int32.
    """

    pad_token_id: int
    padding_free: bool = True
    pad_to_multiple_of: int | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, **kwargs: Any) -> SFTDataCollator:
        """Use the tokenizer's pad token (Yuan: `<pad>`)."""
        if tokenizer.pad_token_id is None:
            raise SFTDataError(
                f"the tokenizer ({type(tokenizer).__name__}) has no pad token; set tokenizer.pad_token (Yuan: '<pad>')"
            )
        return cls(pad_token_id=int(tokenizer.pad_token_id), **kwargs)

    def __call__(self, features: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, Any]:
        if not features:
            raise ValueError("SFTDataCollator: empty batch")
        rows = []
        for feature in features:
            input_ids = list(feature["input_ids"])
            labels = list(feature["labels"]) if feature.get("labels") is not None else list(input_ids)
            positions = feature.get("position_ids")
            positions = list(range(len(input_ids))) if positions is None else list(positions)
            if not len(input_ids) == len(labels) == len(positions):
                raise ValueError(
                    f"SFTDataCollator: input_ids, labels and position_ids lengths differ: {len(input_ids)}, "
                    f"{len(labels)}, {len(positions)}"
                )
            rows.append((input_ids, labels, positions, feature.get("position_ids") is not None))
        if self.padding_free:
            return self._padding_free(rows)
        if any(packed for *_, packed in rows):
            raise ValueError(
                "SFTDataCollator: packed rows (with position_ids) need padding_free=True: with an attention mask the "
                "model would not restart attention at each sample"
            )
        return self._padded(rows)

    def _padded_length(self, length: int) -> int:
        multiple = self.pad_to_multiple_of
        return length if not multiple else -(-length // multiple) * multiple

    def _padding_free(self, rows: list) -> dict[str, Any]:
        input_ids = [t for ids, *_ in rows for t in ids]
        labels = [t for _, lbl, *_ in rows for t in lbl]
        positions = [p for _, _, pos, _ in rows for p in pos]
        pad = self._padded_length(len(input_ids)) - len(input_ids)
        # padding at the end is its own pseudo-sample (positions 0..pad-1, no labels): real tokens never see it
        input_ids += [self.pad_token_id] * pad
        labels += [IGNORE_INDEX] * pad
        positions += list(range(pad))
        position_ids = torch.tensor([positions], dtype=torch.long)
        label_tensor = torch.tensor([labels], dtype=torch.long)
        label_tensor[position_ids == 0] = IGNORE_INDEX  # never predict across a sample boundary
        starts = (position_ids[0] == 0).nonzero().flatten()
        cu_seq_lens = torch.cat([starts, torch.tensor([position_ids.shape[1]])]).to(torch.int32)
        max_len = int(cu_seq_lens.diff().max())
        return {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": label_tensor,
            "position_ids": position_ids,
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": max_len,
            "max_length_k": max_len,
        }

    def _padded(self, rows: list) -> dict[str, torch.Tensor]:
        length = self._padded_length(max(len(ids) for ids, *_ in rows))
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for index, (ids, lbl, _, _) in enumerate(rows):
            input_ids[index, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            labels[index, : len(ids)] = torch.tensor(lbl, dtype=torch.long)
            attention_mask[index, : len(ids)] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


__all__ = [
    "IGNORE_INDEX",
    "SFTDataCollator",
    "SFTDataError",
    "SFTDataStats",
    "SFTDataset",
    "build_sft_dataset",
    "concat_samples",
    "encode_chat",
    "encode_ieit",
    "encode_record",
    "fit_length",
    "pack_examples",
    "read_jsonl",
]
