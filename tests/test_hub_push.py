"""`yuan-hf push`: the upload allow-list, links, weight completeness, the user's card, failures, CLI polish.

The Hub is never reached: uploads go to a recording stand-in for ``HfApi`` (which files, which bytes),
and the no-network case lets a real ``HfApi`` call fail against a closed local port.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file

from yuan_hf import YuanM32ForCausalLM
from yuan_hf.cli import build_parser
from yuan_hf.cli import main as cli
from yuan_hf.hub import HubError, plan_push, push_to_hub, set_card_license
from yuan_hf.testing import tiny_config

TOKENIZER = {"tokenizer.json": "{}", "tokenizer_config.json": '{"model_max_length": 4096}', "chat_template.jinja": "x"}
EXPERT = "model.layers.1.mlp.experts.3.down_proj.weight"
CLOSED_PORT = "http://127.0.0.1:9"  # the discard port: nothing listens, connecting fails at once


class RecordingHubApi:
    """Stands in for huggingface_hub.HfApi: records the repo created and every file's bytes committed."""

    def __init__(self):
        self.repos: list[dict] = []
        self.sent: dict[str, bytes] = {}

    def create_repo(self, **kwargs):
        self.repos.append(kwargs)

    def create_commit(self, *, repo_id, operations, **kwargs):
        for op in operations:
            source = op.path_or_fileobj
            self.sent[op.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()
        return type("CommitInfo", (), {"commit_url": f"https://hf.co/{repo_id}/commit/abc"})()


def snapshot(folder: Path) -> dict[str, bytes]:
    files = (p for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink())
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "model"
    YuanM32ForCausalLM(tiny_config()).save_pretrained(folder)
    for name, text in TOKENIZER.items():
        (folder / name).write_text(text)
    (folder / "conversion.json").write_text(json.dumps({"source_format": "ieit_hf"}))
    return folder


@pytest.fixture
def model_dir(saved_model, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(saved_model, folder)
    return folder


def add_clutter(folder: Path, outside: Path) -> None:
    """What a working folder accumulates: secrets, data, training state, a stray file and links out."""
    (folder / "credentials.json").write_text('{"token": "hf_secret"}')
    (folder / "notes").mkdir()
    (folder / "notes" / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----")
    (folder / "secrets.txt").write_text("password=hunter2")
    (folder / "train.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    (folder / "checkpoint-100").mkdir()
    torch.save({"state": torch.zeros(3)}, folder / "checkpoint-100" / "optimizer.pt")
    (folder / "training_args.bin").write_bytes(b"pickle with a hub_token")
    (folder / "dataset.tar").write_bytes(b"\0" * 3_000_000)
    (folder / "helper.py").write_text("print('not remote code')")
    (folder / "old-model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    outside.write_text("root:x:0:0:root:/root:/bin/bash")
    (folder / "passwd").symlink_to(outside)
    (folder / "etc_passwd").symlink_to("/etc/passwd")
    (folder / "loop").symlink_to(folder / "loop")


# ----------------------------------------------------------------------------------------------
# What is uploaded


def test_push_uploads_only_the_allow_list(model_dir, tmp_path):
    code = {p.name for p in model_dir.glob("*.py")}  # what save_pretrained copied for trust_remote_code
    assert {"configuration_yuan_m32.py", "modeling_yuan_m32.py"} <= code
    add_clutter(model_dir, tmp_path / "outside_passwd")
    before = snapshot(model_dir)
    api = RecordingHubApi()
    url = push_to_hub(model_dir, "someone/yuan-tiny", private=True, api=api)
    assert url == "https://hf.co/someone/yuan-tiny/commit/abc"
    assert api.repos == [{"repo_id": "someone/yuan-tiny", "repo_type": "model", "private": True, "exist_ok": True}]
    expected = {"config.json", "generation_config.json", "model.safetensors", "conversion.json", "README.md"}
    assert set(api.sent) == expected | code | set(TOKENIZER)
    for name in set(api.sent) - {"README.md"}:
        assert api.sent[name] == (model_dir / name).read_bytes(), name
    card = api.sent["README.md"].decode()
    assert "someone/yuan-tiny" in card and "license: other" in card and "ieit_hf" in card
    assert not any(b"root:x:0:0" in data or b"hunter2" in data for data in api.sent.values())
    assert snapshot(model_dir) == before and not (model_dir / "README.md").exists()  # the folder is not touched


def test_plan_lists_sizes_and_why_the_rest_stays(model_dir, tmp_path):
    add_clutter(model_dir, tmp_path / "outside_passwd")
    text = plan_push(model_dir, repo_id="someone/x").describe()
    size = (model_dir / "model.safetensors").stat().st_size
    assert f"{size / 1e3:.1f} kB" in text or f"{size / 1e6:.1f} MB" in text
    shown_all = ("credentials.json (not needed", "notes/ (folder)", "checkpoint-100/ (folder)", "passwd (link to",
                 "training_args.bin (pickle)", "outside the folder", "old-model.safetensors (not", "generated card")
    for shown in shown_all:
        assert shown in text, shown


@pytest.mark.parametrize("name", ["tokenizer.json", "README.md", "model.safetensors"])
def test_links_out_of_the_folder_are_refused(model_dir, tmp_path, name):
    outside = tmp_path / "outside_file"
    outside.write_bytes((model_dir / name).read_bytes() if (model_dir / name).exists() else b"# card")
    (model_dir / name).unlink(missing_ok=True)
    (model_dir / name).symlink_to(outside)
    with pytest.raises(HubError, match=f"{name} leads outside .*never follows links out"):
        push_to_hub(model_dir, "someone/x", api=RecordingHubApi())


def test_links_inside_the_folder_are_followed(model_dir):
    (model_dir / "tokenizer-files").mkdir()
    (model_dir / "tokenizer.json").rename(model_dir / "tokenizer-files" / "tokenizer.json")
    (model_dir / "tokenizer.json").symlink_to(Path("tokenizer-files") / "tokenizer.json")
    api = RecordingHubApi()
    push_to_hub(model_dir, "someone/x", api=api)
    assert api.sent["tokenizer.json"] == TOKENIZER["tokenizer.json"].encode()


# ----------------------------------------------------------------------------------------------
# Weights must be the model config.json describes


def rewrite_weights(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop(EXPERT), f"1 missing: {EXPERT}"),
        (lambda t: t.update({"model.layers.0.mlp.experts.99.up_proj.weight": torch.zeros(2)}), "1 unexpected: model"),
        (lambda t: t.update({EXPERT: t[EXPERT][:, :-1].clone()}), rf"1 wrong shape: {EXPERT} \[\d+, \d+\] \(config"),
    ],
    ids=["missing-expert", "extra", "wrong-shape"],
)
def test_weights_must_cover_the_config(model_dir, edit, message):
    rewrite_weights(model_dir, edit)
    with pytest.raises(HubError, match=message):
        plan_push(model_dir)


def test_missing_expert_is_one_cli_error(model_dir, capsys):
    rewrite_weights(model_dir, lambda t: t.pop(EXPERT))
    assert cli(["push", str(model_dir), "someone/x", "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and EXPERT in err and "randomly initialised" in err and "Traceback" not in err


def test_untied_lm_head_is_required(tmp_path):
    config = tiny_config()
    config.tie_word_embeddings = False
    YuanM32ForCausalLM(config).save_pretrained(tmp_path / "m")
    plan_push(tmp_path / "m")  # complete
    rewrite_weights(tmp_path / "m", lambda t: t.pop("lm_head.weight"))
    with pytest.raises(HubError, match="1 missing: lm_head.weight"):
        plan_push(tmp_path / "m")


def test_index_must_name_files_inside_the_folder(tmp_path):
    folder = tmp_path / "sharded"
    YuanM32ForCausalLM(tiny_config()).save_pretrained(folder, max_shard_size="200KB")
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    assert plan_push(folder).names.count(shard) == 1  # sharded folders push
    shutil.copy(folder / shard, tmp_path / shard)
    for outside in (f"../{shard}", str(tmp_path / shard)):
        index["weight_map"] = {k: outside if v == shard else v for k, v in index["weight_map"].items()}
        index_file.write_text(json.dumps(index))
        with pytest.raises(HubError, match="not a file of"):
            plan_push(folder)
        index = json.loads(index_file.read_text())
        index["weight_map"] = {k: shard if v == outside else v for k, v in index["weight_map"].items()}


def test_invalid_config_is_one_cli_error(model_dir, capsys):
    (model_dir / "config.json").write_text('{"model_type": "yuan_m32",')
    assert cli(["push", str(model_dir), "someone/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "config.json is not valid JSON" in err


# ----------------------------------------------------------------------------------------------
# The user's model card


USER_CARD = "---\nlanguage: [zh, en]\nlicense: mit  # chosen by my lab\ntags:\n- yuan\n---\n\n# My tune\n\nNotes.\n"


def test_license_edits_only_the_front_matter_of_the_users_card(model_dir):
    (model_dir / "README.md").write_text(USER_CARD)
    api = RecordingHubApi()
    push_to_hub(model_dir, "someone/x", license="apache-2.0", api=api)
    expected = USER_CARD.replace("license: mit  # chosen by my lab", "license: apache-2.0")
    assert api.sent["README.md"].decode() == expected
    assert (model_dir / "README.md").read_text() == USER_CARD  # no clobbering, no backup needed
    api = RecordingHubApi()
    push_to_hub(model_dir, "someone/x", api=api)
    assert api.sent["README.md"].decode() == USER_CARD  # without --license the card goes as it is


def test_set_card_license_cases():
    assert set_card_license("# Notes\n", "mit") == "---\nlicense: mit\n---\n\n# Notes\n"
    assert set_card_license("---\ntags: [a]\n---\ntext", "mit") == "---\nlicense: mit\ntags: [a]\n---\ntext"
    with pytest.raises(HubError, match="not a one-line value"):
        set_card_license("---\nlicense:\n- mit\n- apache-2.0\n---\n", "mit")


# ----------------------------------------------------------------------------------------------
# Failures leave the folder as it was


def test_failed_push_is_one_line_and_leaves_the_folder_unchanged(model_dir, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", CLOSED_PORT)  # a real HfApi, no network
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    before = snapshot(model_dir)
    assert cli(["push", str(model_dir), "someone/x", "--license", "apache-2.0"]) == 2
    out, err = capsys.readouterr()
    assert "model.safetensors" in out  # the list came first
    assert err.startswith("error: upload of") and err.count("\n") == 1 and "was not changed" in err
    assert "Traceback" not in err
    assert snapshot(model_dir) == before


def test_failed_upload_raises_hub_error_from_python(model_dir):
    api = huggingface_hub.HfApi(endpoint=CLOSED_PORT, token="hf_not_a_real_token")
    with pytest.raises(HubError, match="someone/x failed .*Check the network"):
        push_to_hub(model_dir, "someone/x", api=api)
    assert not (model_dir / "README.md").exists()


def test_dry_run_uploads_nothing(model_dir, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("--dry-run must not call the Hub")

    for method in ("create_repo", "create_commit", "upload_folder"):
        monkeypatch.setattr(huggingface_hub.HfApi, method, refuse)
    assert cli(["push", str(model_dir), "someone/x", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "model.safetensors" in out and "dry run: nothing was uploaded" in out


def test_cli_prints_the_list_before_uploading(model_dir, monkeypatch, capsys):
    api = RecordingHubApi()
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, **kw: api.create_repo(**kw))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", lambda self, **kw: api.create_commit(**kw))
    assert cli(["push", str(model_dir), "someone/x"]) == 0
    out = capsys.readouterr().out
    assert out.index("model.safetensors") < out.index("uploading") < out.index("https://hf.co/someone/x/commit/abc")
    assert "model.safetensors" in api.sent


# ----------------------------------------------------------------------------------------------
# Adapter folders (what `yuan-hf finetune` writes for LoRA / QLoRA)


@pytest.fixture
def adapter_dir(tmp_path) -> Path:
    from peft import LoraConfig, get_peft_model

    folder = tmp_path / "adapter"
    model = get_peft_model(YuanM32ForCausalLM(tiny_config()), LoraConfig(target_modules=["q_proj"], r=4))
    model.save_pretrained(folder)
    for name, text in TOKENIZER.items():
        (folder / name).write_text(text)
    (folder / "finetune_metrics.json").write_text('{"model": "/home/me/models/yuan"}')
    (folder / "training_args.bin").write_bytes(b"pickle")
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "optimizer.pt").write_bytes(b"state")
    return folder


def test_adapter_folder_pushes_adapter_tokenizer_and_card(adapter_dir):
    api = RecordingHubApi()
    plan = plan_push(adapter_dir)
    assert plan.kind == "adapter" and any("base_model_name_or_path" in note for note in plan.notes)
    push_to_hub(adapter_dir, "someone/yuan-lora", api=api)
    assert set(api.sent) == {"adapter_config.json", "adapter_model.safetensors", "README.md"} | set(TOKENIZER)
    assert api.sent["README.md"] == (adapter_dir / "README.md").read_bytes()  # PEFT's own card, as it is


def test_adapter_without_safetensors_is_refused(adapter_dir):
    (adapter_dir / "adapter_model.safetensors").rename(adapter_dir / "adapter_model.bin")
    with pytest.raises(HubError, match="found adapter_model.bin.*safe_serialization=True"):
        plan_push(adapter_dir)


def test_adapter_and_model_in_one_folder_is_refused(model_dir, adapter_dir):
    shutil.copy(adapter_dir / "adapter_config.json", model_dir)
    with pytest.raises(HubError, match="both a full model and a PEFT adapter"):
        plan_push(model_dir)


# ----------------------------------------------------------------------------------------------
# CLI polish


def test_version_names_the_package_and_its_libraries(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("yuan-hf 0.1.0\n") and "transformers 5." in out and "torch " in out


def all_parsers(parser):
    yield parser
    for action in parser._actions:
        for sub in (getattr(action, "choices", None) or {}).values() if hasattr(action, "_name_parser_map") else ():
            yield from all_parsers(sub)


def test_every_option_has_help_and_shows_its_default(capsys):
    parsers = list(all_parsers(build_parser()))
    assert len(parsers) >= 7  # yuan-hf, convert, its three kinds, push, finetune, demo
    undocumented = [
        f"{parser.prog} {action.dest}"
        for parser in parsers
        for action in parser._actions
        if not action.help and not hasattr(action, "_name_parser_map")
    ]
    assert undocumented == []
    with pytest.raises(SystemExit):
        cli(["convert", "ieit-hf", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: bfloat16)" in out and "(default: 5GB)" in out and "(default: False)" not in out
