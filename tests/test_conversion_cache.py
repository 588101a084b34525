"""The on-the-fly conversion cache behind ``from_pretrained(ieit_folder)``: locking, fingerprints, repair (issue 8).

The concurrency tests use real processes (spawned) on a tiny IEIT checkpoint the package's writer makes.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from yuan_hf import YuanM32ForCausalLM
from yuan_hf.conversion import cache
from yuan_hf.conversion.writers import make_ieit_checkpoint


def entries(root: Path) -> list[Path]:
    return sorted(p for p in (root / "converted").iterdir() if p.is_dir())


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "converted").iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def _load_in_child(src: str, cache_dir: str, barrier, results, slow: float) -> None:
    """A child process: count the conversions it runs (each made slow to widen the race), then load."""
    os.environ["YUAN_HF_CACHE"] = cache_dir
    from yuan_hf.conversion import cache as child_cache

    original, calls = child_cache.convert_ieit_hf, []

    def counting(*args, **kwargs):
        calls.append(1)
        time.sleep(slow)
        return original(*args, **kwargs)

    child_cache.convert_ieit_hf = counting
    barrier.wait()
    model = YuanM32ForCausalLM.from_pretrained(src)
    results.put((len(calls), float(model.model.norm.weight.float().sum())))


def test_two_processes_convert_once_and_both_load(tmp_path):
    src = make_ieit_checkpoint(tmp_path / "ieit")
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    children = [
        context.Process(target=_load_in_child, args=(str(src), str(tmp_path / "cache"), barrier, results, 2.0))
        for _ in range(2)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=240)
        assert child.exitcode == 0
    outcomes = [results.get(timeout=5) for _ in children]
    assert sum(calls for calls, _ in outcomes) == 1  # one converted, the other waited and loaded it
    assert outcomes[0][1] == outcomes[1][1]
    assert len(entries(tmp_path / "cache")) == 1 and leftovers(tmp_path / "cache") == []


def _convert_and_hang(src: str, cache_dir: str) -> None:
    os.environ["YUAN_HF_CACHE"] = cache_dir
    from yuan_hf.conversion.native import folder

    def hang(*args, **kwargs):
        time.sleep(600)

    folder.write_native_folder = hang  # killed while the temporary folder exists
    YuanM32ForCausalLM.from_pretrained(src)


def test_killed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    src = make_ieit_checkpoint(tmp_path / "ieit")
    context = multiprocessing.get_context("spawn")
    child = context.Process(target=_convert_and_hang, args=(str(src), str(tmp_path / "cache")))
    child.start()
    deadline = time.time() + 120
    while not (tmp_path / "cache" / "converted").is_dir() or not leftovers(tmp_path / "cache"):
        assert time.time() < deadline and child.is_alive(), "the child never started converting"
        time.sleep(0.1)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    monkeypatch.setenv("YUAN_HF_CACHE", str(tmp_path / "cache"))
    YuanM32ForCausalLM.from_pretrained(src)  # takes the freed lock, cleans up, converts
    assert len(entries(tmp_path / "cache")) == 1 and leftovers(tmp_path / "cache") == []


def test_damaged_entry_is_converted_again(tmp_path, monkeypatch):
    monkeypatch.setenv("YUAN_HF_CACHE", str(tmp_path / "cache"))
    src = make_ieit_checkpoint(tmp_path / "ieit")
    reference = {k: v.clone() for k, v in YuanM32ForCausalLM.from_pretrained(src).state_dict().items()}  # not mmapped
    (entry,) = entries(tmp_path / "cache")
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    reloaded = YuanM32ForCausalLM.from_pretrained(src).state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in reference.items())
    assert weights.stat().st_size > 0 and cache.entry_is_valid(entry, cache.source_fingerprint(src))


def test_changed_weights_with_same_size_and_mtime_are_reconverted(tmp_path, monkeypatch):
    monkeypatch.setenv("YUAN_HF_CACHE", str(tmp_path / "cache"))
    src = make_ieit_checkpoint(tmp_path / "ieit")
    YuanM32ForCausalLM.from_pretrained(src)
    file = src / "model.safetensors"
    stat = file.stat()
    tensors = load_file(str(file))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1
    save_file(tensors, str(file))
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file.stat().st_size == stat.st_size and file.stat().st_mtime_ns == stat.st_mtime_ns
    model = YuanM32ForCausalLM.from_pretrained(src)
    assert torch.equal(model.model.norm.weight, tensors["model.norm.weight"])
    assert len(entries(tmp_path / "cache")) == 2


def test_unwritable_cache_falls_back_with_a_warning(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("YUAN_HF_CACHE", str(blocker / "cache"))  # cannot be created, even by root
    monkeypatch.setattr(cache, "_fallback_root", lambda: tmp_path / "fallback" / "converted")
    src = make_ieit_checkpoint(tmp_path / "ieit")
    YuanM32ForCausalLM.from_pretrained(src)
    assert "is not writable" in caplog.text and "YUAN_HF_CACHE" in caplog.text
    assert len(entries(tmp_path / "fallback")) == 1


def test_no_writable_cache_at_all_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("YUAN_HF_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(cache, "_fallback_root", lambda: blocker / "fallback")
    src = make_ieit_checkpoint(tmp_path / "ieit")
    with pytest.raises(cache.ConversionError, match="neither the cache .* nor .* is writable. Set YUAN_HF_CACHE"):
        YuanM32ForCausalLM.from_pretrained(src)
