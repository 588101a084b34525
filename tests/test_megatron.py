"""Megatron checkpoints: safe reading, TP/PP merge into IEIT's HF layout, the synthetic writer.

Equivalence is bitwise throughout (a conversion is a pure re-layout): against IEIT's own HF checkpoint of
the same weights for the public fixtures, and write -> read round trips for other TP x PP layouts.
"""

from __future__ import annotations

import argparse
import enum
import os
import shutil
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from yuan_hf.conversion.common import ConversionError
from yuan_hf.conversion.megatron import (
    LazyTensor,
    MegatronCheckpoint,
    MegatronStub,
    flatten_model_state,
    ieit_key_shapes,
    iter_ieit_stages,
    load_megatron_file,
    native_config_from_args,
)
from yuan_hf.conversion.writers import megatron_args_for, write_megatron_checkpoint

from conftest import fixtures_dir

# Non-square on purpose: H=64, 4 heads of 32 (P=128=2H as in the release), E=8, F=96; 6 layers split over 1, 2, 3.
TINY = {
    "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 6, "num_attention_heads": 4, "head_dim": 32,
    "moe_intermediate_size": 96, "num_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 128,
    "rope_parameters": {"rope_type": "default", "rope_theta": 40890.0, "partial_rotary_factor": 0.5},
}  # fmt: skip


def random_ieit_state(args: argparse.Namespace, *, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=generator).to(torch.bfloat16) for k, s in ieit_key_shapes(args).items()}


def read_all(src: Path | str, **kwargs) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for stage in iter_ieit_stages(MegatronCheckpoint.open(src, **kwargs)):
        assert not out.keys() & stage.keys()
        out |= stage
    return out


def assert_bitwise(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype and torch.equal(actual[key], tensor), key


def write_tiny(dst: Path, *, tp: int = 1, pp: int = 1, state=None, **kwargs) -> dict[str, torch.Tensor]:
    args = megatron_args_for(TINY, tp=tp, pp=pp)
    state = random_ieit_state(args) if state is None else state
    write_megatron_checkpoint(state, dst, args=args, tp=tp, pp=pp, **kwargs)
    return state


def rewrite(path: Path, edit) -> None:
    """Load a rank file in full, let ``edit`` change the dict, save it back (as Megatron would have)."""
    data = load_megatron_file(path, drop=())
    edit(data)
    torch.save(data, path)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def ieit_reference() -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for shard in sorted((fixtures_dir() / "yuan_m32_tiny" / "ieit_hf").glob("pytorch_model-*.bin")):
        state |= torch.load(shard, map_location="cpu", weights_only=True)
    assert len(state) == 93
    return state


def test_fixture_tp1_pp3_matches_ieit_hf(ieit_reference):
    ckpt = MegatronCheckpoint.open(fixtures_dir() / "yuan_m32_tiny" / "megatron")
    assert (ckpt.iteration, ckpt.tp_size, ckpt.pp_size, ckpt.num_stages) == (1477, 1, 3, 3)
    stages = list(iter_ieit_stages(ckpt))
    assert [sum(k.startswith("model.layers.") for k in s) for s in stages] == [30, 30, 30]
    assert "model.embed_tokens.weight" in stages[0] and "lm_head.weight" in stages[2]
    # PP > 1: the last stage's tied head copy (word_embeddings_for_head) becomes lm_head: all 93 keys
    assert_bitwise({k: v for s in stages for k, v in s.items()}, ieit_reference)


def test_fixture_tp2_pp1_matches_ieit_hf(ieit_reference):
    out = read_all(fixtures_dir() / "yuan_m32_tiny_megatron_tp2pp1" / "megatron")
    # PP == 1 and tied: Megatron stores no head, so no lm_head (92 keys), as IEIT's convert_hf_moe.py
    expected = {k: v for k, v in ieit_reference.items() if k != "lm_head.weight"}
    assert len(out) == 92
    assert_bitwise(out, expected)


def test_fixture_args_give_native_config():
    ckpt = MegatronCheckpoint.open(fixtures_dir() / "yuan_m32_tiny" / "megatron")
    assert isinstance(ckpt.args.model_type, MegatronStub)  # megatron.core.enums.ModelType, inert
    assert ckpt.args.model_type.args == (1,) and "megatron.core.enums.ModelType" in repr(ckpt.args.model_type)
    kwargs, notes = native_config_from_args(ckpt.args)
    assert kwargs == {
        "vocab_size": 1024, "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 4, "head_dim": 32, "moe_intermediate_size": 96, "num_experts": 8,
        "num_experts_per_tok": 2, "norm_topk_prob": True, "router_type": "attention", "max_position_embeddings": 512,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": True, "router_aux_loss_coef": 0.0,
    }  # fmt: skip
    assert any("layernorm_epsilon" in note for note in notes)  # 1e-5 in args, but IEIT hard-codes 1e-6


@pytest.mark.parametrize("fixture, tp, pp", [("yuan_m32_tiny", 1, 3), ("yuan_m32_tiny_megatron_tp2pp1", 2, 1)])
def test_writer_reproduces_fixture_rank_files(tmp_path, ieit_reference, fixture, tp, pp):
    """The writer's split is IEIT's split_tp_partitions.py: same nesting, names, order and bytes per rank."""
    source = MegatronCheckpoint.open(fixtures_dir() / fixture / "megatron")
    write_megatron_checkpoint(ieit_reference, tmp_path / "ckpt", args=source.args, tp=tp, pp=pp, iteration=1477)
    written = MegatronCheckpoint.open(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_bytes() == b"1477"  # no newline
    assert sorted(p.relative_to(written.path) for p in written.files.values()) == sorted(
        p.relative_to(source.path) for p in source.files.values()
    )
    for rank, path in source.files.items():
        theirs = load_megatron_file(path)
        ours = load_megatron_file(written.files[rank])
        assert list(ours) == list(theirs) == ["args", "checkpoint_version", "iteration", "model"]
        assert ours["checkpoint_version"] == 3.0 and ours["iteration"] == 1477
        assert ours["args"].rank == theirs["args"].rank
        flat_ours, flat_theirs = flatten_model_state(ours["model"]), flatten_model_state(theirs["model"])
        assert list(flat_ours) == list(flat_theirs)
        assert_bitwise(flat_ours, flat_theirs)


def test_stage_dicts_save_as_safetensors(tmp_path):
    """Yielded tensors own their storage (no shared views), so safetensors takes them as they are."""
    for i, stage in enumerate(iter_ieit_stages(MegatronCheckpoint.open(fixtures_dir() / "yuan_m32_tiny" / "megatron"))):
        save_file(stage, str(tmp_path / f"{i}.safetensors"))
        assert_bitwise(load_file(str(tmp_path / f"{i}.safetensors")), stage)


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("pp", [1, 2, 3])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_round_trip_is_bitwise(tmp_path, tp, pp):
    state = write_tiny(tmp_path / "ckpt", tp=tp, pp=pp, iteration=42)
    ckpt = MegatronCheckpoint.open(tmp_path / "ckpt")
    assert (ckpt.iteration, ckpt.tp_size, ckpt.pp_size) == (42, tp, pp)
    expected = dict(state)
    if pp > 1:  # tied, with PP > 1 Megatron keeps a head copy on the last stage
        expected["lm_head.weight"] = state["model.embed_tokens.weight"]
    assert_bitwise(read_all(tmp_path / "ckpt"), expected)
    kwargs, _ = native_config_from_args(ckpt.args)
    assert {k: kwargs[k] for k in TINY} == TINY


def test_round_trip_untied_linear_router_uneven_stages(tmp_path):
    config = TINY | {"tie_word_embeddings": False, "router_type": "linear"}
    args = megatron_args_for(config, tp=2, pp=3, pipeline_blocks=[1, 3, 2])
    state = random_ieit_state(args)
    assert "lm_head.weight" in state and "model.layers.0.mlp.gate.weight" in state
    assert "model.layers.0.mlp.gate.query.weight" not in state
    write_megatron_checkpoint(state, tmp_path / "ckpt", args=args, tp=2, pp=3)
    stages = list(iter_ieit_stages(MegatronCheckpoint.open(tmp_path / "ckpt")))
    assert [len({k.split(".")[2] for k in s if k.startswith("model.layers.")}) for s in stages] == [1, 3, 2]
    assert_bitwise({k: v for s in stages for k, v in s.items()}, state)
    kwargs, _ = native_config_from_args(args)
    assert kwargs["tie_word_embeddings"] is False and kwargs["router_type"] == "linear"


def test_dtype_cast(tmp_path):
    state = write_tiny(tmp_path / "ckpt")
    out = {}
    for stage in iter_ieit_stages(MegatronCheckpoint.open(tmp_path / "ckpt"), dtype=torch.float32, progress=True):
        out |= stage
    assert_bitwise(out, {k: v.float() for k, v in state.items()})


def test_writer_checks_its_input(tmp_path):
    args = megatron_args_for(TINY)
    state = random_ieit_state(args)
    with pytest.raises(ConversionError, match="missing.*model.norm.weight"):
        write_megatron_checkpoint({k: v for k, v in state.items() if k != "model.norm.weight"}, tmp_path / "a", args=args)
    with pytest.raises(ConversionError, match="do not describe.*model.layers.6"):
        write_megatron_checkpoint(state | {"model.layers.6.input_layernorm.weight": torch.ones(64)}, tmp_path / "b", args=args)
    bad = state | {"model.layers.2.mlp.experts.5.w2.weight": torch.zeros(64, 95, dtype=torch.bfloat16)}
    with pytest.raises(ConversionError, match=r"experts.5.w2.weight is \[64, 95\], expected \[64, 96\]"):
        write_megatron_checkpoint(bad, tmp_path / "c", args=args, tp=2)
    with pytest.raises(ConversionError, match="lm_head.weight differs"):
        write_megatron_checkpoint(state | {"lm_head.weight": torch.zeros(256, 64, dtype=torch.bfloat16)}, tmp_path / "d", args=args)
    assert not any(tmp_path.iterdir())  # atomic: nothing half-written


# ------------------------------------------------------------------------------------------------ safe loading


class _PlantedGlobal:
    """Pickles as a call of ``func(*args)``: what a malicious checkpoint would contain."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("func, name", [(os.system, "system"), (eval, "builtins.eval"), (shutil.rmtree, "shutil.rmtree")])
def test_planted_global_is_refused_and_never_runs(tmp_path, func, name):
    marker = tmp_path / "pwned"
    victim = tmp_path / "victim"
    victim.mkdir()
    payload = {
        os.system: f"touch {marker}",
        eval: f"open({str(marker)!r}, 'w')",
        shutil.rmtree: str(victim),
    }[func]
    path = tmp_path / "model_optim_rng.pt"
    torch.save({"args": argparse.Namespace(hidden_size=8), "model": {"x": _PlantedGlobal(func, payload)}}, path)
    with pytest.raises(ConversionError, match=f"{path}: refusing to unpickle the global .*{name}"):
        load_megatron_file(path)
    assert not marker.exists() and victim.is_dir()


def test_planted_global_in_a_checkpoint_stops_the_conversion(tmp_path):
    write_tiny(tmp_path / "ckpt", pp=2)
    marker = tmp_path / "pwned"
    evil = tmp_path / "ckpt" / "iter_0000001" / "mp_rank_00_001" / "model_optim_rng.pt"
    rewrite(evil, lambda d: d["model"]["language_model"].update(pooler=_PlantedGlobal(os.system, f"touch {marker}")))
    ckpt = MegatronCheckpoint.open(tmp_path / "ckpt")  # stage 0's file is clean
    with pytest.raises(ConversionError, match="mp_rank_00_001.*refusing to unpickle the global posix.system"):
        list(iter_ieit_stages(ckpt))
    assert not marker.exists()


def test_megatron_globals_become_inert_stubs(tmp_path, monkeypatch):
    """Megatron enums pickle as megatron.* globals; they load as records, without megatron installed."""

    class ModelType(enum.Enum):
        encoder_or_decoder = 1

    ModelType.__module__, ModelType.__qualname__ = "megatron.core.enums", "ModelType"
    fake = ("megatron", "megatron.core", "megatron.core.enums")
    for name in fake:  # a stand-in megatron, only while saving
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["megatron.core.enums"].ModelType = ModelType
    path = tmp_path / "model_optim_rng.pt"
    torch.save({"args": argparse.Namespace(model_type=ModelType.encoder_or_decoder, tags={"a"})}, path)
    for name in fake:
        monkeypatch.delitem(sys.modules, name)
    args = load_megatron_file(path)["args"]
    assert isinstance(args.model_type, MegatronStub) and args.model_type.args == (1,)
    assert args.model_type.megatron_global == "megatron.core.enums.ModelType"
    assert args.tags == {"a"}  # protocol 2 names it __builtin__.set


def test_torchscript_archive_is_refused(tmp_path):
    """torch.load would hand such a zip to torch.jit.load; this reader refuses it."""
    path = tmp_path / "model_optim_rng.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        archive.writestr("archive/constants.pkl", b"\x80\x02)q\x00.")
    with pytest.raises(ConversionError, match="TorchScript archive"):
        load_megatron_file(path)


def test_optimizer_state_is_never_read(tmp_path):
    """Dropped entries are parsed as structure only: corrupting their bytes does not matter."""
    path = tmp_path / "model_optim_rng.pt"
    weight = torch.randn(4, 8)
    torch.save({"args": argparse.Namespace(), "model": {"w": weight}, "optimizer": {"exp_avg": torch.randn(1000)}}, path)
    record = load_megatron_file(path, lazy=True, drop=())["optimizer"]["exp_avg"].storage
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(record.name)
    raw = bytearray(path.read_bytes())
    header = raw[info.header_offset : info.header_offset + 30]  # zip local header: name and extra lengths at 26..30
    data_start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    raw[data_start : data_start + 64] = b"\xff" * 64
    path.write_bytes(bytes(raw))
    loaded = load_megatron_file(path)
    assert list(loaded) == ["args", "model"] and torch.equal(loaded["model"]["w"], weight)
    with pytest.raises(ConversionError, match="fails its CRC check"):
        load_megatron_file(path, drop=())


def test_lazy_tensors_and_views(tmp_path):
    path = tmp_path / "model_optim_rng.pt"
    base = torch.arange(24.0).view(4, 6)
    torch.save({"model": {"full": base, "view": base[1:3, ::2], "t": base.T}}, path)
    lazy = load_megatron_file(path, lazy=True)["model"]
    assert isinstance(lazy["view"], LazyTensor) and lazy["view"].shape == (2, 3) and lazy["view"].dtype == torch.float32
    loaded = load_megatron_file(path)["model"]
    for key, expected in (("full", base), ("view", base[1:3, ::2]), ("t", base.T)):
        assert torch.equal(loaded[key], expected)
        assert loaded[key].untyped_storage().nbytes() == expected.numel() * 4  # views copied out


@pytest.mark.parametrize("damage", ["truncate", "garbage", "bad_pickle", "missing"])
def test_unreadable_file(tmp_path, damage):
    path = tmp_path / "model_optim_rng.pt"
    torch.save({"args": argparse.Namespace(), "model": {"w": torch.randn(64, 64)}}, path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 1000)
    elif damage == "bad_pickle":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("model_optim_rng/data.pkl", b"\x80\x02}q\x00(X\x01garbage")
    else:
        path.unlink()
    with pytest.raises(ConversionError, match=str(path)):
        load_megatron_file(path)


# ------------------------------------------------------------------------------------------------ opening


def test_open_variants(tmp_path):
    write_tiny(tmp_path / "ckpt", pp=2, iteration=9, tracker_newline=True)
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "9\n"
    by_tracker = MegatronCheckpoint.open(tmp_path / "ckpt")
    by_folder = MegatronCheckpoint.open(tmp_path / "ckpt" / "iter_0000009")
    by_number = MegatronCheckpoint.open(tmp_path / "ckpt", iteration=9)
    assert by_tracker == by_folder == by_number and by_tracker.iteration == 9
    assert by_tracker.stage_files(1) == [tmp_path / "ckpt" / "iter_0000009" / "mp_rank_00_001" / "model_optim_rng.pt"]
    # a "release" checkpoint: tracker says release, the folder is release/
    (tmp_path / "ckpt" / "iter_0000009").rename(tmp_path / "ckpt" / "release")
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("release")
    release = MegatronCheckpoint.open(tmp_path / "ckpt")
    assert release.iteration is None and release.path.name == "release"
    assert len(read_all(tmp_path / "ckpt")) == len(read_all(tmp_path / "ckpt" / "release"))


def test_open_errors_on_the_tracker(tmp_path):
    write_tiny(tmp_path / "ckpt", iteration=3)
    tracker = tmp_path / "ckpt" / "latest_checkpointed_iteration.txt"
    tracker.unlink()
    with pytest.raises(ConversionError, match=r"no latest_checkpointed_iteration.txt .*iter_0000003.* --iteration"):
        MegatronCheckpoint.open(tmp_path / "ckpt")
    assert MegatronCheckpoint.open(tmp_path / "ckpt", iteration=3).iteration == 3
    with pytest.raises(ConversionError, match=r"iter_0000004 does not exist .*available: iter_0000003"):
        MegatronCheckpoint.open(tmp_path / "ckpt", iteration=4)
    tracker.write_text("5")
    with pytest.raises(ConversionError, match=r"iter_0000005 does not exist .*says '5'"):
        MegatronCheckpoint.open(tmp_path / "ckpt")
    tracker.write_text("latest")
    with pytest.raises(ConversionError, match="holds 'latest'; expected an iteration number or 'release'"):
        MegatronCheckpoint.open(tmp_path / "ckpt")
    with pytest.raises(ConversionError, match="is iteration 3, but iteration 4 was asked for"):
        MegatronCheckpoint.open(tmp_path / "ckpt" / "iter_0000003", iteration=4)
    with pytest.raises(ConversionError, match="is not a directory"):
        MegatronCheckpoint.open(tracker)


@pytest.mark.parametrize(
    "tp, pp, damage, message",
    [
        (1, 3, "rm mp_rank_00_001", r"lacks rank folder\(s\) mp_rank_00_001 of its 1 TP x 3 PP grid"),
        (4, 1, "rm mp_rank_01", r"lacks rank folder\(s\) mp_rank_01 of its 4 TP x 1 PP grid"),
        (2, 1, "rm mp_rank_01", r"holds 1 TP x 1 PP rank folders but args.tensor_model_parallel_size = 2"),
        (1, 2, "rm mp_rank_00_001", r"holds 1 TP x 1 PP rank folders but args.pipeline_model_parallel_size = 2"),
        (2, 2, "rm mp_rank_01_001/model_optim_rng.pt", r"mp_rank_01_001/model_optim_rng.pt is missing"),
        (1, 2, "truncate mp_rank_00_001/model_optim_rng.pt", r"mp_rank_00_001/model_optim_rng.pt is not a zip"),
        (1, 2, "mkdir mp_rank_00_000_001", r"expert-parallel checkpoints .* not supported"),
        (1, 1, "mkdir mp_rank_00_000", r"mixes mp_rank_TT and mp_rank_TT_PPP"),
    ],
)
def test_open_errors_on_the_rank_grid(tmp_path, tp, pp, damage, message):
    write_tiny(tmp_path / "ckpt", tp=tp, pp=pp)
    action, relative = damage.split()
    target = tmp_path / "ckpt" / "iter_0000001" / relative
    if action == "rm":
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    elif action == "truncate":
        target.write_bytes(target.read_bytes()[:1000])
    else:
        target.mkdir()
        (target / "model_optim_rng.pt").write_bytes(b"")
    with pytest.raises(ConversionError, match=message):
        MegatronCheckpoint.open(tmp_path / "ckpt")


def test_args_disagreeing_with_files_are_caught(tmp_path):
    write_tiny(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    rewrite(path, lambda d: setattr(d["args"], "ffn_hidden_size", 64))
    with pytest.raises(ConversionError, match=r"mp_rank_00/model_optim_rng.pt: .*experts.weight1 is \[64, 1536\] .*expected \[64, 1024\]"):
        list(iter_ieit_stages(MegatronCheckpoint.open(tmp_path / "ckpt")))


# ------------------------------------------------------------------------------------------------ bad tensors


def _stage_file(root: Path, tp_rank: int, stage: int, pp: int) -> Path:
    name = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{stage:03d}"
    return root / "iter_0000001" / name / "model_optim_rng.pt"


def _encoder(d: dict) -> dict:
    return d["model"]["language_model"]["encoder"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: _encoder(d).update({"layers.1.self_attention.dense.weight": torch.zeros(64, 63)}),
         r"layers.1.self_attention.dense.weight is \[64, 63\] torch.float32, expected \[64, 64\]"),
        (lambda d: _encoder(d).pop("layers.0.post_attention_layernorm.weight"),
         r"mp_rank_01.* and .*mp_rank_00.* hold different tensors: .*layers.0.post_attention_layernorm"),
        (lambda d: _encoder(d)["layers.2.self_attention.lf_gate.conv1.bias"].add_(1),
         r"lf_gate.conv1.bias in .*: this tensor is replicated over tensor-parallel ranks but rank 1 differs"),
    ],
    ids=["shape", "missing-on-one-rank", "replicas-differ"],
)
def test_bad_tensors_on_one_tp_rank(tmp_path, edit, message):
    write_tiny(tmp_path / "ckpt", tp=2)
    rewrite(_stage_file(tmp_path / "ckpt", 1, 0, 1), edit)
    with pytest.raises(ConversionError, match=message):
        list(iter_ieit_stages(MegatronCheckpoint.open(tmp_path / "ckpt")))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: [_encoder(d).pop(k) for k in list(_encoder(d)) if "layers.1.mlp.experts.weight2" in k],
         r"pipeline stage 1 .*lacks 1 tensor\(s\) the args imply: language_model.encoder.layers.1.mlp.experts.weight2"),
        (lambda d: _encoder(d).update({"layers.0.self_attention.rotary_emb.freqs": torch.ones(3)}),
         r"unexpected tensor 'language_model.encoder.layers.0.self_attention.rotary_emb.freqs': it matches no entry"),
        (lambda d: _encoder(d).update({"layers.3.input_layernorm.weight": torch.ones(64)}),
         r"unexpected tensor 'language_model.encoder.layers.3.input_layernorm.weight' on pipeline stage 1, which should hold layers 3..5"),
        (lambda d: d["model"]["word_embeddings_for_head"]["weight"].mul_(2),
         r"word_embeddings_for_head differs from the first stage's word_embeddings"),
        (lambda d: d.update(model0=d.pop("model")), r"holds no 'model' but \['model0'\]: interleaved"),
    ],
    ids=["missing", "unknown", "layer-beyond-stage", "tied-head-differs", "virtual-pipeline"],
)
def test_bad_tensors_on_a_stage(tmp_path, edit, message):
    write_tiny(tmp_path / "ckpt", pp=2)
    rewrite(_stage_file(tmp_path / "ckpt", 0, 1, 2), edit)
    with pytest.raises(ConversionError, match=message):
        list(iter_ieit_stages(MegatronCheckpoint.open(tmp_path / "ckpt")))


def test_tied_head_check_can_be_waived(tmp_path):
    write_tiny(tmp_path / "ckpt", pp=2)
    rewrite(_stage_file(tmp_path / "ckpt", 0, 1, 2), lambda d: d["model"]["word_embeddings_for_head"]["weight"].mul_(2))
    stages = list(iter_ieit_stages(MegatronCheckpoint.open(tmp_path / "ckpt"), check_tied_head=False))
    assert torch.equal(stages[1]["lm_head.weight"], stages[0]["model.embed_tokens.weight"] * 2)


def test_dropped_keys_are_accepted(tmp_path):
    write_tiny(tmp_path / "ckpt")
    inv_freq = {"inv_freq": torch.ones(8)}
    rewrite(_stage_file(tmp_path / "ckpt", 0, 0, 1), lambda d: d["model"]["language_model"].update(rotary_pos_emb=inv_freq))
    assert len(read_all(tmp_path / "ckpt")) == len(ieit_key_shapes(megatron_args_for(TINY)))


# ------------------------------------------------------------------------------------------------ args


def test_native_config_notes_and_overrides():
    args = vars(megatron_args_for(TINY))
    del args["rotary_base"]
    kwargs, notes = native_config_from_args(args)
    assert kwargs["rope_parameters"]["rope_theta"] == 40890.0
    assert any("rotary base not in args" in n and "--rope-theta" in n for n in notes)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    kwargs, notes = native_config_from_args(args, overrides={"rope_parameters": rope})
    assert kwargs["rope_parameters"] == rope and any(n.startswith("overridden: rope_parameters") for n in notes)
    with pytest.raises(ConversionError, match="invalid native config.*num_experts_per_tok"):
        native_config_from_args(args, overrides={"num_experts_per_tok": 9})


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("use_lf_gate", False, "use_lf_gate = False is not supported: layers without the LF gate"),
        ("lf_conv2d_num_pad", 2, "lf_conv2d_num_pad = 2 is not supported"),
        ("lf_conv2d_group", 2, "lf_conv2d_group = 2 is not supported"),
        ("swiglu", False, "swiglu = False is not supported"),
        ("group_query_attention", True, "group_query_attention = True is not supported"),
        ("moe_grouped_gemm", False, "moe_grouped_gemm = False is not supported: only GroupedMLP"),
        ("transformer_impl", "transformer_engine", "transformer_impl = 'transformer_engine' is not supported"),
        ("norm_dtype", "LayerNorm", "norm_dtype = 'LayerNorm' is not supported"),
        ("num_attention_router_heads", 64, "num_attention_router_heads = 64 differs from seq_length 128"),
        ("num_experts", None, "num_experts = None is not supported"),
        ("padded_vocab_size", None, "lack 'padded_vocab_size'"),
        ("ffn_hidden_size", 90, "ffn_hidden_size = 90 is not divisible by tensor_model_parallel_size 4"),
    ],
)
def test_args_the_native_model_cannot_express(field, value, message):
    args = megatron_args_for(TINY, tp=4)
    setattr(args, field, value)
    with pytest.raises(ConversionError, match=message):
        native_config_from_args(args)


def test_pipeline_blocks_must_agree_with_the_method():
    args = megatron_args_for(TINY, pp=3)
    args.pipeline_blocks = [1, 3, 2]  # but pipeline_model_parallel_method stays "uniform"
    with pytest.raises(ConversionError, match=r"pipeline_blocks \[1, 3, 2\] disagree with the uniform split \[2, 2, 2\]"):
        native_config_from_args(args)
