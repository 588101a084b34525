"""Run by `torchrun --nproc_per_node 2` (gloo, CPU) from tests/test_distributed.py; writes one JSON per rank.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py FOLDERS_DIR OUT_DIR [--remote-code]

FOLDERS_DIR holds `tiny/` (a saved tiny model), `bad_heads/` and `bad_experts/` (configs whose heads / experts a
world of 2 does not divide, with an unreadable weights file). Every check compares with the same folder loaded in
this process without a distributed config (the single-process model). With `--remote-code`, `yuan_hf` cannot be
imported and the folder loads through its copied modeling files (`trust_remote_code=True`).
"""

import json
import os
import sys

import torch
import torch.distributed as dist

REMOTE = "--remote-code" in sys.argv
if REMOTE:
    sys.modules["yuan_hf"] = None  # the Hub copy must carry the plans by itself
else:
    import yuan_hf  # noqa: F401  (registers yuan_m32)

from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.distributed import DistributedConfig  # noqa: E402

FOLDERS, OUT = sys.argv[1], sys.argv[2]
# expert parallel needs transformers >= 5.23 (EP implementations that call the experts with local ids)
try:
    from transformers.distributed.expert_parallel import EPImplementation  # noqa: F401

    EXPERT_PARALLEL = True
except ImportError:
    EXPERT_PARALLEL = False
LOAD = {"dtype": torch.float32, "trust_remote_code": REMOTE}
NEW_TOKENS = 6


def load(name: str, distributed_config=None):
    folder = os.path.join(FOLDERS, name)
    return AutoModelForCausalLM.from_pretrained(folder, distributed_config=distributed_config, **LOAD)


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def sharding(model) -> dict:
    """Local shapes of one layer's tensors: what each rank holds under the plan."""
    layer = model.model.layers[0]
    attn, moe = layer.self_attn, layer.mlp
    shapes = {
        name: list(local(param).shape)
        for name, param in {
            "q_proj": attn.q_proj.weight, "k_proj": attn.k_proj.weight, "v_proj": attn.v_proj.weight,
            "o_proj": attn.o_proj.weight, "lf_gate.conv1": attn.lf_gate.conv1.weight,
            "lf_gate.conv2": attn.lf_gate.conv2.weight, "router.query": moe.gate.query.weight,
            "embed_tokens": model.model.embed_tokens.weight,
        }.items()
    }  # fmt: skip
    held = [e for e, expert in enumerate(moe.experts) if any(True for _ in expert.parameters())]
    shapes["experts_held"] = held
    shapes["expert.gate_proj"] = list(local(moe.experts[held[0]].gate_proj.weight).shape)
    shapes["expert.down_proj"] = list(local(moe.experts[held[0]].down_proj.weight).shape)
    shapes["router_is_dtensor"] = hasattr(moe.gate.query.weight, "to_local")
    shapes["lf_gate_is_dtensor"] = hasattr(attn.lf_gate.conv1.weight, "to_local")
    return shapes


def inference_check(reference, ids, distributed_config, folder: str = "tiny") -> dict:
    model = load(folder, distributed_config)
    with torch.no_grad():
        logits, expected = model(ids).logits, reference(ids).logits
    greedy = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    tokens, expected_tokens = model.generate(ids, **greedy), reference.generate(ids, **greedy)
    try:
        model.save_pretrained(os.path.join(OUT, "saved"))
        save = "saved"
    except NotImplementedError as error:
        save = str(error)
    return {
        "save": save,
        "max_abs_logit_diff": (logits - expected).abs().max().item(),
        "logits_scale": expected.abs().max().item(),
        "greedy_equal": torch.equal(tokens, expected_tokens),
        "new_tokens": tokens[:, ids.shape[1] :].tolist(),
        "params_on_rank": sum(local(p).numel() for p in model.parameters()),
        "sharding": sharding(model),
        "class_module": type(model).__module__,
    }


def bad_size_check(name: str, distributed_config) -> dict:
    try:
        load(name, distributed_config)
    except Exception as error:  # noqa: BLE001  (reported to the test, which checks the type and message)
        return {"type": type(error).__name__, "message": str(error)}
    return {"type": None, "message": "loaded"}


def lora_fsdp_check(path: str, steps: int = 3) -> dict:
    """LoRA on every projection and expert, trained `steps` AdamW steps on 4 rows: FSDP2 (2 rows per rank, one unit
    per decoder layer) against one process on all 4 rows. Losses are the global means."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from yuan_hf.parallel import full_state_dict, fully_shard_decoder_layers

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1)
    rows = torch.randint(6, 500, (4, 16))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def build():
        torch.manual_seed(2)  # the same LoRA init in both runs
        model = AutoModelForCausalLM.from_pretrained(path, **LOAD)
        lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets)
        return get_peft_model(model, lora).train()

    def train(model, batch, reduce):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(steps):
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            loss = loss.detach()
            if reduce:
                dist.all_reduce(loss)
                loss = loss / world
            losses.append(loss.item())
        return losses

    reference = build()
    reference_losses = train(reference, rows, reduce=False)
    reference_adapter = get_peft_model_state_dict(reference)

    sharded = fully_shard_decoder_layers(build())
    from torch.distributed.fsdp import FSDPModule

    units = [name for name, module in sharded.named_modules() if isinstance(module, FSDPModule)]
    fsdp_losses = train(sharded, rows[rank * 2 : rank * 2 + 2], reduce=True)
    adapter = full_state_dict(get_peft_model_state_dict(sharded))
    diffs = {name: (adapter[name] - reference_adapter[name]).abs().max().item() for name in reference_adapter}
    return {
        "reference_losses": reference_losses,
        "fsdp_losses": fsdp_losses,
        "adapter_tensors": len(adapter),
        "max_adapter_diff": max(diffs.values()),
        "adapter_keys_equal": sorted(adapter) == sorted(reference_adapter),
        "max_lora_b": max(v.abs().max().item() for name, v in adapter.items() if "lora_B" in name),
        "fsdp_units": units,
    }


def bf16_fsdp_check(path: str) -> dict:
    """bf16 base, fp32 router and fp32 LoRA adapters (PEFT's default autocast) under FSDP2: one training step."""
    from peft import LoraConfig, get_peft_model

    from yuan_hf.parallel import fully_shard_decoder_layers

    model = AutoModelForCausalLM.from_pretrained(path, **{**LOAD, "dtype": torch.bfloat16})
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "gate_proj", "down_proj"])).train()
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    fully_shard_decoder_layers(model)
    torch.manual_seed(3)
    ids = torch.randint(6, 500, (1, 12))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    return {
        "dtypes": dtypes,
        "loss": loss.item(),
        "all_grads": all(g is not None and bool(torch.isfinite(local(g)).all()) for g in grads),
    }


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    ids = torch.randint(6, 500, (2, 10))
    reference = load("tiny").eval()
    results = {"world_size": dist.get_world_size()}
    results["tp"] = inference_check(reference, ids, DistributedConfig(tp_size=2))
    if EXPERT_PARALLEL:
        results["ep"] = inference_check(reference, ids, DistributedConfig(tp_size=2, ep_size=2, tp_plan={}))
        results["tp_ep"] = inference_check(reference, ids, DistributedConfig(tp_size=2, ep_size=2))
        if not REMOTE:  # a pruned model: 8 experts in layer 0, 4 in layer 1
            config = DistributedConfig(tp_size=2, ep_size=2, tp_plan={})
            results["ep_pruned"] = inference_check(load("pruned").eval(), ids, config, folder="pruned")
    if not REMOTE:
        results["bad_heads"] = bad_size_check("bad_heads", DistributedConfig(tp_size=2))
        if EXPERT_PARALLEL:
            config = DistributedConfig(tp_size=2, ep_size=2, tp_plan={})
            results["bad_experts"] = bad_size_check("bad_experts", config)
        results["fsdp_lora"] = lora_fsdp_check(os.path.join(FOLDERS, "tiny"))
        results["fsdp_bf16"] = bf16_fsdp_check(os.path.join(FOLDERS, "tiny"))
    with open(os.path.join(OUT, f"rank{rank}.json"), "w") as handle:
        json.dump(results, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
