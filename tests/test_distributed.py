"""Multi-process checks on CPU: `torchrun --nproc_per_node 2` with the gloo backend (tests/distributed_worker.py).

transformers' own engine (`from_pretrained(..., distributed_config=DistributedConfig(...))`) with Yuan's plans:
tensor parallel (TP=2), expert parallel (EP=2) and both, against the single-process model (logits and greedy
tokens), for the package and for the Hub copy (remote code); sizes that do not divide the heads or experts are
refused before any weight is read; FSDP2 (`fully_shard`, one unit per decoder layer) LoRA training equals one
process (losses and adapter).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version

from yuan_hf import YuanM32ForCausalLM
from yuan_hf.modeling.distributed_yuan_m32 import check_parallel_sizes
from yuan_hf.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
# fp32 sums in another order (row-parallel reductions, all-reduced expert outputs): a few ulps of logits ~10
LOGIT_ATOL = 1e-4

needs_ep_api = pytest.mark.skipif(
    Version(transformers.__version__) < Version("5.23"),
    reason=f"transformers {transformers.__version__}: DistributedConfig(ep_size=...) and EP implementations that "
    "call the experts with local ids arrive in 5.23; the TP/EP loading API before it differs release by release",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _unreadable_weights(folder: Path) -> None:
    """Replace the weights by bytes no loader can read: a load that gets to them fails with another error."""
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist_models")
    tiny_model(seed=0).save_pretrained(root / "tiny")
    tiny_model(seed=0, num_experts=[8, 4]).save_pretrained(root / "pruned")
    for name, overrides in {"bad_heads": {"num_attention_heads": 3}, "bad_experts": {"num_experts": 5}}.items():
        tiny_model(seed=0, **overrides).save_pretrained(root / name)
        _unreadable_weights(root / name)
    return root


def _torchrun(folders: Path, out: Path, *extra: str) -> list[dict]:
    out.mkdir()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        str(WORKER), str(folders), str(out), *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(out / "hf_home")}
    if extra:  # remote code: the package must not be importable (the worker also blocks it)
        env.pop("PYTHONPATH", None)
    else:
        env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=out)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def package_run(folders, tmp_path_factory) -> list[dict]:
    return _torchrun(folders, tmp_path_factory.mktemp("dist_package") / "out")


@pytest.fixture(scope="module")
def remote_run(folders, tmp_path_factory) -> list[dict]:
    return _torchrun(folders, tmp_path_factory.mktemp("dist_remote") / "out", "--remote-code")


def _assert_same_as_single_process(result: dict) -> None:
    assert result["max_abs_logit_diff"] <= LOGIT_ATOL, result["max_abs_logit_diff"]
    assert result["logits_scale"] > 1.0  # the comparison is not between two near-zero tensors
    assert result["greedy_equal"], result["new_tokens"]


EP_MODES = [pytest.param(mode, marks=needs_ep_api) for mode in ("ep", "tp_ep")]


@pytest.mark.parametrize("mode", ["tp", *EP_MODES])
def test_sharded_inference_equals_single_process(package_run, mode):
    for rank_result in package_run:
        _assert_same_as_single_process(rank_result[mode])
    assert package_run[0][mode]["new_tokens"] == package_run[1][mode]["new_tokens"]


@pytest.mark.parametrize("mode", ["tp", *EP_MODES])
def test_sharded_inference_with_remote_code(remote_run, mode):
    for rank_result in remote_run:
        assert "transformers_modules" in rank_result[mode]["class_module"]
        _assert_same_as_single_process(rank_result[mode])


def test_tensor_parallel_plan_shards_heads_and_experts_and_replicates_lf_gate_and_router(package_run):
    # tiny: hidden 64, 4 heads x 32, 8 experts of width 128, vocab 512
    for result in (r["tp"]["sharding"] for r in package_run):
        assert result["q_proj"] == result["k_proj"] == result["v_proj"] == [64, 64]  # 2 of 4 heads
        assert result["o_proj"] == [64, 64]
        assert result["expert.gate_proj"] == [64, 64] and result["expert.down_proj"] == [64, 64]
        assert result["experts_held"] == list(range(8))
        assert result["lf_gate.conv1"] == [32, 64, 2] and result["lf_gate.conv2"] == [64, 32, 2]
        assert result["router.query"] == [8, 64]
        assert not result["router_is_dtensor"] and not result["lf_gate_is_dtensor"]
        assert result["embed_tokens"] == [256, 64]  # vocab-parallel embedding (tied with the LM head)


@needs_ep_api
def test_expert_parallel_plan_gives_each_rank_half_the_experts(package_run):
    held = [r["ep"]["sharding"]["experts_held"] for r in package_run]
    assert held == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for rank_result in package_run:
        ep = rank_result["ep"]["sharding"]
        assert ep["expert.gate_proj"] == [128, 64] and ep["q_proj"] == [128, 64]  # whole experts, attention whole
        both = rank_result["tp_ep"]["sharding"]
        assert both["q_proj"] == [64, 64] and both["expert.gate_proj"] == [128, 64]  # heads split, experts whole
    assert package_run[0]["tp"]["save"] == "saved"  # tensor parallel gathers its shards to save
    assert "rank 0 holds only its share (1/2)" in package_run[0]["ep"]["save"]  # no checkpoint missing experts
    assert "rank 1 holds only its share (1/2)" in package_run[1]["tp_ep"]["save"]
    full = sum(p.numel() for p in tiny_model(seed=0).parameters())
    experts = sum(p.numel() for layer in tiny_model(seed=0).model.layers for p in layer.mlp.experts.parameters())
    assert package_run[0]["ep"]["params_on_rank"] == full - experts // 2


@needs_ep_api
def test_expert_parallel_with_per_layer_expert_counts(package_run):
    """A pruned model (8 experts in layer 0, 4 in layer 1): each rank keeps half of each layer's experts."""
    for rank_result in package_run:
        _assert_same_as_single_process(rank_result["ep_pruned"])
    assert [r["ep_pruned"]["sharding"]["experts_held"] for r in package_run] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    full = sum(p.numel() for p in tiny_model(seed=0, num_experts=[8, 4]).parameters())
    expert = sum(p.numel() for p in tiny_model(seed=0).model.layers[0].mlp.experts[0].parameters())
    assert package_run[0]["ep_pruned"]["params_on_rank"] == full - (4 + 2) * expert


@pytest.mark.parametrize(
    ("case", "numbers"),
    [
        ("bad_heads", ("tp_size 2", "num_attention_heads 3")),
        pytest.param("bad_experts", ("ep_size 2", "num_experts 5"), marks=needs_ep_api),
    ],
)
def test_world_size_not_dividing_heads_or_experts_fails_before_weights_load(package_run, case, numbers):
    for rank_result in package_run:
        error = rank_result[case]
        assert error["type"] == "ValueError", error
        assert all(number in error["message"] for number in numbers), error["message"]


def test_fsdp2_lora_training_equals_single_process(package_run):
    for rank_result in package_run:
        result = rank_result["fsdp_lora"]
        # one unit per decoder layer (the MoE block inside it, not a unit of its own) and the root
        layers = ["base_model.model.model.layers.0", "base_model.model.model.layers.1"]
        assert sorted(result["fsdp_units"]) == ["", *layers]
        assert len(result["fsdp_losses"]) == 3 and result["fsdp_losses"][-1] < result["fsdp_losses"][0]
        torch.testing.assert_close(result["fsdp_losses"], result["reference_losses"], rtol=0, atol=1e-5)
        assert result["adapter_keys_equal"] and result["adapter_tensors"] > 0
        assert result["max_lora_b"] > 1e-3  # the adapter moved away from its zero init
        assert result["max_adapter_diff"] <= 1e-5, result["max_adapter_diff"]


def test_fsdp2_bf16_base_with_fp32_router_and_adapters_trains(package_run):
    for rank_result in package_run:
        result = rank_result["fsdp_bf16"]
        assert result["dtypes"] == ["torch.bfloat16", "torch.float32"]
        assert result["all_grads"] and 0 < result["loss"] < 20, result


@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed (optional: pip install -e '.[deepspeed]'); it is not a dependency of yuan-hf",
)
def test_deepspeed_zero3_lora_with_moe_leaf_equals_single_process(folders, tmp_path):
    """ZeRO-3 (gloo on CPU) with the MoE block as leaf module: LoRA losses and adapter equal one process. Runs
    deepspeed directly: accelerate cannot start DeepSpeed on a CPU-only machine (README, "Multi-GPU")."""
    out = tmp_path / "out"
    out.mkdir()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        str(WORKER.with_name("deepspeed_worker.py")), str(folders / "tiny"), str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=out)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    for rank in range(2):
        run = json.loads((out / f"rank{rank}.json").read_text())
        assert run["leaf_modules"] == 2  # one YuanM32SparseMoeBlock per layer
        torch.testing.assert_close(run["zero3_losses"], run["reference_losses"], rtol=0, atol=1e-5)
        assert run["adapter_keys_equal"] and run["max_lora_b"] > 1e-3
        assert run["max_adapter_diff"] <= 1e-5, run["max_adapter_diff"]


# ------------------------------------------------------------------------------------ in-process, no torchrun


class _Sizes:
    def __init__(self, tp_size=1, ep_size=1, tp_plan=None):
        self.tp_size, self.ep_size, self.tp_plan = tp_size, ep_size, tp_plan


@pytest.mark.parametrize(
    ("sizes", "numbers"),
    [
        (_Sizes(tp_size=3), ("tp_size 3", "num_attention_heads 16")),
        (_Sizes(tp_size=32), ("tp_size 32", "num_attention_heads 16")),
        (_Sizes(tp_size=2, ep_size=6), ("ep_size 6", "num_experts 32")),
        (_Sizes(tp_size=3, ep_size=3, tp_plan={}), ("ep_size 3", "num_experts 32")),
        (_Sizes(tp_size=4, ep_size=4), ("ep_size 4", "num_experts[23] (layer 23) 30")),  # pruned in its last layer
    ],
)
def test_release_sizes_that_do_not_divide_are_named(sizes, numbers):
    from yuan_hf import YuanM32Config

    config = YuanM32Config(num_experts=[32] * 23 + [30]) if "layer 23" in numbers[1] else YuanM32Config()
    with pytest.raises(ValueError) as error:
        check_parallel_sizes(config, sizes)
    assert all(number in str(error.value) for number in numbers), str(error.value)


def test_release_sizes_that_divide_pass():
    from yuan_hf import YuanM32Config

    for tp, ep in [(1, 1), (2, 2), (4, 4), (8, 8), (16, 16), (8, 32)]:
        check_parallel_sizes(YuanM32Config(), _Sizes(tp_size=tp, ep_size=ep))
    check_parallel_sizes(YuanM32Config(), _Sizes(tp_size=32, ep_size=32, tp_plan={}))  # EP alone: heads unsplit


def test_plans_name_modules_of_the_release_model():
    """Every plan rule matches modules of the full-size model (built on meta): nothing silently unsharded."""
    import re

    from yuan_hf import YuanM32Config

    with torch.device("meta"):
        model = YuanM32ForCausalLM(YuanM32Config())
    names = {re.sub(r"\.\d+(\.|$)", r".*\1", name) for name, _ in model.named_modules()}
    config = model.config
    plans = {"tp": config.base_model_tp_plan, "ep": config.base_model_ep_plan}
    for plan in plans.values():
        assert plan and not {f"model.{rule}" for rule in plan} - names, set(plan)
    assert not any("lf_gate" in rule or "mlp.gate" in rule for plan in plans.values() for rule in plan)
    assert config.base_model_ep_plan == {"layers.*.mlp.experts": "ep_dispatch_experts"}
    expected = {"lm_head": "colwise_gather_output", **{f"model.{k}": v for k, v in plans["tp"].items()}}
    # transformers adds a vocabulary-parallel embedding rule (tied with the colwise LM head) where its release does
    without_embeddings = {k: v for k, v in model._tp_plan.items() if k != "model.embed_tokens"}
    assert without_embeddings == {k: v for k, v in expected.items() if k != "model.embed_tokens"}
