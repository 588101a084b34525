"""Run by `torchrun --nproc_per_node 2` from tests/test_distributed.py when DeepSpeed is installed; writes one JSON
per rank.

    python -m torch.distributed.run --nproc_per_node 2 tests/deepspeed_worker.py MODEL_DIR OUT_DIR

DeepSpeed ZeRO-3 (gloo on CPU) with the MoE block as a ZeRO-3 leaf module, as examples/deepspeed_zero3.json and
yuan_hf.finetune set it up: LoRA trained 3 AdamW steps on 4 rows (2 per rank) against one process on all 4 rows,
the same comparison as the FSDP2 check in distributed_worker.py.
"""

import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import set_z3_leaf_modules
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from transformers import AutoModelForCausalLM

import yuan_hf  # noqa: F401  (registers yuan_m32)
from yuan_hf.modeling.modeling_yuan_m32 import YuanM32SparseMoeBlock

MODEL, OUT = sys.argv[1], sys.argv[2]
STEPS, TARGETS = 3, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build():
    torch.manual_seed(2)  # the same LoRA init in both runs
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)
    return get_peft_model(model, lora).train()


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1)
    rows = torch.randint(6, 500, (4, 16))

    reference = build()
    optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2)
    reference_losses = []
    for _ in range(STEPS):
        loss = reference(input_ids=rows, labels=rows).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        reference_losses.append(loss.item())
    reference_adapter = get_peft_model_state_dict(reference)

    model = build()
    set_z3_leaf_modules(model, [YuanM32SparseMoeBlock])
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0 (the reference does not clip)
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=trainable, optimizer=torch.optim.AdamW(trainable, lr=1e-2), config=config
    )
    batch = rows[rank * 2 : rank * 2 + 2]
    losses = []
    for _ in range(STEPS):
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        losses.append((loss / world).item())
    with deepspeed.zero.GatheredParameters(trainable):
        adapter = {name: value.detach().clone() for name, value in get_peft_model_state_dict(model).items()}
    diffs = [(adapter[name] - reference_adapter[name]).abs().max().item() for name in reference_adapter]
    result = {
        "reference_losses": reference_losses,
        "zero3_losses": losses,
        "adapter_keys_equal": sorted(adapter) == sorted(reference_adapter),
        "max_adapter_diff": max(diffs),
        "max_lora_b": max(v.abs().max().item() for name, v in adapter.items() if "lora_B" in name),
        "leaf_modules": sum(bool(getattr(m, "_z3_leaf", False)) for m in model.modules()),
    }
    with open(os.path.join(OUT, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
    dist.barrier()


if __name__ == "__main__":
    main()
