"""The TP/PP merge rules as one declarative table: flattened Megatron key -> IEIT-HF key, TP layout, shape.

Each :class:`_Entry` of :data:`_TABLE` names a Megatron tensor, its IEIT-HF target (``{}`` = layer number,
``*`` = one of the parts of a fused tensor), how tensor-parallel ranks share it (README "Tensor-parallel
split semantics" = IEIT's ``tools/split_tp_partitions.py``) and its merged shape. The layouts and fused
transforms hold both directions (``merge``/``split``, ``split``/``join``), so the synthetic writer
(``conversion/writers/megatron.py``) uses the very table the reader does and the two cannot drift apart.

:func:`iter_ieit_stages` is the reader's driver: one pipeline stage at a time, every tensor shape-checked
against the args, read, TP-merged and named like IEIT's HF checkpoint (global layer numbers). The
native sink (``conversion/native``) takes it from there.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..common import ConversionError, KeyTable, check_all_used, tensor_digest
from .args import MegatronDims, args_dict, check_supported
from .checkpoint import MegatronCheckpoint
from .pickle_reader import LazyTensor, flatten_model_state, load_megatron_file

__all__ = ["ENTRIES", "HEAD_COPY", "MEGATRON_TO_IEIT", "bitwise_equal", "ieit_key_shapes", "iter_ieit_stages", "owned", "stage_source_keys", "target_key"]


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


class _Replicated:
    """Every rank holds the whole tensor (norms, LF-gate convolutions, the linear router)."""

    def local_shape(self, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
        return shape

    def split(self, full: torch.Tensor, dims: MegatronDims) -> list[torch.Tensor]:
        return [full] * dims.tp

    def merge(self, shards: Sequence[torch.Tensor], dims: MegatronDims, *, where: str) -> torch.Tensor:
        for rank, shard in enumerate(shards[1:], start=1):
            if not bitwise_equal(shards[0], shard):
                raise ConversionError(
                    f"{where}: this tensor is replicated over tensor-parallel ranks but rank {rank} differs from "
                    "rank 0; the checkpoint is inconsistent (ranks from different runs or iterations?)"
                )
        return shards[0]


@dataclass(frozen=True)
class _Blocks:
    """Contiguous blocks along ``dim``: rank r holds ``full.chunk(tp, dim)[r]``.

    dim 0 (ColumnParallelLinear rows, VocabParallelEmbedding rows): ``get_value``; ``get_query_key``, whose rows
    are per head ``[q_0; k_0; q_1; k_1; ...]`` so rank r holds whole heads ``r*nh/tp ...``; the router's fused
    ``[q; k; v]`` (with E=8, tp=2 rank 0 holds q and half of k); vocab rows. dim 1 (RowParallelLinear): ``dense``.
    """

    dim: int

    def local_shape(self, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
        return tuple(n // tp if i == self.dim else n for i, n in enumerate(shape))

    def split(self, full: torch.Tensor, dims: MegatronDims) -> list[torch.Tensor]:
        return list(full.chunk(dims.tp, dim=self.dim))

    def merge(self, shards: Sequence[torch.Tensor], dims: MegatronDims, *, where: str) -> torch.Tensor:
        return shards[0] if len(shards) == 1 else torch.cat(list(shards), dim=self.dim)


class _ExpertsFc1:
    """GroupedMLP ``weight1`` [H, E*2F] -> rank r [H, E*2F/tp].

    The bytes are consumed as ``view(E, H, 2F)``: per expert ``[gate | up]`` (F columns each). Rank r keeps
    columns ``r*F/tp .. (r+1)*F/tp`` of both halves, ``[gate_r | up_r]`` per expert, viewed back as [H, -1]:
    merging concatenates the gates of all ranks, then the ups.
    """

    def local_shape(self, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
        return (shape[0], shape[1] // tp)

    def split(self, full: torch.Tensor, dims: MegatronDims) -> list[torch.Tensor]:
        if dims.tp == 1:
            return [full]
        gate, up = full.contiguous().view(dims.E, dims.H, 2 * dims.F).chunk(2, dim=-1)  # each [E, H, F]
        gates, ups = gate.chunk(dims.tp, dim=-1), up.chunk(dims.tp, dim=-1)  # tp x [E, H, F/tp]
        return [torch.cat([g, u], dim=-1).view(dims.H, -1) for g, u in zip(gates, ups, strict=True)]

    def merge(self, shards: Sequence[torch.Tensor], dims: MegatronDims, *, where: str) -> torch.Tensor:
        if len(shards) == 1:
            return shards[0]
        halves = [s.contiguous().view(dims.E, dims.H, -1).chunk(2, dim=-1) for s in shards]  # tp x ([E,H,F/tp] x 2)
        gate = [g for g, _ in halves]
        up = [u for _, u in halves]
        return torch.cat(gate + up, dim=-1).view(dims.H, -1)  # [E, H, 2F] -> [H, E*2F]


class _ExpertsFc2:
    """GroupedMLP ``weight2`` [E*F, H] -> rank r ``view(E, F, H)[:, r*F/tp:(r+1)*F/tp]`` viewed as [E*F/tp, H]."""

    def local_shape(self, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
        return (shape[0] // tp, shape[1])

    def split(self, full: torch.Tensor, dims: MegatronDims) -> list[torch.Tensor]:
        if dims.tp == 1:
            return [full]
        per_expert = full.contiguous().view(dims.E, dims.F, dims.H)
        return [block.reshape(-1, dims.H) for block in per_expert.chunk(dims.tp, dim=1)]

    def merge(self, shards: Sequence[torch.Tensor], dims: MegatronDims, *, where: str) -> torch.Tensor:
        if len(shards) == 1:
            return shards[0]
        return torch.cat([s.contiguous().view(dims.E, -1, dims.H) for s in shards], dim=1).view(-1, dims.H)


REPLICATED, ROWS, COLUMNS = _Replicated(), _Blocks(0), _Blocks(1)
EXPERTS_FC1, EXPERTS_FC2 = _ExpertsFc1(), _ExpertsFc2()


# ----------------------------------------------------------------------------------------------------------------
# Megatron tensors that IEIT-HF keeps as several tensors (the ``*`` of a target key)
# ----------------------------------------------------------------------------------------------------------------


def split_query_key(qk: torch.Tensor, dims: MegatronDims) -> list[torch.Tensor]:
    """``get_query_key`` [2P, H] -> IEIT ``q_proj``, ``k_proj`` (each [P, H]) = rows[:P], rows[P:].

    Rows are per head ``[q_0; k_0; q_1; k_1; ...]`` (head_dim rows each), so IEIT's "q_proj" holds q and k of
    heads 0..nh/2-1 and "k_proj" those of the other half (IEIT's convert_hf_moe.py does exactly this).
    """
    return [qk[: dims.P], qk[dims.P :]]


def split_router(qkv: torch.Tensor, dims: MegatronDims) -> list[torch.Tensor]:
    """Attention router ``query_key_value`` [3E, H] = ``[q; k; v]`` -> ``gate.query/key/value``, each [E, H]."""
    return list(qkv.split(dims.E, dim=0))


def join_rows(parts: Iterable[torch.Tensor], dims: MegatronDims) -> torch.Tensor:
    """Inverse of :func:`split_query_key` / :func:`split_router`: stack the parts' rows."""
    return torch.cat(list(parts), dim=0)


def unstack_experts_w1(weight1: torch.Tensor, dims: MegatronDims) -> list[torch.Tensor]:
    """GroupedMLP ``weight1`` [H, E*2F] -> E IEIT ``w1`` [2F, H] (rows ``[gate; up]``).

    The bytes are read as ``view(E, H, 2F)`` (a reinterpretation, not column blocks); expert e is ``[e].T``.
    """
    per_expert = weight1.contiguous().view(dims.E, dims.H, 2 * dims.F)
    return [per_expert[e].T for e in range(dims.E)]


def stack_experts_w1(parts: Iterable[torch.Tensor], dims: MegatronDims) -> torch.Tensor:
    """Inverse of :func:`unstack_experts_w1`: E x [2F, H] -> [H, E*2F], filled one expert at a time."""
    out: torch.Tensor | None = None
    for e, w1 in enumerate(parts):
        if out is None:
            out = torch.empty(dims.E, dims.H, 2 * dims.F, dtype=w1.dtype)
        out[e] = w1.T
    assert out is not None
    return out.view(dims.H, -1)


def unstack_experts_w2(weight2: torch.Tensor, dims: MegatronDims) -> list[torch.Tensor]:
    """GroupedMLP ``weight2`` [E*F, H] -> E IEIT ``w2`` [H, F]: ``view(E, F, H)[e].T``."""
    per_expert = weight2.contiguous().view(dims.E, dims.F, dims.H)
    return [per_expert[e].T for e in range(dims.E)]


def stack_experts_w2(parts: Iterable[torch.Tensor], dims: MegatronDims) -> torch.Tensor:
    """Inverse of :func:`unstack_experts_w2`: E x [H, F] -> [E*F, H], filled one expert at a time."""
    out: torch.Tensor | None = None
    for e, w2 in enumerate(parts):
        if out is None:
            out = torch.empty(dims.E, dims.F, dims.H, dtype=w2.dtype)
        out[e] = w2.T
    assert out is not None
    return out.view(-1, dims.H)


@dataclass(frozen=True)
class _Fused:
    """How one Megatron tensor maps to the IEIT tensors named by the ``*`` of its target key."""

    parts: Callable[[MegatronDims], tuple[str, ...]]
    part_shape: Callable[[MegatronDims], tuple[int, ...]]
    split: Callable[[torch.Tensor, MegatronDims], list[torch.Tensor]]
    join: Callable[[Iterable[torch.Tensor], MegatronDims], torch.Tensor]


QUERY_KEY = _Fused(lambda d: ("q", "k"), lambda d: (d.P, d.H), split_query_key, join_rows)
ROUTER_QKV = _Fused(lambda d: ("query", "key", "value"), lambda d: (d.E, d.H), split_router, join_rows)
EXPERTS_W1 = _Fused(lambda d: tuple(map(str, range(d.E))), lambda d: (2 * d.F, d.H), unstack_experts_w1, stack_experts_w1)
EXPERTS_W2 = _Fused(lambda d: tuple(map(str, range(d.E))), lambda d: (d.H, d.F), unstack_experts_w2, stack_experts_w2)


# ----------------------------------------------------------------------------------------------------------------
# The key table
# ----------------------------------------------------------------------------------------------------------------

_EMBEDDING = "language_model.embedding.word_embeddings.weight"
_FINAL_NORM = "language_model.encoder.final_layernorm.weight"
_OUTPUT_LAYER = "language_model.output_layer.weight"  # untied head (untie_embeddings_and_output_weights)
HEAD_COPY = "word_embeddings_for_head.weight"  # tied head copy on the last stage when PP > 1
_ATTENTION_ROUTER = "language_model.encoder.layers.{}.mlp.router.attention_router.query_key_value.weight"
_LINEAR_ROUTER = "language_model.encoder.layers.{}.mlp.router.weight"
_L = "language_model.encoder.layers.{}."
_T = "model.layers.{}."


@dataclass(frozen=True)
class _Entry:
    source: str  # flattened Megatron key; {} = layer number within the stage
    target: str  # IEIT-HF key; {} = global layer number; * = a part of a fused tensor
    layout: _Replicated | _Blocks | _ExpertsFc1 | _ExpertsFc2  # how TP ranks share it
    shape: Callable[[MegatronDims], tuple[int, ...]]  # merged (all ranks) shape
    fused: _Fused | None = None


# In Megatron's own order (the writer emits this order, as Megatron's state_dict does).
_TABLE: tuple[_Entry, ...] = (
    _Entry(_EMBEDDING,                                     "model.embed_tokens.weight",              ROWS,        lambda d: (d.V, d.H)),
    _Entry(_L + "input_layernorm.weight",                  _T + "input_layernorm.weight",            REPLICATED,  lambda d: (d.H,)),
    _Entry(_L + "self_attention.get_value.weight",         _T + "self_attn.v_proj.weight",           ROWS,        lambda d: (d.P, d.H)),
    _Entry(_L + "self_attention.get_query_key.weight",     _T + "self_attn.*_proj.weight",           ROWS,        lambda d: (2 * d.P, d.H), QUERY_KEY),
    _Entry(_L + "self_attention.lf_gate.conv1.weight",     _T + "self_attn.lf_gate.conv1.weight",    REPLICATED,  lambda d: (d.H // 2, d.H, 2, 1)),
    _Entry(_L + "self_attention.lf_gate.conv1.bias",       _T + "self_attn.lf_gate.conv1.bias",      REPLICATED,  lambda d: (d.H // 2,)),
    _Entry(_L + "self_attention.lf_gate.conv2.weight",     _T + "self_attn.lf_gate.conv2.weight",    REPLICATED,  lambda d: (d.H, d.H // 2, 2, 1)),
    _Entry(_L + "self_attention.lf_gate.conv2.bias",       _T + "self_attn.lf_gate.conv2.bias",      REPLICATED,  lambda d: (d.H,)),
    _Entry(_L + "self_attention.lf_gate.output_layernorm.weight", _T + "self_attn.lf_gate.output_layernorm.weight", REPLICATED, lambda d: (d.H,)),
    _Entry(_L + "self_attention.dense.weight",             _T + "self_attn.o_proj.weight",           COLUMNS,     lambda d: (d.H, d.P)),
    _Entry(_L + "post_attention_layernorm.weight",         _T + "post_attention_layernorm.weight",   REPLICATED,  lambda d: (d.H,)),
    _Entry(_ATTENTION_ROUTER,                              _T + "mlp.gate.*.weight",                 ROWS,        lambda d: (3 * d.E, d.H), ROUTER_QKV),
    _Entry(_LINEAR_ROUTER,                                 _T + "mlp.gate.weight",                   REPLICATED,  lambda d: (d.E, d.H)),
    _Entry(_L + "mlp.experts.weight1",                     _T + "mlp.experts.*.w1.weight",           EXPERTS_FC1, lambda d: (d.H, d.E * 2 * d.F), EXPERTS_W1),
    _Entry(_L + "mlp.experts.weight2",                     _T + "mlp.experts.*.w2.weight",           EXPERTS_FC2, lambda d: (d.E * d.F, d.H), EXPERTS_W2),
    _Entry(_FINAL_NORM,                                    "model.norm.weight",                      REPLICATED,  lambda d: (d.H,)),
    _Entry(_OUTPUT_LAYER,                                  "lm_head.weight",                         ROWS,        lambda d: (d.V, d.H)),
    _Entry(HEAD_COPY,                                      "lm_head.weight",                         ROWS,        lambda d: (d.V, d.H)),
)  # fmt: skip
ENTRIES = {entry.source: entry for entry in _TABLE}

# Flattened Megatron key -> IEIT-HF key (layer numbers as in the source; None = dropped on purpose).
MEGATRON_TO_IEIT = KeyTable(
    {entry.source: entry.target for entry in _TABLE}
    | {"language_model.rotary_pos_emb.inv_freq": None}  # recomputed from the rotary base; IEIT's save omits it
)


def stage_source_keys(dims: MegatronDims, stage: int) -> list[str]:
    """Every flattened Megatron key that pipeline stage ``stage`` must hold, in Megatron's order."""
    skip = _LINEAR_ROUTER if dims.attention_router else _ATTENTION_ROUTER
    layer_patterns = [e.source for e in _TABLE if e.source.startswith(_L) and e.source != skip]
    keys = [_EMBEDDING] if stage == 0 else []
    for local in range(dims.stage_layers[stage]):
        keys += [pattern.format(local) for pattern in layer_patterns]
    if stage == dims.pp - 1:
        keys.append(_FINAL_NORM)
        if not dims.tied:
            keys.append(_OUTPUT_LAYER)
        elif dims.pp > 1:
            keys.append(HEAD_COPY)
    return keys


def target_key(key: str, dims: MegatronDims, stage: int) -> tuple[_Entry, str]:
    """The table entry of a flattened Megatron key and its IEIT-HF target with the global layer number."""
    found = MEGATRON_TO_IEIT.match(key)
    if found is None:
        raise ConversionError(f"unexpected key {key!r}: it matches no entry of the Megatron key table")
    pattern, numbers = found
    entry = ENTRIES[pattern]
    return entry, entry.target.format(*(n + dims.stage_offset(stage) for n in numbers))


def ieit_key_shapes(args: argparse.Namespace | Mapping) -> dict[str, tuple[int, ...]]:
    """IEIT-HF key -> shape of every tensor of the model ``args`` describe (what :func:`iter_ieit_stages` yields
    over all stages, except a tied ``lm_head``, which IEIT-HF stores as a copy of the embeddings)."""
    a = args_dict(args)
    dims = MegatronDims.from_args(a)
    shapes: dict[str, tuple[int, ...]] = {}
    for stage in range(dims.pp):
        for key in stage_source_keys(dims, stage):
            if key == HEAD_COPY:
                continue
            entry, target = target_key(key, dims, stage)
            if entry.fused is None:
                shapes[target] = entry.shape(dims)
            else:
                shapes |= {target.replace("*", part): entry.fused.part_shape(dims) for part in entry.fused.parts(dims)}
    return shapes




# ----------------------------------------------------------------------------------------------------------------
# Reader driver
# ----------------------------------------------------------------------------------------------------------------


def owned(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` as a contiguous tensor owning exactly its storage, cast to ``dtype`` (one copy at most)."""
    dtype = dtype or tensor.dtype
    if (
        tensor.dtype == dtype
        and tensor.is_contiguous()
        and tensor.storage_offset() == 0
        and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    ):
        return tensor
    return torch.empty(tensor.shape, dtype=dtype).copy_(tensor)




def _load_stage_shards(ckpt: MegatronCheckpoint, stage: int) -> list[dict[str, LazyTensor]]:
    shards = []
    for path in ckpt.stage_files(stage):
        loaded = load_megatron_file(path, lazy=True)
        if "model" not in loaded:
            virtual = sorted(k for k in loaded if re.fullmatch(r"model\d+", str(k)))
            raise ConversionError(
                f"{path} holds no 'model'"
                + (f" but {virtual}: interleaved (virtual) pipeline checkpoints are not supported" if virtual else "")
            )
        stored = loaded.get("iteration")
        if ckpt.iteration is not None and stored not in (None, ckpt.iteration):
            raise ConversionError(f"{path} says iteration {stored}; the checkpoint mixes iterations")
        if not isinstance(loaded["model"], Mapping):
            raise ConversionError(f"{path}: 'model' is a {type(loaded['model']).__name__}, expected a dict")
        shards.append(flatten_model_state(loaded["model"], source=path))
    return shards


def _convert_stage(
    ckpt: MegatronCheckpoint, stage: int, dims: MegatronDims, *, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """One pipeline stage: TP-merge every tensor and map it to IEIT-HF names (global layer numbers)."""
    files = ckpt.stage_files(stage)
    shards = _load_stage_shards(ckpt, stage)
    source_keys = list(shards[0])
    for path, flat in zip(files[1:], shards[1:], strict=True):
        if set(flat) != set(source_keys):
            diff = sorted(set(flat) ^ set(source_keys))
            raise ConversionError(f"{path} and {files[0]} hold different tensors: {', '.join(diff[:8])}")
    expected = stage_source_keys(dims, stage)
    missing = [key for key in expected if key not in shards[0]]
    if missing:
        raise ConversionError(
            f"pipeline stage {stage} ({files[0]}) lacks {len(missing)} tensor(s) the args imply: "
            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
        )
    expected_set, used = set(expected), set()
    out: dict[str, torch.Tensor] = {}
    for key in source_keys:
        found = MEGATRON_TO_IEIT.match(key)
        if found is None:
            raise ConversionError(
                f"{files[0]}: unexpected tensor {key!r}: it matches no entry of the Megatron key table "
                "(MEGATRON_TO_IEIT); this is not a Yuan 2.0-M32 checkpoint of the layout this converter knows"
            )
        if MEGATRON_TO_IEIT.table[found[0]] is None:
            used.add(key)  # dropped on purpose (see MEGATRON_TO_IEIT)
            continue
        if key not in expected_set:
            raise ConversionError(
                f"{files[0]}: unexpected tensor {key!r} on pipeline stage {stage}, which should hold layers "
                f"{dims.stage_offset(stage)}..{dims.stage_offset(stage) + dims.stage_layers[stage] - 1} of "
                f"{dims.layers} (tied head: {dims.tied}); the args do not describe this checkpoint"
            )
        out |= _convert_tensor(key, [flat.pop(key) for flat in shards], files, stage, dims, dtype=dtype)
        used.add(key)
    check_all_used(source_keys, used, where=f"pipeline stage {stage} ({files[0]})")
    return out


def _convert_tensor(
    key: str, shards: list[LazyTensor], files: list[Path], stage: int, dims: MegatronDims, *, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """One Megatron tensor (its TP shards, unread) -> its IEIT-HF tensor(s). The sources die on return."""
    entry, target = target_key(key, dims, stage)
    full_shape = entry.shape(dims)
    local_shape = entry.layout.local_shape(full_shape, dims.tp)
    for path, lazy in zip(files, shards, strict=True):
        if tuple(lazy.shape) != local_shape or lazy.dtype != shards[0].dtype:
            raise ConversionError(
                f"{path}: {key} is {list(lazy.shape)} {lazy.dtype}, expected {list(local_shape)} "
                f"{shards[0].dtype} (full {list(full_shape)} over {dims.tp} TP ranks) from the args"
            )
    where = f"{key} in {', '.join(map(str, files))}"
    merged = entry.layout.merge([lazy.load() for lazy in shards], dims, where=where)
    if tuple(merged.shape) != full_shape:
        raise ConversionError(f"{where}: merged to {list(merged.shape)}, expected {list(full_shape)}")
    if entry.fused is None:
        return {target: owned(merged, dtype)}
    parts = entry.fused.split(merged, dims)
    names = entry.fused.parts(dims)
    return {target.replace("*", name): owned(part, dtype) for name, part in zip(names, parts, strict=True)}


def iter_ieit_stages(
    ckpt: MegatronCheckpoint,
    *,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    check_tied_head: bool = True,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield each pipeline stage as IEIT-HF tensors, one stage in memory at a time.

    Per stage the TP rank files are parsed (no tensor read), every tensor is checked against the args-derived
    shape, then read, TP-merged (README "Tensor-parallel split semantics") and mapped through
    :data:`MEGATRON_TO_IEIT`, one tensor at a time. Yielded dicts use IEIT-HF names with GLOBAL layer numbers,
    e.g. ``model.layers.7.self_attn.q_proj.weight`` [P, H] (rows[:P] of ``get_query_key``),
    ``model.layers.7.mlp.experts.3.w1.weight`` [2F, H] (``[gate; up]``), ``model.layers.7.mlp.gate.query.weight``
    [E, H]; the first stage adds ``model.embed_tokens.weight`` [V, H], the last ``model.norm.weight`` [H] and
    ``lm_head.weight`` [V, H] when there is one (untied, or tied with PP > 1; with PP == 1 and tied embeddings
    there is none). Tensors are contiguous, own their storage, and are cast to ``dtype`` if given.

    Args:
        ckpt: From :meth:`MegatronCheckpoint.open`.
        dtype: Cast to this dtype (default: as stored, bf16 for Yuan).
        progress: Show a tqdm bar over the ``ckpt.num_stages`` stages.
        check_tied_head: With tied embeddings and PP > 1, require the last stage's head copy to equal the
            embeddings bitwise (a tied native model would silently use the embeddings otherwise).

    Raises:
        ConversionError: for unsupported args, unknown / missing / misshapen tensors (naming key and file),
            replicated tensors that differ between TP ranks, unreadable files.
    """
    a = args_dict(ckpt.args)
    check_supported(a)
    dims = MegatronDims.from_args(a)
    return _iter_stages(ckpt, dims, dtype=dtype, progress=progress, check_tied_head=check_tied_head)


def _iter_stages(
    ckpt: MegatronCheckpoint, dims: MegatronDims, *, dtype: torch.dtype | None, progress: bool, check_tied_head: bool
) -> Iterator[dict[str, torch.Tensor]]:
    embedding_digest = None
    for stage in tqdm(range(dims.pp), desc="Megatron stages", unit="stage", disable=not progress):
        tensors = _convert_stage(ckpt, stage, dims, dtype=dtype)
        if check_tied_head and dims.tied and dims.pp > 1:
            if stage == 0:
                embedding_digest = tensor_digest(tensors["model.embed_tokens.weight"])
            if stage == dims.pp - 1 and tensor_digest(tensors["lm_head.weight"]) != embedding_digest:
                raise ConversionError(
                    f"{ckpt.stage_files(stage)[0]}: word_embeddings_for_head differs from the first stage's "
                    "word_embeddings although the model is tied; convert with tie_word_embeddings=False "
                    "to keep both"
                )
        yield tensors
        del tensors  # before building the next stage (the caller should drop its reference too)


