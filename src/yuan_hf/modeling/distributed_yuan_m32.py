"""Multi-process sharding of Yuan 2.0-M32 with transformers' own engine (`DistributedConfig`): the checks and the
one adaptation its plans cannot express alone.

Self-contained (imports only torch and transformers) because it ships to the Hub with the modeling file.

- Tensor parallel (TP): the config's `base_model_tp_plan` splits attention by whole heads (Q/K/V colwise, O
  rowwise) and each expert's SwiGLU (gate/up colwise, down rowwise); the LF gate, the norms and the fp32
  attention router stay replicated (every rank filters and routes the same full hidden states).
- Expert parallel (EP): `base_model_ep_plan` hands each `mlp.experts` to transformers' `ep_dispatch_experts`
  (all-reduce of the partial outputs at inference, all-to-all token exchange in training). transformers'
  expert styles shard *fused* 3D expert tensors on their expert dimension; Yuan keeps one `nn.Linear` per
  expert (DESIGN.md section 5), so `prepare_expert_parallel` does that sharding by module instead: each rank
  keeps the contiguous block of experts it owns and puts a parameterless `YuanM32ExpertElsewhere` in the other
  slots, so their checkpoint tensors are never read on this rank.
- Sizes: `check_parallel_sizes` refuses a TP size that does not divide the heads and an EP size that does not
  divide the experts, before any weight is read (transformers would split a head in the middle silently).
"""

import torch
from torch import nn


def _tp_splits_heads(distributed_config) -> bool:
    """Whether TP rules apply at all: `tp_plan={}` asks for none (EP alone across the TP ranks)."""
    tp_size = getattr(distributed_config, "tp_size", None) or 1
    return tp_size > 1 and getattr(distributed_config, "tp_plan", None) != {}


def check_parallel_sizes(config, distributed_config) -> None:
    """Raise a `ValueError` naming both numbers when the tensor-parallel size does not divide the attention
    (query and key/value) heads, or the expert-parallel size does not divide the experts."""
    tp_size = getattr(distributed_config, "tp_size", None) or 1
    ep_size = getattr(distributed_config, "ep_size", None) or 1
    if _tp_splits_heads(distributed_config):
        for field in ("num_attention_heads", "num_key_value_heads"):
            heads = getattr(config, field)
            if heads % tp_size:
                raise ValueError(
                    f"Yuan 2.0-M32 tensor parallelism splits attention by whole heads: tp_size {tp_size} does not "
                    f"divide {field} {heads}. Use a tp_size that divides {heads} (e.g. "
                    f"{', '.join(str(d) for d in range(2, heads + 1) if heads % d == 0)}), or set tp_plan={{}} and "
                    "shard the experts with ep_size alone."
                )
    if ep_size > 1:
        counts = config.num_experts
        for layer, count in enumerate(counts if isinstance(counts, list) else [counts]):
            if count % ep_size:
                field = f"num_experts[{layer}] (layer {layer})" if isinstance(counts, list) else "num_experts"
                raise ValueError(
                    "Yuan 2.0-M32 expert parallelism gives every rank the same number of whole experts: ep_size "
                    f"{ep_size} does not divide {field} {count}. Use an ep_size that divides every layer's expert "
                    "count."
                )


class YuanM32ExpertElsewhere(nn.Module):
    """Stands in, under expert parallelism, for an expert that another rank holds. It has no weights; the routes
    that reach it carry weight 0 on this rank (the owner computes them), so it contributes zeros."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states.new_zeros(hidden_states.shape[0], self.hidden_size)


def _expert_parallel_api() -> bool:
    """transformers >= 5.23: EP implementations call the experts' forward with local expert ids."""
    try:
        from transformers.distributed.expert_parallel import EPImplementation  # noqa: F401
    except ImportError:
        return False
    return True


def prepare_expert_parallel(model: nn.Module, ep_rank: int, ep_size: int) -> None:
    """Keep this rank's experts in every `mlp.experts` of `model` (experts `[r * E/n, (r + 1) * E/n)` of a layer
    with E experts), before the weights load, and make the experts' forward take local expert ids as transformers'
    EP implementations pass them: `0 .. E/n - 1` for this rank's experts and `E/n` (weight 0) for a route to
    another rank's expert.

    The checkpoint tensors of the other experts are added to `model._keys_to_ignore_on_load_unexpected`.
    """
    import transformers

    if not _expert_parallel_api():
        raise NotImplementedError(
            "Expert parallelism for Yuan 2.0-M32 needs transformers >= 5.23 (EP implementations that call the "
            f"experts with local ids); transformers {transformers.__version__} is installed. Upgrade, or use "
            "tensor parallelism (DistributedConfig(tp_size=...)), which also splits the experts."
        )
    ignored = []
    for name, module in model.named_modules():
        if not name.endswith("mlp.experts") or getattr(module, "_yuan_expert_parallel", False):
            continue
        num_experts = len(module)  # this layer's count (pruned models differ per layer)
        per_rank = num_experts // ep_size
        first = ep_rank * per_rank
        elsewhere = [e for e in range(num_experts) if not first <= e < first + per_rank]
        for e in elsewhere:
            module[e] = YuanM32ExpertElsewhere(model.config.hidden_size)
        module.num_experts = per_rank  # what transformers' EP implementations read: the experts on this rank
        module.forward = _local_ids_forward(module.forward, first, per_rank, elsewhere[0])
        module._yuan_expert_parallel = True
        layer = name.split(".")[-3]  # ...layers.<i>.mlp.experts
        ignored.append(rf"(^|\.)layers\.{layer}\.mlp\.experts\.({'|'.join(map(str, elsewhere))})\.")
    model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | set(ignored)
    model.save_pretrained = _refuse_partial_save(ep_rank, ep_size)


def _refuse_partial_save(ep_rank: int, ep_size: int):
    def save_pretrained(*args, **kwargs):
        raise NotImplementedError(
            f"This model was loaded with expert parallelism: rank {ep_rank} holds only its share (1/{ep_size}) of "
            "each layer's experts, so save_pretrained would write a checkpoint without the others. Save from a model "
            "loaded without ep_size (tensor-parallel models gather their shards when saving), or save adapters with "
            "PEFT."
        )

    return save_pretrained


def _local_ids_forward(forward, first: int, per_rank: int, stand_in: int):
    def forward_local_ids(hidden_states, top_k_index, top_k_weights):
        # local id l < per_rank is expert first + l; per_rank marks a route to another rank (weight 0): send it to a
        # stand-in slot, which returns zeros without touching any weight
        global_index = torch.where(top_k_index < per_rank, top_k_index + first, stand_in)
        return forward(hidden_states, global_index, top_k_weights)

    return forward_local_ids


def distribute_yuan_model(model: nn.Module, distributed_config, mesh_manager) -> None:
    """What Yuan does in `maybe_distribute_model` before transformers applies the plans: check the sizes, then
    (with `ep_size > 1`) keep this rank's experts. `mesh_manager` is transformers' (5.23+) mesh holder."""
    check_parallel_sizes(model.config, distributed_config)
    ep_size = getattr(distributed_config, "ep_size", None) or 1
    if ep_size > 1 and mesh_manager is not None:
        if not hasattr(mesh_manager, "get_mesh"):
            prepare_expert_parallel(model, 0, ep_size)  # raises: this transformers has no EP implementations
        ep_mesh = mesh_manager.get_mesh("ep")
        prepare_expert_parallel(model, ep_mesh.get_local_rank(), ep_mesh.size())


__all__ = ["check_parallel_sizes", "prepare_expert_parallel", "distribute_yuan_model", "YuanM32ExpertElsewhere"]
