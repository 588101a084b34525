"""Hub conventions of converted folders (issue 13.6): generation defaults, card metadata, active parameters,
and the pad == eos warning."""

from __future__ import annotations

import json
import warnings

import pytest
from huggingface_hub import ModelCard

from yuan_hf import YuanM32Config
from yuan_hf.cli import main as cli
from yuan_hf.conversion.ieit_hf import convert_ieit_hf
from yuan_hf.conversion.native.builder import ConversionWarning
from yuan_hf.conversion.writers import make_ieit_checkpoint
from yuan_hf.hub import write_model_card
from yuan_hf.parameters import count_config_parameters
from yuan_hf.testing import tiny_config


def test_release_parameter_counts_on_meta():
    """The full-size release, counted on the meta device: 39.94B parameters, 3.70B active per token (IEIT's
    '3.7B active' counts the tied embedding once), 3.43B of them outside the embedding."""
    counts = count_config_parameters(YuanM32Config())
    assert counts.total == 39_942_842_368
    assert counts.active == 3_704_055_808
    assert counts.embeddings == 135040 * 2048  # tied: one matrix
    assert counts.describe() == "39.94B parameters, 3.70B active per token (3.43B without embeddings)"


@pytest.fixture(scope="module")
def ieit_source(tmp_path_factory):
    # as IEIT's release: pad == bos == eos == <eod>
    return make_ieit_checkpoint(tmp_path_factory.mktemp("ieit") / "ieit", config=tiny_config(pad_token_id=3))


def test_conversion_writes_release_generation_defaults_and_prints_active_parameters(ieit_source, tmp_path, capsys):
    with pytest.warns(ConversionWarning, match="pad_token_id equals eos"):
        assert cli(["convert", "ieit-hf", str(ieit_source), str(tmp_path / "native"), "--dtype", "float32"]) == 0
    assert "active per token" in capsys.readouterr().out
    generation = json.loads((tmp_path / "native" / "generation_config.json").read_text())
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    assert generation["do_sample"] is False and generation["max_new_tokens"] == 1024
    assert generation["eos_token_id"] == config["eos_token_id"]


def test_no_pad_warning_when_pad_differs(tmp_path):
    source = make_ieit_checkpoint(tmp_path / "ieit", config=tiny_config())  # pad 5, eos 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConversionWarning)
        convert_ieit_hf(source, tmp_path / "native", dtype="float32", progress=False)


def test_model_card_metadata_reads_back_with_huggingface_hub(ieit_source, tmp_path):
    with pytest.warns(ConversionWarning):
        convert_ieit_hf(ieit_source, tmp_path / "native", dtype="float32", progress=False)
    card = ModelCard.load(write_model_card(tmp_path / "native"))
    data = card.data.to_dict()
    assert data["base_model"] == "IEIT-Yuan/Yuan2-M32-hf"
    assert data["language"] == ["zh", "en"]
    assert data["license"] == "other" and data["license_name"] == "yuan2-license"
    assert data["pipeline_tag"] == "text-generation" and data["library_name"] == "transformers"
    assert {"yuan", "moe"} <= set(data["tags"])
    assert "active per token" in card.text


def test_active_parameters_count_each_layers_experts():
    """A pruned model (4 experts in layer 0, 2 in layer 1, top-2): layer 1 is fully active, layer 0 half."""
    from yuan_hf.parameters import count_parameters

    names = [("model.embed_tokens.weight", 100), ("model.layers.0.self_attn.q_proj.weight", 10)]
    names += [(f"model.layers.0.mlp.experts.{e}.up_proj.weight", 8) for e in range(4)]
    names += [(f"model.layers.1.mlp.experts.{e}.up_proj.weight", 8) for e in range(2)]
    counts = count_parameters(names, top_k=2)
    assert (counts.total, counts.active, counts.embeddings) == (158, 158 - 16, 100)
