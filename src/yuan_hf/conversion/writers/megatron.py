"""IEIT-HF tensors -> an IEIT Megatron-LM checkpoint (any TP x PP): synthetic checkpoints for tests, demo, benchmarks.

The inverse of ``conversion/megatron``: the split side of the same merge table (``megatron/merge.py``), so
a write -> read round trip is bitwise by construction of one table, not of two that must agree. Readers
never import this module.
"""

from __future__ import annotations

import argparse
import copy
import random
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...modeling import YuanM32Config, YuanM32ForCausalLM
from ...testing import tiny_config
from ..common import SFT_ROPE_THETA, ConversionError, check_all_used
from ..megatron.args import MegatronDims, args_dict, check_supported, need_arg, positive_int
from ..megatron.checkpoint import CHECKPOINT_VERSION, RANK_FILE, TRACKER_FILE, rank_dir
from ..megatron.merge import ENTRIES, HEAD_COPY, MEGATRON_TO_IEIT, bitwise_equal, ieit_key_shapes, owned, stage_source_keys, target_key
from ..megatron.pickle_reader import MegatronStub
from ..native.output import atomic_output_dir
from .ieit_hf import ieit_state_dict_from_native

__all__ = ["make_megatron_checkpoint", "megatron_args_for", "write_megatron_checkpoint"]


def megatron_args_for(
    config: Mapping[str, Any] | Any,
    *,
    tp: int = 1,
    pp: int = 1,
    seq_length: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    pipeline_blocks: Sequence[int] | None = None,
) -> argparse.Namespace:
    """A plausible IEIT Megatron ``args`` namespace for a model given by native config fields.

    ``config`` is a ``YuanM32Config`` or a mapping of its field names. Only the fields this module reads (and
    a few for context) are set; ``seq_length`` defaults to ``max_position_embeddings``;
    ``pipeline_blocks`` (one layer count per stage) selects IEIT's non-uniform ``block`` split.
    """
    c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    heads = need_arg(c, "num_attention_heads")
    if c.get("num_key_value_heads", heads) != heads:
        raise ConversionError("grouped-query attention cannot be written as a Yuan Megatron checkpoint")
    rope = c.get("rope_parameters") or {"rope_type": "default", "rope_theta": SFT_ROPE_THETA, "partial_rotary_factor": 0.5}
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(f"rope_type {rope.get('rope_type')!r} has no Megatron equivalent in Yuan's code")
    seq_length = seq_length or need_arg(c, "max_position_embeddings")
    layers = need_arg(c, "num_hidden_layers")
    blocks = list(pipeline_blocks) if pipeline_blocks is not None else ([layers // pp] * pp if layers % pp == 0 else None)
    if blocks is None:
        raise ConversionError(f"{layers} layers do not split evenly over {pp} stages; pass pipeline_blocks")
    return argparse.Namespace(
        num_layers=layers,
        encoder_num_layers=layers,
        hidden_size=need_arg(c, "hidden_size"),
        ffn_hidden_size=need_arg(c, "moe_intermediate_size"),
        num_attention_heads=heads,
        kv_channels=need_arg(c, "head_dim"),
        group_query_attention=False,
        num_query_groups=1,
        num_experts=need_arg(c, "num_experts"),
        moe_router_topk=need_arg(c, "num_experts_per_tok"),
        moe_router_load_balancing_type="none" if c.get("norm_topk_prob", True) else "sinkhorn",
        moe_aux_loss_coeff=float(c.get("router_aux_loss_coef", 0.0)),
        moe_grouped_gemm=True,
        moe_token_dropping=False,
        use_attention_router=c.get("router_type", "attention") == "attention",
        use_fp32_router=True,
        num_attention_router_heads=seq_length,
        use_lf_gate=True,
        lf_conv2d_group=1,
        lf_conv2d_num_pad=1,
        position_embedding_type="rope",
        rotary_percent=float(rope.get("partial_rotary_factor", 1.0)),
        rotary_base=rope.get("rope_theta", SFT_ROPE_THETA),
        seq_length=seq_length,
        encoder_seq_length=seq_length,
        max_position_embeddings=seq_length,
        padded_vocab_size=need_arg(c, "vocab_size"),
        make_vocab_size_divisible_by=128,
        swiglu=True,
        add_bias_linear=False,
        norm_dtype="RMSNorm",
        layernorm_epsilon=1e-5,
        untie_embeddings_and_output_weights=not c.get("tie_word_embeddings", True),
        transformer_impl="local",
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        transformer_pipeline_model_parallel_size=pp,
        pipeline_model_parallel_method="uniform" if pipeline_blocks is None else "block",
        pipeline_blocks=blocks,
        virtual_pipeline_model_parallel_size=None,
        expert_model_parallel_size=1,
        data_parallel_size=1,
        world_size=tp * pp,
        rank=0,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        no_save_optim=True,
        iteration=0,
        tokenizer_type="YuanTokenizer",
    )


_PICKLABLE_SCALARS = (type(None), bool, int, float, str, torch.dtype)


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return isinstance(value, _PICKLABLE_SCALARS)


def _layout_args(args: argparse.Namespace | Mapping, *, tp: int, pp: int) -> dict[str, Any]:
    """A copy of ``args`` for a TP x PP layout, with only values the reader's allow-list can unpickle."""
    a = {k: v for k, v in args_dict(args).items() if not isinstance(v, MegatronStub)}  # e.g. model_type
    for name, value in a.items():
        if not _plain(value):
            raise ConversionError(f"args.{name} = {value!r} cannot be written: only plain values and torch dtypes")
    a = copy.deepcopy(a)
    blocks = a.get("pipeline_blocks")
    if (a.get("pipeline_model_parallel_method") or "uniform") != "uniform" and (blocks is None or len(blocks) != pp):
        raise ConversionError(f"args.pipeline_blocks {blocks!r} do not describe {pp} stages")
    if (a.get("pipeline_model_parallel_method") or "uniform") == "uniform":
        layers = positive_int(a, "num_layers")
        if layers % pp:
            raise ConversionError(f"{layers} layers do not split evenly over {pp} stages; pass pipeline_blocks")
        a["pipeline_blocks"] = [layers // pp] * pp
    data_parallel = a.get("data_parallel_size") or 1
    a |= {
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "transformer_pipeline_model_parallel_size": pp,
        "world_size": tp * pp * data_parallel,
    }
    return a


def _nest(model: OrderedDict, key: str, tensor: torch.Tensor) -> None:
    """Insert a flattened key into Megatron's nested layout (the encoder's own keys stay flat)."""
    encoder = "language_model.encoder."
    path = ["language_model", "encoder", key[len(encoder) :]] if key.startswith(encoder) else key.split(".")
    node = model
    for part in path[:-1]:
        node = node.setdefault(part, OrderedDict())
    node[path[-1]] = tensor


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """torch.save writes a view's whole storage: give every saved tensor a storage of its own size."""
    return owned(tensor, None)


def _rng_state(seed: int) -> list[dict[str, Any]]:
    """A small deterministic ``rng_state`` like Megatron's (CPU only: the CUDA state is a placeholder)."""
    torch_state = torch.Generator().manual_seed(seed).get_state()
    return [
        {
            "random_rng_state": random.Random(seed).getstate(),
            "np_rng_state": np.random.RandomState(seed).get_state(),
            "torch_rng_state": torch_state,
            "cuda_rng_state": torch.zeros(16, dtype=torch.uint8),
            "rng_tracker_states": {"model-parallel-rng": torch_state.clone()},
        }
    ]


def write_megatron_checkpoint(
    ieit_state_dict: Mapping[str, torch.Tensor],
    dst: str | Path,
    *,
    args: argparse.Namespace | Mapping,
    tp: int = 1,
    pp: int = 1,
    iteration: int = 1,
    tracker_newline: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write IEIT-HF tensors as an IEIT Megatron checkpoint (TP x PP), the inverse of :func:`iter_ieit_stages`.

    The layout matches the fixtures: ``dst/latest_checkpointed_iteration.txt`` (``str(iteration)``, no newline
    unless ``tracker_newline``), ``dst/iter_{iteration:07d}/mp_rank_TT[_PPP]/model_optim_rng.pt`` holding
    ``{"args", "checkpoint_version": 3.0, "iteration", "model" (nested), "rng_state"}``. Tensors are split with
    IEIT's rules (``tools/split_tp_partitions.py``). Only allow-listed globals are pickled (``args.model_type``,
    a Megatron enum, is left out).

    Args:
        ieit_state_dict: IEIT-HF names -> tensors (global layer numbers), as in IEIT's HF checkpoint. Read one
            key at a time and per stage, so a lazy mapping that makes tensors on access keeps memory to one
            stage. ``lm_head.weight`` is optional when tied (the embeddings are used).
        dst: Checkpoint root to create (must be empty or absent unless ``overwrite``); written atomically.
        args: Training arguments (e.g. from :func:`megatron_args_for`); TP/PP fields are set from ``tp``/``pp``.
        tp, pp: Tensor- and pipeline-parallel sizes.
        iteration: Iteration number of the folder and the tracker file.
        tracker_newline: End the tracker file with a newline (Megatron writes none).
        overwrite: Replace a non-empty ``dst``.

    Returns:
        ``dst``.
    """
    a = _layout_args(args, tp=tp, pp=pp)
    check_supported(a)
    dims = MegatronDims.from_args(a)
    needed = ieit_key_shapes(a)
    present = set(ieit_state_dict.keys())
    optional = {"lm_head.weight"} if dims.tied else set()
    missing = [k for k in needed if k not in present]
    if missing:
        raise ConversionError(f"{len(missing)} IEIT tensor(s) missing for this model: {', '.join(missing[:8])}")
    unexpected = sorted(present - needed.keys() - optional)
    if unexpected:
        raise ConversionError(f"{len(unexpected)} IEIT tensor(s) the args do not describe: {', '.join(unexpected[:8])}")
    consumed: set[str] = set()

    def fetch(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        tensor = ieit_state_dict[name]
        if tuple(tensor.shape) != shape:
            raise ConversionError(f"IEIT tensor {name} is {list(tensor.shape)}, expected {list(shape)} from the args")
        consumed.add(name)
        return tensor

    if dims.tied and "lm_head.weight" in present:
        head = fetch("lm_head.weight", (dims.V, dims.H))
        if not bitwise_equal(head, ieit_state_dict["model.embed_tokens.weight"]):
            raise ConversionError("lm_head.weight differs from model.embed_tokens.weight but the args say tied")

    def megatron_tensor(key: str, stage: int) -> torch.Tensor:
        entry, target = target_key(key, dims, stage)
        if key == HEAD_COPY:
            target = "lm_head.weight" if "lm_head.weight" in present else "model.embed_tokens.weight"
        if entry.fused is None:
            return fetch(target, entry.shape(dims))
        part_shape = entry.fused.part_shape(dims)
        parts = (fetch(target.replace("*", p), part_shape) for p in entry.fused.parts(dims))
        return entry.fused.join(parts, dims)

    def write_stage(folder: Path, stage: int) -> None:  # a function, so the stage's tensors die on return
        models = [OrderedDict() for _ in range(dims.tp)]
        for key in stage_source_keys(dims, stage):
            entry = ENTRIES[MEGATRON_TO_IEIT.match(key)[0]]
            for model, piece in zip(models, entry.layout.split(megatron_tensor(key, stage), dims), strict=True):
                _nest(model, key, _compact(piece))
        for tp_rank, model in enumerate(models):
            path = folder / rank_dir(tp_rank, stage, dims.pp) / RANK_FILE
            path.parent.mkdir(parents=True)
            rank = stage * dims.tp + tp_rank
            payload = OrderedDict(
                args=argparse.Namespace(**(a | {"rank": rank})), checkpoint_version=CHECKPOINT_VERSION,
                iteration=iteration, model=model, rng_state=_rng_state(1234 + rank),
            )  # fmt: skip
            torch.save(payload, path)

    root = Path(dst)
    with atomic_output_dir(root, overwrite=overwrite, replaceable=lambda folder: (folder / TRACKER_FILE).is_file()) as tmp:
        for stage in range(dims.pp):
            write_stage(tmp / f"iter_{iteration:07d}", stage)
        check_all_used(present - optional, consumed, where="the IEIT state dict given to write_megatron_checkpoint")
        (tmp / TRACKER_FILE).write_text(f"{iteration}\n" if tracker_newline else str(iteration), encoding="utf-8")
    return root


def make_megatron_checkpoint(dst: str | Path, *, config: YuanM32Config | None = None, tp: int = 1, pp: int = 2,
                             seed: int = 0) -> Path:
    """Write a randomly initialised model as an IEIT Megatron-LM checkpoint (TP x PP shards, bf16)."""
    config = config or tiny_config()
    torch.manual_seed(seed)
    model = YuanM32ForCausalLM(config)
    tensors = {k: v.to(torch.bfloat16) for k, v in ieit_state_dict_from_native(model.state_dict(), config).items()}
    args = megatron_args_for(config, tp=tp, pp=pp)
    return write_megatron_checkpoint(tensors, dst, args=args, tp=tp, pp=pp, iteration=1000, overwrite=True)
