"""The README's main job runs end to end on built-in data."""

from yuan_hf.cli import main as cli


def test_demo_main_job(tmp_path, capsys):
    assert cli(["demo", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "cached, left-padded generation == uncached forwards of each prompt alone: True" in out
    assert "same tokens as uncached forwards: True" in out
    assert out.strip().splitlines()[-1] == "demo: all checks passed"
    assert (tmp_path / "hub-ready" / "modeling_yuan_m32.py").is_file()
    assert (tmp_path / "hub-ready" / "tokenizer.json").is_file()
    assert (tmp_path / "megatron" / "latest_checkpointed_iteration.txt").is_file()
