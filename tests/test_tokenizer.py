"""Tokenizer conversion: IEIT's SentencePiece model -> HF fast tokenizer folder, chat template, demo tokenizer.

Tests marked by the ``converted`` fixture need IEIT's real tokenizer from ``../shared/fixtures/tokenizer``
(never copied into the repository); everything else runs on the tiny demo tokenizer the package trains.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from yuan_hf.conversion.common import ConversionError
from yuan_hf.conversion.tokenizer import (
    EOD_TOKEN,
    YUAN_CHAT_TEMPLATE,
    YUAN_EXTRA_TOKENS,
    convert_tokenizer,
)
from yuan_hf.conversion.sentencepiece_model import read_sentencepiece_model
from yuan_hf.conversion.writers.tokenizer import build_demo_tokenizer


from conftest import fixtures_dir

SPECIALS = [EOD_TOKEN, *YUAN_EXTRA_TOKENS]
SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIALS) + ")")


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads((fixtures_dir() / "tokenizer" / "tokenizer_reference.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = fixtures_dir() / "tokenizer"
    return convert_tokenizer(src, tmp_path_factory.mktemp("yuan") / "tokenizer")


@pytest.fixture(scope="module")
def fast(converted: Path):
    return AutoTokenizer.from_pretrained(converted)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_tokenizer(tmp_path_factory.mktemp("demo") / "tokenizer")


@pytest.fixture(scope="module")
def demo(demo_dir: Path):
    return AutoTokenizer.from_pretrained(demo_dir)


def leftovers(parent: Path) -> list[str]:
    """Temporary folders atomic_output_dir may have left next to the destination."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------ real tokenizer


def test_reference_ids_and_tokens(fast, reference):
    for sample in reference["samples"]:
        ids = fast(sample["text"], add_special_tokens=False)["input_ids"]
        assert ids == sample["input_ids"], sample["text"]
        assert fast.convert_ids_to_tokens(ids) == sample["tokens"], sample["text"]
        # the default call adds nothing either (no automatic bos/eos)
        assert fast(sample["text"])["input_ids"] == sample["input_ids"]


def test_settings(fast, converted, reference):
    assert type(fast).__name__ == "TokenizersBackend" and fast.is_fast
    assert len(fast) == reference["len_tokenizer"] == 134958
    assert fast.eos_token == "<eod>" and fast.eos_token_id == reference["eos_token_id"] == 77185
    assert fast.bos_token == "<s>" and fast.bos_token_id == reference["bos_token_id"] == 1
    assert fast.unk_token_id == 0
    assert fast.pad_token == "<pad>" and fast.pad_token_id == 77188 != fast.eos_token_id
    assert fast.sep_token == "<sep>" and fast.sep_token_id == 77187
    assert fast.padding_side == "left"
    assert fast.convert_tokens_to_ids(list(YUAN_EXTRA_TOKENS)) == [
        reference["added_tokens_ids_after_add"][t] for t in YUAN_EXTRA_TOKENS
    ]
    assert fast.convert_tokens_to_ids("<n>") == 77186  # in the vocabulary, but not a special/added token
    assert set(SPECIALS) <= set(fast.all_special_tokens)
    config = json.loads((converted / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "TokenizersBackend"
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    assert sorted(p.name for p in converted.iterdir()) == [
        "chat_template.jinja", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"
    ]  # fmt: skip
    assert fast.chat_template == YUAN_CHAT_TEMPLATE


def test_left_padding_uses_pad_not_eod(fast):
    batch = fast(["你好", "Hello, world! How are you today?"], padding=True)
    short_ids, short_mask = batch["input_ids"][0], batch["attention_mask"][0]
    n_pad = short_mask.count(0)
    assert n_pad > 0 and short_ids[:n_pad] == [77188] * n_pad and short_mask[:n_pad] == [0] * n_pad


def _fast_decode_rule(text: str) -> str:
    """Documented fast behaviour: the text, plus one space after a special token followed by ordinary text."""
    parts = [p for p in SPECIAL_RE.split(text) if p]
    out = []
    for i, part in enumerate(parts):
        after_special = i > 0 and SPECIAL_RE.fullmatch(parts[i - 1])
        out.append(" " + part if after_special and not SPECIAL_RE.fullmatch(part) else part)
    return "".join(out)


def test_decode_behaviour_pinned(fast, reference):
    """Where the fast decode differs from IEIT's slow legacy decode (see the module docstring)."""
    for sample in reference["samples"]:
        ids, text = sample["input_ids"], sample["text"]
        decoded = fast.decode(ids)
        assert decoded == _fast_decode_rule(text), text
        # spaces_between_special_tokens has no effect on the fast tokenizer
        assert fast.decode(ids, spaces_between_special_tokens=False) == decoded
        # skipping special tokens leaves the ordinary-text stretches joined by one space
        skipped = fast.decode(ids, skip_special_tokens=True)
        assert skipped == " ".join(p for p in SPECIAL_RE.split(text) if p and not SPECIAL_RE.fullmatch(p)), text
        # ... which is the slow result too, except that the slow one also loses a leading space of the text
        if not text.startswith(" "):
            assert skipped == sample["decoded_skip_special"], text
        # the slow decode equals the fast one exactly where the slow one round-trips
        assert (decoded == sample["decoded"]) == sample["roundtrip_exact"], text
    by_text = {s["text"]: s for s in reference["samples"]}
    # whitespace the slow tokenizer loses and the fast one keeps
    assert fast.decode(by_text[" "]["input_ids"]) == " " and by_text[" "]["decoded"] == ""
    assert fast.decode([29871, 36264]) == "请问"  # a lone leading ▁ is stripped like any leading space


def test_sentencepiece_backend_is_exact_and_fast_is_not_always(converted, fast, reference):
    """The documented limitation: equal-score merges (IEIT's appended pieces) can segment differently."""
    import sentencepiece as spm
    from transformers import SentencePieceBackend

    exact = SentencePieceBackend.from_pretrained(converted)
    sp = spm.SentencePieceProcessor(model_file=str(converted / "tokenizer.model"))
    for sample in reference["samples"]:
        assert exact(sample["text"], add_special_tokens=False)["input_ids"] == sample["input_ids"]
    for word, sp_pieces, fast_pieces in [
        ("Transpose", ["▁Trans", "pose"], ["▁Tr", "anspose"]),
        ("tqdm", ["▁", "tq", "dm"], ["▁t", "qdm"]),
    ]:
        assert sp.encode(word, out_type=str) == sp_pieces
        assert exact.convert_ids_to_tokens(exact(word)["input_ids"]) == sp_pieces
        assert fast.convert_ids_to_tokens(fast(word)["input_ids"]) == fast_pieces
        assert fast.decode(fast(word)["input_ids"]) == word


def test_chat_template_real_ids(fast, reference):
    question = reference["samples"][0]  # "请问目前最先进的机器学习算法有哪些？"
    prompt = fast.apply_chat_template([{"role": "user", "content": question["text"]}], add_generation_prompt=True)
    assert prompt["input_ids"] == question["input_ids"] + [77187]

    conversation = [
        {"role": "system", "content": "你是助手。"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    text = fast.apply_chat_template(conversation, tokenize=False)
    assert text == "你是助手。\nq1\na1\nq2<sep>a2<eod>"
    out = fast.apply_chat_template(conversation, return_dict=True, return_assistant_tokens_mask=True)
    tokens = "▁ 你是 助手 。 <0x0A> q 1 <0x0A> a 1 <0x0A> q 2 <sep> ▁a 2 <eod>".split(" ")
    assert fast.convert_ids_to_tokens(out["input_ids"]) == tokens
    # newline is the byte piece 13, never the vocabulary piece <n> (77186)
    assert 13 in out["input_ids"] and 77186 not in out["input_ids"]
    # only the final answer (after <sep>, including <eod>) is an assistant token
    assert out["assistant_masks"] == [0] * 14 + [1, 1, 1]


def test_load_needs_neither_yuan_hf_nor_sentencepiece(demo_dir, demo):
    """The saved folder is plain transformers material (the demo folder takes the real one's code path)."""
    text = "你好<sep>Hello<eod>"
    code = (
        "import sys, json\n"
        "sys.modules['sentencepiece'] = None\n"
        "sys.modules['yuan_hf'] = None\n"
        "from transformers import AutoTokenizer\n"
        f"tok = AutoTokenizer.from_pretrained({str(demo_dir)!r})\n"
        f"print(json.dumps([type(tok).__name__, tok({text!r})['input_ids'], tok.pad_token_id]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    name, ids, pad = json.loads(result.stdout.strip().splitlines()[-1])
    assert (name, ids, pad) == ("TokenizersBackend", demo(text)["input_ids"], demo.pad_token_id)


def test_truncated_model_fails(tmp_path):
    data = (fixtures_dir() / "tokenizer" / "tokenizer.model").read_bytes()
    for cut in (100_000, 100_001, 100_002, len(data) - 10):
        src = tmp_path / f"cut{cut}" / "tokenizer.model"
        src.parent.mkdir()
        src.write_bytes(data[:cut])
        dst = tmp_path / "out"
        with pytest.raises(
            ConversionError, match=r"tokenizer\.model is not a readable SentencePiece model .*re-download"
        ):
            convert_tokenizer(src, dst)
        assert not dst.exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------- chat template


def test_chat_template_strings(demo):
    def render(messages, **kwargs):
        return demo.apply_chat_template(messages, tokenize=False, **kwargs)

    user = {"role": "user", "content": "What is 1+1?"}
    answer = {"role": "assistant", "content": "2"}
    assert render([user], add_generation_prompt=True) == "What is 1+1?<sep>"
    assert render([user]) == "What is 1+1?"
    assert render([user, answer]) == "What is 1+1?<sep>2<eod>"
    assert render([user, answer], add_generation_prompt=True) == "What is 1+1?<sep>2<eod>"
    history = [user, answer, {"role": "user", "content": "And 2+2?"}]
    assert render(history, add_generation_prompt=True) == "What is 1+1?\n2\nAnd 2+2?<sep>"
    assert render([*history, {"role": "assistant", "content": "4"}]) == "What is 1+1?\n2\nAnd 2+2?<sep>4<eod>"
    system = {"role": "system", "content": "Be brief."}
    assert render([system, user], add_generation_prompt=True) == "Be brief.\nWhat is 1+1?<sep>"
    assert render([user, answer], continue_final_message=True) == "What is 1+1?<sep>2"


def test_chat_template_ids_on_demo(demo):
    ids = demo.apply_chat_template([{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hi"}])
    sep, eod = demo.sep_token_id, demo.eos_token_id
    assert ids["input_ids"].count(sep) == 1 and ids["input_ids"][-1] == eod
    assert ids["input_ids"] == demo("你好<sep>Hi<eod>")["input_ids"]


@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"role": "assistant", "content": "x"}], "alternate"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "system", "content": "s"}], "at least one user message"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "unsupported role system"),
        ([{"role": "tool", "content": "a"}], "unsupported role tool"),
        ([{"role": "user", "content": [{"type": "text", "text": "a"}]}], "must be a string"),
    ],
)
def test_chat_template_rejects(demo, messages, message):
    with pytest.raises(Exception, match=message):
        demo.apply_chat_template(messages, tokenize=False)


# ------------------------------------------------------------------------------------- demo tokenizer


def test_demo_tokenizer(demo, demo_dir):
    assert type(demo).__name__ == "TokenizersBackend" and len(demo) == 512
    assert demo.convert_tokens_to_ids(["<unk>", "<s>", "</s>", *SPECIALS]) == list(range(19))
    assert (demo.eos_token_id, demo.sep_token_id, demo.pad_token_id, demo.bos_token_id) == (3, 4, 5, 1)
    assert demo.padding_side == "left"
    for text in ["Hello, world!", "你好，世界！", "def f(x):\n    return x", "数学 😀  Ω", "  two spaces", ""]:
        ids = demo(text)["input_ids"]
        assert demo.decode(ids) == text
    assert demo.decode(demo("a<sep>b<eod>")["input_ids"], skip_special_tokens=True) == "a b"
    model = read_sentencepiece_model(demo_dir / "tokenizer.model")
    assert [p.type for p in model.pieces[:19]] == [2, 3, 3] + [4] * 16  # unknown, control, user-defined
    assert model.pieces[19].piece == "<0x00>" and model.pieces[19].type == 6
    assert model.trainer_spec.model_type == 2 and model.trainer_spec.byte_fallback


def test_demo_is_deterministic(demo_dir, tmp_path):
    again = build_demo_tokenizer(tmp_path / "again")
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja"):
        assert (again / name).read_bytes() == (demo_dir / name).read_bytes(), name


def test_demo_vocab_size(tmp_path):
    bigger = AutoTokenizer.from_pretrained(build_demo_tokenizer(tmp_path / "big", vocab_size=800))
    assert len(bigger) == 800 and bigger.eos_token_id == 3
    with pytest.raises(ConversionError, match="vocab_size=100 is outside"):
        build_demo_tokenizer(tmp_path / "small", vocab_size=100)
    assert not (tmp_path / "small").exists()


def test_reader_agrees_with_sentencepiece(demo_dir):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(demo_dir / "tokenizer.model"))
    model = read_sentencepiece_model(demo_dir / "tokenizer.model")
    assert len(model.pieces) == sp.get_piece_size()
    for i, piece in enumerate(model.pieces):
        assert piece.piece == sp.id_to_piece(i) and piece.score == pytest.approx(sp.get_score(i))
        assert (piece.type == 3) == sp.is_control(i) and (piece.type == 6) == sp.is_byte(i)


# -------------------------------------------------------------------------------- errors and atomicity


def _train_spm(path: Path, **options) -> Path:
    import sentencepiece as spm

    lines = ["hello world", "the quick brown fox", "你好世界", "jumps over the lazy dog"] * 5
    settings = dict(vocab_size=60, model_type="bpe", num_threads=1, minloglevel=2, hard_vocab_limit=False)
    settings.update(options)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=f, **settings)
    return path


@pytest.mark.parametrize(
    "make_source, message",
    [
        (lambda d: d, "has no tokenizer.model"),
        (lambda d: d / "missing", "does not exist"),
        (
            lambda d: (d / "tokenizer.model").write_bytes(b"not a model \x00\xff" * 16) and d,
            "not a .*SentencePiece model",
        ),
        (
            lambda d: (d / "tokenizer.model").write_text("version https://git-lfs.github.com/spec/v1\n") and d,
            "SentencePiece model",
        ),
        (
            lambda d: _train_spm(
                d / "tokenizer.model", normalization_rule_name="identity", remove_extra_whitespaces=False
            ),
            "<eod> is missing",
        ),
        (lambda d: _train_spm(d / "tokenizer.model", model_type="unigram"), "UNIGRAM SentencePiece model"),
        (lambda d: _train_spm(d / "tokenizer.model", user_defined_symbols=["<eod>"]), "normalizer rule"),
    ],
    ids=["no-model-in-folder", "missing-path", "garbage", "lfs-pointer", "no-eod", "unigram", "nfkc-normalizer"],
)
def test_conversion_errors_leave_nothing(tmp_path, make_source, message):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src = make_source(src_dir)
    dst = tmp_path / "out"
    with pytest.raises(ConversionError, match=message):
        convert_tokenizer(src, dst)
    assert not dst.exists() and leftovers(tmp_path) == []


def test_non_empty_destination_and_overwrite(demo_dir, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("user data")
    with pytest.raises(ConversionError, match="not empty.*--overwrite"):
        convert_tokenizer(demo_dir, dst)
    assert (dst / "keep.txt").read_text() == "user data"
    with pytest.raises(ConversionError, match="only replaces a previous output.*keep.txt"):
        convert_tokenizer(demo_dir, dst, overwrite=True)  # not a tokenizer folder: the user's file stays
    assert (dst / "keep.txt").read_text() == "user data"
    (dst / "keep.txt").unlink()
    convert_tokenizer(demo_dir, dst)
    (dst / "stale.txt").write_text("from an older conversion")
    convert_tokenizer(demo_dir, dst, overwrite=True)  # a previous tokenizer folder is replaced whole
    assert not (dst / "stale.txt").exists() and (dst / "tokenizer.json").is_file()
    assert leftovers(tmp_path) == []


def test_failure_while_writing_keeps_old_destination(demo_dir, tmp_path, monkeypatch):
    from transformers import TokenizersBackend

    dst = convert_tokenizer(demo_dir, tmp_path / "out")  # a previous conversion, which --overwrite may replace
    (dst / "old.txt").write_text("previous conversion")
    before = sorted(p.name for p in dst.iterdir())

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(TokenizersBackend, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        convert_tokenizer(demo_dir, dst, overwrite=True)
    assert sorted(p.name for p in dst.iterdir()) == before and leftovers(tmp_path) == []


def test_custom_chat_template(demo_dir, tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok = AutoTokenizer.from_pretrained(convert_tokenizer(demo_dir, tmp_path / "out", chat_template=template))
    assert tok.chat_template == template
