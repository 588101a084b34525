"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for Yuan 2.0-M32, one decoder layer per unit.

Each `YuanM32DecoderLayer` (attention, LF gate, router and all its experts) is one FSDP unit, so the MoE block is
gathered whole: the sort-based dispatch may run any expert on any rank, and in training it runs every expert (empty
ones included), so every rank joins every gather and gradient reduce-scatter. The fp32 attention router gets its
own unit when the rest of the layer is in another dtype (FSDP2 flattens one dtype per unit). The embeddings, final
norm and the tied LM head go in the root unit.

    torchrun --nproc_per_node 8 train.py      # with, in train.py:
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16), lora)
        fully_shard_decoder_layers(model)     # after PEFT, before the optimizer is built
"""

from __future__ import annotations

import torch
from torch import nn

DECODER_LAYER = "YuanM32DecoderLayer"  # by name: the remote-code copy defines its own class


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of `model` (a Yuan model, also wrapped by PEFT), in order."""
    layers = [module for module in model.modules() if type(module).__name__ == DECODER_LAYER]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no {DECODER_LAYER}: is it a Yuan 2.0-M32 model?")
    return layers


def fully_shard_decoder_layers(model: nn.Module, *, mesh=None, reshard_after_forward: bool = True, **fsdp_kwargs):
    """Apply FSDP2 to `model` in place: each decoder layer (MoE block whole) is a unit, the router its own unit if
    its dtype differs from the layer's, then the root. `mesh` (default: all ranks) and `fsdp_kwargs`
    (`mp_policy`, `offload_policy`) go to `fully_shard`. Returns `model`."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        router = layer.mlp.gate
        router_dtypes = {p.dtype for p in router.parameters()}
        other_dtypes = {p.dtype for name, p in layer.named_parameters() if not name.startswith("mlp.gate.")}
        if router_dtypes != other_dtypes:
            fully_shard(router, mesh=mesh, reshard_after_forward=reshard_after_forward, **fsdp_kwargs)
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, **fsdp_kwargs)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, **fsdp_kwargs)
    return model


def full_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gather the FSDP2 shards (DTensors) of a state dict into full CPU tensors; call it on every rank."""
    from torch.distributed.tensor import DTensor

    return {
        name: (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu()
        for name, tensor in state_dict.items()
    }


__all__ = ["decoder_layers", "fully_shard_decoder_layers", "full_state_dict"]
