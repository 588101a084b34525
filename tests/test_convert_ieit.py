"""The IEIT-HF converter: full-size shapes on `meta`, strict accounting, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from yuan_hf import YuanM32Config, YuanM32ForCausalLM
from yuan_hf.cli import main as cli
from yuan_hf.conversion.common import ConversionError
from yuan_hf.conversion.ieit_hf import convert_ieit_hf, native_config_from_ieit
from yuan_hf.conversion.native.builder import IEIT_KEYS, NativeStateBuilder

from conftest import fixtures_dir


def ieit_release_shapes(config: YuanM32Config) -> dict[str, tuple[int, ...]]:
    """IEIT's HF key -> shape map for a given size (the released layout: tied, no lm_head tensor)."""
    H, P, E, F, V = config.hidden_size, config.num_attention_heads * config.head_dim, config.num_experts, config.moe_intermediate_size, config.vocab_size
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (H,), f"{p}.post_attention_layernorm.weight": (H,),
            f"{p}.self_attn.q_proj.weight": (P, H), f"{p}.self_attn.k_proj.weight": (P, H),
            f"{p}.self_attn.v_proj.weight": (P, H), f"{p}.self_attn.o_proj.weight": (H, P),
            f"{p}.self_attn.lf_gate.conv1.weight": (H // 2, H, 2, 1), f"{p}.self_attn.lf_gate.conv1.bias": (H // 2,),
            f"{p}.self_attn.lf_gate.conv2.weight": (H, H // 2, 2, 1), f"{p}.self_attn.lf_gate.conv2.bias": (H,),
            f"{p}.self_attn.lf_gate.output_layernorm.weight": (H,),
            f"{p}.mlp.gate.query.weight": (E, H), f"{p}.mlp.gate.key.weight": (E, H), f"{p}.mlp.gate.value.weight": (E, H),
        }  # fmt: skip
        for e in range(E):
            shapes |= {f"{p}.mlp.experts.{e}.w1.weight": (2 * F, H), f"{p}.mlp.experts.{e}.w2.weight": (H, F)}
    return shapes


def test_full_size_m32_converts_on_meta_to_the_exact_native_key_shape_map():
    config = YuanM32Config()
    source = ieit_release_shapes(config)
    builder = NativeStateBuilder(config, dtype=None)
    produced = {}
    for key, shape in source.items():
        for name, tensor in builder.add(key, torch.empty(shape, device="meta", dtype=torch.bfloat16)):
            produced[name] = tuple(tensor.shape)
    builder.finish()
    with torch.device("meta"):
        native = YuanM32ForCausalLM(config)
    expected = {k: tuple(v.shape) for k, v in native.state_dict().items() if k != "lm_head.weight"}
    assert produced == expected
    assert len(source) == 2 + 24 * (14 + 32 * 2)  # every source tensor was fed in and consumed
    total = sum(torch.Size(s).numel() for s in produced.values())
    assert total == sum(torch.Size(s).numel() for s in source.values())
    assert abs(total - 39.94e9) < 0.01e9, total


def test_fused_qk_split_recovers_per_head_q_and_k():
    heads, d, H = 4, 3, 5
    q = torch.randn(heads, d, H)
    k = torch.randn(heads, d, H)
    fused = torch.stack([q, k], 1).reshape(2 * heads * d, H)  # Megatron's [q_0; k_0; q_1; k_1; ...]
    first, second = fused.chunk(2)  # what IEIT calls q_proj / k_proj
    from yuan_hf.conversion.native.builder import split_fused_qk

    got_q, got_k = split_fused_qk(first, second, num_heads=heads)
    assert torch.equal(got_q, q.reshape(-1, H)) and torch.equal(got_k, k.reshape(-1, H))


def test_config_translation_of_the_fixture():
    ieit = json.loads((fixtures_dir() / "yuan_m32_tiny" / "ieit_hf" / "config.json").read_text())
    config, notes = native_config_from_ieit(ieit)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.head_dim) == (64, 3, 4, 32)
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (8, 2, 96)
    assert config.rotary_dim == 16 and config.rope_parameters["rope_theta"] == 40890
    assert config.sep_token_id == 1003 and config.eos_token_id == 1001
    assert any("40890" in n for n in notes)


def test_converted_weights_are_the_ieit_weights_rearranged(tmp_path):
    src = fixtures_dir() / "yuan_m32_tiny" / "ieit_hf_safetensors"
    convert_ieit_hf(src, tmp_path / "out", dtype="float32", progress=False)
    native = load_file(str(tmp_path / "out" / "model.safetensors"))
    ieit = load_file(str(src / "model.safetensors"))
    assert "lm_head.weight" not in native  # tied
    assert torch.equal(native["model.layers.1.mlp.experts.3.gate_proj.weight"], ieit["model.layers.1.mlp.experts.3.w1.weight"][:96].float())
    assert torch.equal(native["model.layers.1.mlp.experts.3.up_proj.weight"], ieit["model.layers.1.mlp.experts.3.w1.weight"][96:].float())
    fused = torch.cat([ieit["model.layers.2.self_attn.q_proj.weight"], ieit["model.layers.2.self_attn.k_proj.weight"]])
    # head 1's query rows sit at [64, 96) of the fused per-head layout, its key rows at [96, 128)
    assert torch.equal(native["model.layers.2.self_attn.q_proj.weight"][32:64], fused[64:96].float())
    assert torch.equal(native["model.layers.2.self_attn.k_proj.weight"][32:64], fused[96:128].float())
    assert sum(t.numel() for t in native.values()) == sum(t.numel() for k, t in ieit.items() if k != "lm_head.weight")


def test_sharded_output_with_index(tmp_path):
    convert_ieit_hf(fixtures_dir() / "yuan_m32_tiny" / "ieit_hf", tmp_path / "out", max_shard_size="300KB", progress=False)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((tmp_path / "out" / f).is_file() for f in files)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------ bad input


@pytest.fixture
def ieit_copy(tmp_path) -> Path:
    dst = tmp_path / "ieit"
    shutil.copytree(fixtures_dir() / "yuan_m32_tiny" / "ieit_hf", dst)
    return dst


@pytest.fixture
def st_copy(tmp_path) -> Path:
    dst = tmp_path / "ieit_st"
    shutil.copytree(fixtures_dir() / "yuan_m32_tiny" / "ieit_hf_safetensors", dst)
    return dst


def run_cli_expect_failure(src: Path, dst: Path, match: str, capsys, *extra: str) -> None:
    code = cli(["convert", "ieit-hf", str(src), str(dst), *extra])
    err = capsys.readouterr().err
    assert code != 0
    assert match in err, err
    assert not dst.exists() or not any(dst.iterdir()), "a failed conversion left files at DST"
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.tmp")], "temp dir left behind"


def test_not_an_ieit_folder(tmp_path, capsys):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    run_cli_expect_failure(tmp_path / "llama", tmp_path / "out", "model_type='llama'", capsys)
    run_cli_expect_failure(tmp_path / "nowhere", tmp_path / "out", "is not a directory", capsys)
    (tmp_path / "empty").mkdir()
    run_cli_expect_failure(tmp_path / "empty", tmp_path / "out", "no config.json", capsys)


def test_missing_shard_named_by_index(ieit_copy, tmp_path, capsys):
    (ieit_copy / "pytorch_model-00002-of-00003.bin").unlink()
    run_cli_expect_failure(ieit_copy, tmp_path / "out", "pytorch_model-00002-of-00003.bin", capsys)


def test_truncated_shard(ieit_copy, tmp_path, capsys):
    shard = ieit_copy / "pytorch_model-00002-of-00003.bin"
    shard.write_bytes(shard.read_bytes()[:5000])
    run_cli_expect_failure(ieit_copy, tmp_path / "out", "pytorch_model-00002-of-00003.bin", capsys)


def test_truncated_safetensors(st_copy, tmp_path, capsys):
    file = st_copy / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    run_cli_expect_failure(st_copy, tmp_path / "out", "model.safetensors", capsys)


def test_pickle_with_code_is_refused(ieit_copy, tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (exec, ("open('PWNED', 'w').write('x')",))

    shard = ieit_copy / "pytorch_model-00003-of-00003.bin"
    state = torch.load(shard, weights_only=True)
    state["model.norm.weight"] = Evil()
    torch.save(state, shard)
    run_cli_expect_failure(ieit_copy, tmp_path / "out", "pytorch_model-00003-of-00003.bin", capsys)
    assert not Path("PWNED").exists()


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("moe_config.moe_num_experts", 4, "moe_config.moe_num_experts=4 in config.json, but model.layers.0.mlp.gate.query.weight has 8 rows"),
        ("moe_config.ffn_hidden_size", 64, "moe_config.ffn_hidden_size=64 in config.json, but model.layers.0.mlp.experts.0.w1.weight has 96 rows"),
        ("num_attention_heads", 3, "not divisible"),
        ("hidden_size", 32, "shape"),
        ("num_hidden_layers", 2, "model.layers.2"),
        ("num_hidden_layers", 4, "missing"),
        ("vocab_size", 2048, "model.embed_tokens.weight"),
    ],
)
def test_config_contradicting_tensors(ieit_copy, tmp_path, capsys, field, value, match):
    config = json.loads((ieit_copy / "config.json").read_text())
    target = config
    *parents, leaf = field.split(".")
    for p in parents:
        target = target[p]
    target[leaf] = value
    (ieit_copy / "config.json").write_text(json.dumps(config))
    run_cli_expect_failure(ieit_copy, tmp_path / "out", match, capsys)


def test_unknown_and_missing_keys(st_copy, tmp_path, capsys):
    file = st_copy / "model.safetensors"
    tensors = load_file(str(file))
    tensors["model.layers.0.mlp.shared_expert.weight"] = torch.zeros(2)
    save_file(tensors, str(file))
    run_cli_expect_failure(st_copy, tmp_path / "out", "model.layers.0.mlp.shared_expert.weight", capsys)
    del tensors["model.layers.0.mlp.shared_expert.weight"], tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, str(file))
    run_cli_expect_failure(st_copy, tmp_path / "out", "model.layers.1.self_attn.v_proj.weight", capsys)


def test_untied_lm_head_under_tied_config_is_an_error(st_copy, tmp_path, capsys):
    file = st_copy / "model.safetensors"
    tensors = load_file(str(file))
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1
    save_file(tensors, str(file))
    run_cli_expect_failure(st_copy, tmp_path / "out", "tie_word_embeddings", capsys)


def test_non_empty_destination_needs_overwrite(tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("user data")
    src = fixtures_dir() / "yuan_m32_tiny" / "ieit_hf_safetensors"
    assert cli(["convert", "ieit-hf", str(src), str(dst)]) != 0
    assert "--overwrite" in capsys.readouterr().err and (dst / "keep.txt").exists()
    # --overwrite replaces only a previous output of ours: the user's file is kept and named
    assert cli(["convert", "ieit-hf", str(src), str(dst), "--overwrite"]) != 0
    assert "keep.txt" in capsys.readouterr().err and (dst / "keep.txt").read_text() == "user data"
    (dst / "keep.txt").unlink()
    assert cli(["convert", "ieit-hf", str(src), str(dst)]) == 0
    assert cli(["convert", "ieit-hf", str(src), str(dst), "--overwrite"]) == 0  # a previous conversion: replaced
    assert (dst / "model.safetensors").is_file() and (dst / "conversion.json").is_file()


def test_key_table_rejects_unknown_keys():
    with pytest.raises(ConversionError, match="model.layers.0.foo"):
        IEIT_KEYS.target("model.layers.0.foo")


def test_tokenizer_goes_into_the_output_folder(tmp_path):
    from transformers import AutoTokenizer

    from yuan_hf.conversion.writers.tokenizer import build_demo_tokenizer
    from yuan_hf.conversion.writers import make_ieit_checkpoint

    src = make_ieit_checkpoint(tmp_path / "ieit")
    tok_dir = build_demo_tokenizer(tmp_path / "tok")
    assert cli(["convert", "ieit-hf", str(src), str(tmp_path / "out"), "--tokenizer", str(tok_dir), "--verify"]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["pad_token_id"] == tok.pad_token_id == tok.convert_tokens_to_ids("<pad>")
    assert config["eos_token_id"] == tok.eos_token_id


def test_tokenizer_of_another_model_is_refused(tmp_path, capsys):
    src = fixtures_dir() / "yuan_m32_tiny" / "ieit_hf"  # vocab 1024, <eod> 1001: not the real tokenizer's ids
    run_cli_expect_failure(src, tmp_path / "out", "eos id", capsys, "--tokenizer", str(fixtures_dir() / "tokenizer"))


def test_written_ieit_config_has_every_key_ieit_code_reads():
    """The writer's config.json has IEIT's released key set, so IEIT's remote code loads the folder too
    (it reads config.causal_mask, model_max_length, ... unconditionally; a missing key is an AttributeError there)."""
    from yuan_hf.conversion.writers import ieit_config_from_native

    reference = json.loads((fixtures_dir() / "yuan_m32_tiny" / "ieit_hf" / "config.json").read_text())
    bookkeeping = {"_from_model_config", "_name_or_path", "transformers_version"}  # written by save_pretrained
    config, _ = native_config_from_ieit(reference, rope_theta=10000.0)
    written = ieit_config_from_native(config)
    assert set(reference) - bookkeeping <= set(written)
    assert set(reference["moe_config"]) <= set(written["moe_config"])
    for key in set(reference) - bookkeeping - {"torch_dtype"}:
        assert written[key] == reference[key], key
