"""Converters never destroy data and refuse (or warn about) inputs that would give a wrong answer (issue 8).

Every test here failed on the code before the fix: it either lost data, produced a wrong folder silently,
or ended in a traceback instead of one clear error line.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from yuan_hf.cli import main as cli
from yuan_hf.conversion.common import ConversionError
from yuan_hf.conversion.ieit_hf import convert_ieit_hf
from yuan_hf.conversion.megatron import load_megatron_file
from yuan_hf.conversion.native.builder import ConversionWarning
from yuan_hf.conversion.writers import make_ieit_checkpoint, make_megatron_checkpoint

TOKEN_IDS = "bos=3,eos=3,pad=5,sep=4"  # tiny_config's ids


@pytest.fixture
def ieit(tmp_path) -> Path:
    return make_ieit_checkpoint(tmp_path / "ieit")


@pytest.fixture
def megatron(tmp_path) -> Path:
    return make_megatron_checkpoint(tmp_path / "megatron")


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fails(argv: list[str], capsys, *needles: str) -> str:
    assert cli(argv) != 0
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    return err


# ------------------------------------------------------------------------------------------ data loss


@pytest.mark.parametrize("kind", ["ieit-hf", "megatron"])
@pytest.mark.parametrize("where", ["same", "parent", "dot", "inside"])
def test_destination_overlapping_the_source_is_refused(kind, where, ieit, megatron, capsys, monkeypatch):
    src = ieit if kind == "ieit-hf" else megatron
    before = tree(src)
    dst = {"same": src, "parent": src.parent, "dot": Path("."), "inside": src / "native"}[where]
    monkeypatch.chdir(src.parent)
    extra = ["--token-ids", TOKEN_IDS] if kind == "megatron" else []
    fails(["convert", kind, str(src), str(dst), "--overwrite", *extra], capsys, "the source", "destroy")
    assert tree(src) == before


def test_symlinked_destination_is_resolved(ieit, tmp_path, capsys):
    (tmp_path / "alias").symlink_to(ieit)
    fails(["convert", "ieit-hf", str(ieit), str(tmp_path / "alias"), "--overwrite"], capsys, "is the source")
    assert (ieit / "model.safetensors").is_file()


def test_output_modes_follow_the_umask(ieit, tmp_path):
    old = os.umask(0o022)
    try:
        dst = convert_ieit_hf(ieit, tmp_path / "out", progress=False).destination
    finally:
        os.umask(old)
    assert dst.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in dst.iterdir()} == dict.fromkeys(
        (p.name for p in dst.iterdir()), 0o644
    )


# ------------------------------------------------------------------------------------------ IEIT-HF inputs


def reshard(src: Path, groups: list[list[str]]) -> dict[str, torch.Tensor]:
    """Split ``src``'s model.safetensors into shards holding the given key groups, with an index."""
    tensors = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    weight_map = {}
    for i, keys in enumerate(groups):
        name = f"model-{i:05d}.safetensors"
        save_file({k: tensors[k] for k in keys}, str(src / name))
        weight_map |= {k: name for k in keys}
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tensors


def test_tensor_in_two_shards(ieit, tmp_path, capsys):
    keys = sorted(load_file(str(ieit / "model.safetensors")))
    shared = "model.norm.weight"
    rest = [k for k in keys if k != shared]
    tensors = reshard(ieit, [rest[: len(rest) // 2] + [shared], rest[len(rest) // 2 :]])
    # the second shard also holds model.norm.weight (not in the index for it): identical copies are accepted
    second = load_file(str(ieit / "model-00001.safetensors"))
    save_file(second | {shared: tensors[shared].clone()}, str(ieit / "model-00001.safetensors"))
    assert cli(["convert", "ieit-hf", str(ieit), str(tmp_path / "ok")]) == 0
    save_file(second | {shared: tensors[shared] + 1}, str(ieit / "model-00001.safetensors"))
    fails(["convert", "ieit-hf", str(ieit), str(tmp_path / "bad")], capsys,
          "model.norm.weight is in both", "model-00000.safetensors", "model-00001.safetensors")  # fmt: skip
    assert not (tmp_path / "bad").exists()


def test_index_naming_files_outside_the_folder(ieit, tmp_path, capsys):
    keys = sorted(load_file(str(ieit / "model.safetensors")))
    reshard(ieit, [keys])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(ieit / "model-00000.safetensors", elsewhere / "model-00000.safetensors")
    index = {"weight_map": dict.fromkeys(keys, "../elsewhere/model-00000.safetensors")}
    (ieit / "model.safetensors.index.json").write_text(json.dumps(index))
    fails(["convert", "ieit-hf", str(ieit), str(tmp_path / "out")], capsys, "../elsewhere", "outside")


def test_safetensors_header_lying_about_the_dtype(ieit, tmp_path, capsys):
    """BF16 bytes under an F16 header have the right length; only the dtype config.json declares tells."""
    file = ieit / "model.safetensors"
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header["model.norm.weight"]["dtype"] = "F16"
    compact = lambda h: json.dumps(h, separators=(",", ":")).encode().ljust(length)  # noqa: E731 (offsets stay valid)
    file.write_bytes(raw[:8] + compact(header) + raw[8 + length :])
    fails(["convert", "ieit-hf", str(ieit), str(tmp_path / "out")], capsys,
          "model.norm.weight is stored as torch.float16", "torch_dtype torch.bfloat16")  # fmt: skip
    header["model.norm.weight"]["dtype"] = "I16"
    file.write_bytes(raw[:8] + compact(header) + raw[8 + length :])
    fails(["convert", "ieit-hf", str(ieit), str(tmp_path / "out")], capsys, "torch.int16", "floating point")


def test_non_finite_weights_warn_and_verify_leaves_nothing(ieit, tmp_path, capsys):
    tensors = load_file(str(ieit / "model.safetensors"))
    tensors["model.layers.1.mlp.experts.3.w2.weight"][0, 0] = float("nan")
    save_file(tensors, str(ieit / "model.safetensors"))
    with pytest.warns(ConversionWarning, match=r"NaN or Inf: model.layers.1.mlp.experts.3.down_proj.weight"):
        summary = convert_ieit_hf(ieit, tmp_path / "plain", progress=False)
    assert any("NaN" in note for note in summary.notes)
    with pytest.warns(ConversionWarning):
        fails(["convert", "ieit-hf", str(ieit), str(tmp_path / "checked"), "--verify"], capsys, "verification failed")
    assert not (tmp_path / "checked").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".checked")]


def test_float16_overflow_warns(ieit, tmp_path):
    tensors = load_file(str(ieit / "model.safetensors"))
    tensors["model.norm.weight"][0] = 1e6  # fine in bfloat16, Inf in float16
    save_file(tensors, str(ieit / "model.safetensors"))
    with pytest.warns(ConversionWarning, match=r"beyond torch.float16.*model.norm.weight"):
        convert_ieit_hf(ieit, tmp_path / "out", dtype="float16", progress=False)


def test_legacy_torch_save_bin(ieit, tmp_path, capsys):
    tensors = load_file(str(ieit / "model.safetensors"))
    (ieit / "model.safetensors").unlink()
    torch.save(tensors, ieit / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    fails(["convert", "ieit-hf", str(ieit), str(tmp_path / "out")], capsys,
          "legacy (pre-1.6, non-zip) torch.save file", "Re-save it")  # fmt: skip


# ------------------------------------------------------------------------------------------ Megatron inputs


class _Huge:
    """Pickles as numpy's ``_reconstruct(ndarray, (2**40,), b"b")``: a 1 TiB allocation when unpickled."""

    def __reduce__(self):
        import numpy as np

        reconstruct = np.ndarray.__reduce__(np.empty(0))[0]
        return reconstruct, (np.ndarray, (2**40,), b"b")


def test_megatron_pickle_declaring_a_huge_array(tmp_path):
    path = tmp_path / "model_optim_rng.pt"
    torch.save({"args": argparse.Namespace(), "rng_state": [{"np_rng_state": _Huge()}]}, path)
    with pytest.raises(ConversionError, match=f"{path}.*1099511627776 elements.*refusing to allocate"):
        load_megatron_file(path)


def test_megatron_pickle_nesting_deeply(tmp_path):
    path = tmp_path / "model_optim_rng.pt"
    nested: list = []
    for _ in range(400):  # deep enough to exhaust the recursive walks of the old reader
        nested = [nested]
    torch.save({"args": argparse.Namespace(), "model": {"x": nested}}, path)
    with pytest.raises(ConversionError, match=f"{path}: containers nest more than 64 levels"):
        load_megatron_file(path)


def test_megatron_legacy_file(tmp_path):
    path = tmp_path / "model_optim_rng.pt"
    torch.save({"model": {"w": torch.ones(2)}}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(ConversionError, match="legacy \\(pre-1.6, non-zip\\) torch.save file"):
        load_megatron_file(path)


def test_partial_token_ids_name_what_is_missing(megatron, tmp_path, capsys):
    fails(["convert", "megatron", str(megatron), str(tmp_path / "out"), "--token-ids", "eos=3,sep=4"], capsys,
          "--token-ids lacks bos, pad", "--tokenizer")  # fmt: skip
    fails(["convert", "megatron", str(megatron), str(tmp_path / "out"), "--token-ids", "bos=3,eos=3,pad=5,sep=999"],
          capsys, "sep=999 is outside the model's vocabulary")  # fmt: skip
    fails(["convert", "megatron", str(megatron), str(tmp_path / "out")], capsys, "--tokenizer", "--token-ids")
    assert not (tmp_path / "out").exists()


def test_bad_max_shard_size_is_a_usage_error(ieit, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["convert", "ieit-hf", str(ieit), str(tmp_path / "out"), "--max-shard-size", "lots"])
    assert exit_info.value.code == 2
    assert "max shard size 'lots' is not a size" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ provenance


def test_no_local_paths_in_provenance_or_card(ieit, megatron, tmp_path):
    from yuan_hf.hub import render_model_card

    for kind, src in (("ieit-hf", ieit), ("megatron", megatron)):
        dst = tmp_path / f"native-{kind}"
        extra = ["--token-ids", TOKEN_IDS] if kind == "megatron" else []
        assert cli(["convert", kind, str(src), str(dst), *extra]) == 0
        provenance = json.loads((dst / "conversion.json").read_text())
        assert provenance["source"] == src.name
        assert str(tmp_path) not in (dst / "conversion.json").read_text()
        assert str(tmp_path) not in render_model_card(dst, repo_id="someone/model")


def test_megatron_pickle_global_planted_in_a_zip_is_still_refused(tmp_path):
    """Guard against the nesting walk or the bounded numpy hook loosening the allow-list."""
    path = tmp_path / "model_optim_rng.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"x": os.getcwd.__self__.getcwd}, protocol=2))
    with pytest.raises(ConversionError, match="refusing to unpickle the global"):
        load_megatron_file(path)
