"""IEIT's Yuan 2.0 SentencePiece ``tokenizer.model`` -> a complete Hugging Face *fast* tokenizer folder.

What IEIT documents (and what ``shared/fixtures/tokenizer/tokenizer_reference.json`` was made with)::

    tok = LlamaTokenizer.from_pretrained(dir, add_eos_token=False, add_bos_token=False, eos_token="<eod>")
    tok.add_tokens(YUAN_EXTRA_TOKENS, special_tokens=True)   # transformers 4.x, slow, legacy=True

:func:`convert_tokenizer` reproduces that setup as ``tokenizer.json`` + ``tokenizer_config.json`` +
``chat_template.jinja`` (+ the original ``tokenizer.model``). Plain ``AutoTokenizer.from_pretrained(dst)``
loads it as a fast ``TokenizersBackend``; neither ``yuan_hf`` nor ``sentencepiece`` is needed to load it.

How (and why this way)
----------------------
* **Conversion machinery.** The ``tokenizers`` pipeline is assembled by transformers' own
  ``LlamaConverter`` in its ``legacy=True`` form: normalizer ``Prepend("▁") + Replace(" ", "▁")``, no
  pre-tokenizer, byte-fallback BPE, decoder ``Replace("▁", " ") + ByteFallback + Fuse + Strip(1 left)``.
  The normalizer runs on every stretch of text *between* added tokens, exactly like the slow legacy
  tokenizer, which calls SentencePiece (with its dummy prefix) once per stretch; this is where the
  reference's lone ``▁`` (29871) after ``<sep>`` comes from. transformers 5's ``LlamaTokenizer`` class is
  not used as the saved class: it rebuilds the pipeline with a ``Metaspace`` pre-tokenizer that does not
  prepend ``▁`` to a stretch already starting with a space (``" "`` would give ``[29871]``, not IEIT's
  ``[259]``). The folder names ``TokenizersBackend``, which loads ``tokenizer.json`` verbatim.
* **Reading the ``.model`` file** needs no ``protobuf`` (transformers' ``SentencePieceExtractor`` does,
  and this project does not depend on it): a small reader decodes the few ``ModelProto`` fields used;
  ``sentencepiece`` itself validates the file and is cross-checked against the reader.
* **Merge order, and where the fast tokenizer is not exact.** SentencePiece BPE repeatedly merges the
  adjacent pair whose *result* has the highest score, ties going to the leftmost pair. A ``tokenizers``
  BPE ranks merges globally. The merges are the pairs transformers' ``generate_merges`` enumerates,
  ranked by score and, within equal scores, by the id of the merged piece (for a SentencePiece-trained
  vocabulary all scores differ and this is exactly the training order). IEIT appended 102953 pieces to
  the Llama vocabulary, 57768 of them with score 0.0 and 15847 with -13.047, so ties are common and
  no global ranking can reproduce position-based tie-breaking. The fast tokenizer equals the reference
  on all of its samples, but on arbitrary text it sometimes picks another valid segmentation: against
  ``sentencepiece``, about 5 % of 5-line Python snippets and 6 % of 3-line Chinese chunks contain a differing token
  (transformers' default tie order: 10 % / 8 %). For ids exactly as in IEIT's training (for example when
  preparing fine-tuning data), use ``transformers.SentencePieceBackend.from_pretrained(dst)`` (needs
  ``sentencepiece``; same special tokens, exact on all of the above).

Settings (decisions)
--------------------
* ``bos_token="<s>"`` (1, never added automatically), ``eos_token="<eod>"`` (77185),
  ``unk_token="<unk>"`` (0), ``sep_token="<sep>"`` (77187), ``add_bos_token=False``,
  ``add_eos_token=False``, ``clean_up_tokenization_spaces=False``: IEIT's values.
* ``pad_token="<pad>"`` (77188). IEIT's setup has no pad token and its generation config pads with
  ``<eod>``; pad == eos makes batched generation and training collators mask real end-of-document
  tokens, so the dedicated ``<pad>`` (already in the vocabulary) is used.
* ``padding_side="left"``: Yuan is decoder-only and batched generation needs the prompt ends aligned.
  Training collators that want right padding set it themselves.
* The 15 extra tokens of IEIT's docs are special added tokens with IEIT's ids: 10 already exist in the
  SentencePiece vocabulary, 5 are appended (``<mask>`` 134953 ... ``<FIM_MIDDLE>`` 134957), so
  ``len(tokenizer) == 134958``. ``<n>`` (77186) is *not* added, as in IEIT's setup.
* **Chat template** (:data:`YUAN_CHAT_TEMPLATE`): IEIT's instruct format ``prompt<sep>answer<eod>``.
  IEIT writes multi-turn history as ``q1<n>a1<n>q2<sep>``, but ``<n>`` is the *line-break escape of IEIT's
  data files*: ``tools/preprocess_data_yuan.py`` and IEIT's eval scripts replace ``<n>`` by ``"\\n"``
  before tokenizing, so the model saw a newline (``<0x0A>``, id 13), never the vocabulary piece ``<n>``
  (77186). The template therefore joins turns with ``"\\n"``: ``q1\\na1\\nq2<sep>a2<eod>``. (FastChat's
  ``yuan2`` template passes the literal text ``<n>``, which tokenizes as ``<``, ``n``, ``>``: neither.)
  ``add_generation_prompt=True`` appends ``<sep>``; the answer after the last user turn ends with
  ``<eod>`` inside ``{% generation %}`` (for ``return_assistant_tokens_mask`` / TRL's assistant-only
  loss); earlier answers are history and carry no ``<eod>``. A system message (first position only) is
  put before the first user turn followed by ``"\\n"``, as FastChat does; Yuan was not trained with
  system prompts. Roles must alternate user/assistant starting with user; anything else raises.

Decoding: fast vs IEIT's slow legacy tokenizer (pinned by ``tests/test_tokenizer.py``)
--------------------------------------------------------------------------------------
``input_ids`` are identical on every reference sample. Decoding:

* Fast: ``decode(encode(text)) == text`` except for one space after every special token that is
  followed by ordinary text (the dummy-prefix ``▁`` that encoding puts at the start of each stretch):
  ``"a<sep>b"`` -> ``"a<sep> b"``. Leading spaces, whitespace runs and ``" "`` round-trip exactly.
  ``spaces_between_special_tokens`` has no effect. ``skip_special_tokens=True`` gives the stretches of
  ordinary text joined by one space (``"a<sep>b<eod>"`` -> ``"a b"``), as the slow tokenizer does except
  for text starting with spaces (see below).
* Slow (the reference's ``decoded``) has the same space after special tokens and deviates further: it
  inserts spaces *before* some special tokens (``"c <FIM_MIDDLE>"``, ``"<pad> <mask>"``), keeps a leading
  space for a sequence starting with a lone ``▁`` when special tokens follow (``" 用户：你好<sep> …"``),
  drops one space too many at the start (``"    x"`` -> ``"   x"``, ``" "`` -> ``""``), and with
  ``spaces_between_special_tokens=False`` drops the space after the appended ``<FIM_*>`` tokens but not
  after tokens already in the vocabulary (``<commit_*>``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .common import ConversionError
from .native.output import atomic_output_dir
from .sentencepiece_model import _MODEL_TYPES, _PIECE_CONTROL, _PIECE_USER_DEFINED, SentencePieceModel, read_sentencepiece_model

__all__ = [
    "EOD_TOKEN",
    "PAD_TOKEN",
    "SEP_TOKEN",
    "YUAN_CHAT_TEMPLATE",
    "YUAN_EXTRA_TOKENS",
    "convert_tokenizer",
]

EOD_TOKEN = "<eod>"
SEP_TOKEN = "<sep>"
PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
UNK_TOKEN = "<unk>"

#: The tokens IEIT's docs add with ``add_tokens(..., special_tokens=True)``, in IEIT's order (the order
#: decides the ids of those missing from the SentencePiece vocabulary).
YUAN_EXTRA_TOKENS: tuple[str, ...] = (
    "<sep>",
    "<pad>",
    "<mask>",
    "<predict>",
    "<FIM_SUFFIX>",
    "<FIM_PREFIX>",
    "<FIM_MIDDLE>",
    "<commit_before>",
    "<commit_msg>",
    "<commit_after>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<empty_output>",
)

#: Jinja chat template for IEIT's instruct format; see the module docstring for the decisions.
YUAN_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content'] -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_message = none -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- if not loop_messages -%}"
    "{{- raise_exception('Yuan chat template: the conversation needs at least one user message') -}}"
    "{%- endif -%}"
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] not in ['user', 'assistant'] -%}"
    "{{- raise_exception('Yuan chat template: unsupported role ' ~ message['role'] ~ "
    "' (only one leading system message, then user/assistant)') -}}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Yuan chat template: roles must alternate user/assistant, starting with user') -}}"
    "{%- endif -%}"
    "{%- if message['content'] is not string -%}"
    "{{- raise_exception('Yuan chat template: message content must be a string') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if system_message is not none -%}{{- system_message ~ '\\n' -}}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if loop.index0 <= ns.last_user -%}"
    "{%- if loop.index0 > 0 -%}{{- '\\n' -}}{%- endif -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{{- '<sep>' -}}"
    "{%- generation -%}{{- message['content'] ~ '<eod>' -}}{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and loop_messages[-1]['role'] == 'user' -%}{{- '<sep>' -}}{%- endif -%}"
)

def _is_tokenizer_folder(folder: Path) -> bool:
    """A previous output of :func:`convert_tokenizer` (what ``overwrite`` may replace)."""
    return (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()


def _resolve_source(src: str | os.PathLike) -> Path:
    src = Path(src)
    if src.is_dir():
        model = src / "tokenizer.model"
        if not model.is_file():
            raise ConversionError(
                f"{src} has no tokenizer.model; pass the folder holding IEIT's SentencePiece tokenizer.model "
                "(the tokenizer/ folder of IEIT's repository or the HF checkpoint folder) or the .model file itself"
            )
        return model
    if src.is_file():
        return src
    raise ConversionError(f"tokenizer source {src} does not exist; pass IEIT's tokenizer.model or its folder")


def _validate(model_file: Path, proto: SentencePieceModel) -> None:
    """Check the model with ``sentencepiece`` itself and against what the conversion reproduces."""
    import sentencepiece as spm

    try:
        processor = spm.SentencePieceProcessor(model_file=str(model_file))
    except (RuntimeError, OSError) as err:
        raise ConversionError(
            f"{model_file} is not a SentencePiece model (sentencepiece: {str(err).strip()}); expected IEIT's "
            "tokenizer.model; re-download it (a Git LFS pointer or a truncated file fails this way)"
        ) from None
    size = processor.get_piece_size()
    if size != len(proto.pieces) or any(
        processor.id_to_piece(i) != proto.pieces[i].piece for i in (0, size // 2, size - 1)
    ):
        raise ConversionError(
            f"{model_file}: sentencepiece and the model reader disagree on the vocabulary; please report this"
        )
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if spec.model_type != 2:
        raise ConversionError(
            f"{model_file} is a {_MODEL_TYPES.get(spec.model_type, spec.model_type)} SentencePiece model; "
            "Yuan's tokenizer is BPE and only BPE models are converted"
        )
    identity = norm.name in ("", "identity") and not norm.precompiled_charsmap
    checks = {
        f"normalizer rule {norm.name!r} (expected 'identity' with no precompiled charsmap)": identity,
        "add_dummy_prefix (expected true)": norm.add_dummy_prefix,
        "remove_extra_whitespaces (expected false)": not norm.remove_extra_whitespaces,
        "escape_whitespaces (expected true)": norm.escape_whitespaces,
        "treat_whitespace_as_suffix (expected false)": not spec.treat_whitespace_as_suffix,
    }
    wrong = [name for name, ok in checks.items() if not ok]
    if wrong:
        raise ConversionError(
            f"{model_file} uses SentencePiece settings this Llama-legacy conversion does not reproduce: "
            + "; ".join(wrong)
            + ". Only Yuan-style (Llama-style) BPE models can be converted"
        )
    vocab = proto.piece_to_id()
    expected_meta = {UNK_TOKEN: 0, BOS_TOKEN: 1}
    missing = [t for t, i in expected_meta.items() if vocab.get(t) != i] + [t for t in (EOD_TOKEN,) if t not in vocab]
    if missing:
        raise ConversionError(
            f"{model_file} does not look like Yuan's tokenizer: {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing (or not at the expected id: <unk>=0, <s>=1; "
            "<eod> must be in the vocabulary); pass IEIT's Yuan 2.0 tokenizer.model"
        )


def _build_backend(proto: SentencePieceModel) -> Any:
    """The ``tokenizers.Tokenizer`` (model, normalizer, decoder, added tokens) via transformers' LlamaConverter."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import LlamaConverter
    from transformers.tokenization_utils_base import generate_merges

    class _YuanLlamaConverter(LlamaConverter):
        # LlamaConverter.__init__ parses the .model with protobuf; the already parsed model is handed in
        # instead and the BPE model is built with an explicit merge order (see module docstring).
        def __init__(self, model: SentencePieceModel) -> None:
            self.proto = model
            self.original_tokenizer = SimpleNamespace(
                legacy=True, add_prefix_space=True, convert_ids_to_tokens=lambda i: model.pieces[i].piece
            )

        def tokenizer(self, proto: SentencePieceModel) -> Tokenizer:
            vocab_scores = self.vocab(proto)
            vocab = {piece: i for i, (piece, _) in enumerate(vocab_scores)}
            merges = generate_merges(vocab, vocab_scores)
            # rank: higher score of the merged piece first; ties in the order of the vocabulary
            rank = {piece: (-score, i) for i, (piece, score) in enumerate(vocab_scores)}
            merges.sort(key=lambda lr: (rank[lr[0] + lr[1]], vocab[lr[0]]))
            tok = Tokenizer(
                BPE(
                    vocab,
                    merges,
                    unk_token=proto.trainer_spec.unk_piece,
                    fuse_unk=True,
                    byte_fallback=proto.trainer_spec.byte_fallback,
                    dropout=None,
                )
            )
            # as SpmConverter: control pieces are special added tokens, user-defined ones plain added tokens
            tok.add_tokens(
                [
                    AddedToken(p.piece, normalized=False, special=p.type == _PIECE_CONTROL)
                    for p in proto.pieces
                    if p.type in (_PIECE_CONTROL, _PIECE_USER_DEFINED)
                ]
            )
            return tok

    return _YuanLlamaConverter(proto).converted()


def convert_tokenizer(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    overwrite: bool = False,
    chat_template: str | None = None,
) -> Path:
    """Convert IEIT's SentencePiece tokenizer into a complete HF fast tokenizer folder at ``dst``.

    Args:
        src: folder holding IEIT's ``tokenizer.model``, or the ``.model`` file itself.
        dst: output folder; written atomically (nothing is left there if the conversion fails).
        overwrite: replace a non-empty ``dst``.
        chat_template: Jinja chat template to store; defaults to :data:`YUAN_CHAT_TEMPLATE`.

    Returns:
        ``dst`` as an absolute path. ``AutoTokenizer.from_pretrained(dst)`` then gives the fast tokenizer
        described in the module docstring (eos ``<eod>``, pad ``<pad>``, left padding, no automatic bos/eos).

    Raises:
        ConversionError: ``src`` is missing or not a Yuan-style SentencePiece BPE model, or ``dst`` is a
            non-empty folder and ``overwrite`` is false.
    """
    from tokenizers import AddedToken
    from transformers import TokenizersBackend

    model_file = _resolve_source(src)
    # entered first so that a non-empty dst is refused before any work; an error below leaves dst untouched
    with atomic_output_dir(dst, overwrite=overwrite, sources=[model_file], replaceable=_is_tokenizer_folder) as tmp:
        proto = read_sentencepiece_model(model_file)
        _validate(model_file, proto)
        backend = _build_backend(proto)
        # IEIT's add_tokens(..., special_tokens=True): pieces already in the vocabulary keep their id, the
        # others are appended in order
        specials = [EOD_TOKEN, *YUAN_EXTRA_TOKENS]
        backend.add_special_tokens(
            [
                AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
                for t in specials
            ]
        )
        tokenizer = TokenizersBackend(
            tokenizer_object=backend,
            bos_token=BOS_TOKEN,
            eos_token=EOD_TOKEN,
            unk_token=UNK_TOKEN,
            pad_token=PAD_TOKEN,
            sep_token=SEP_TOKEN,
            extra_special_tokens=[t for t in YUAN_EXTRA_TOKENS if t not in (SEP_TOKEN, PAD_TOKEN)],
            add_bos_token=False,
            add_eos_token=False,
            clean_up_tokenization_spaces=False,
            padding_side="left",
            chat_template=YUAN_CHAT_TEMPLATE if chat_template is None else chat_template,
        )
        _check_converted(tokenizer, model_file, specials)
        tokenizer.save_pretrained(str(tmp))
        shutil.copyfile(model_file, tmp / "tokenizer.model")
        _finish_folder(tmp)
    return Path(dst).absolute()


def _check_converted(tokenizer: Any, model_file: Path, specials: Sequence[str]) -> None:
    for token in specials:
        if not tokenizer.convert_tokens_to_ids(token) or token not in tokenizer.all_special_tokens:
            raise ConversionError(f"{model_file}: {token} did not become a special token; please report this")
    if tokenizer.eos_token_id == tokenizer.pad_token_id:
        raise ConversionError(f"{model_file}: <pad> and <eod> share an id; please report this")


def _finish_folder(folder: Path) -> None:
    """Make the saved config explicit about IEIT's no-bos/no-eos setting and check the folder is complete."""
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") != "TokenizersBackend" or not (folder / "tokenizer.json").is_file():
        raise ConversionError(f"transformers wrote an unexpected tokenizer folder ({config_file}); please report this")
    # TokenizersBackend defaults to False already; written out so that readers of the file need not know that
    config.update(add_bos_token=False, add_eos_token=False)
    config_file.write_text(
        json.dumps(dict(sorted(config.items())), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
