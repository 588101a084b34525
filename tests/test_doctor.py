"""`yuan-hf doctor` and the support policy: a working stack passes, a broken one fails by name, no traceback."""

import logging

import pytest
import transformers

import yuan_hf.modeling.modeling_yuan_m32 as modeling
from yuan_hf import support
from yuan_hf.cli import main as cli


@pytest.mark.compat
def test_doctor_passes_on_this_stack(capsys):
    assert cli(["doctor"]) == 0
    out = capsys.readouterr().out
    assert f"transformers {transformers.__version__}" in out
    for name in ("cached generation", "padded batch", "router fp32 under bf16", "remote-code folder"):
        assert f"ok  {name}" in out, out
    assert out.strip().splitlines()[-1].startswith("yuan-hf doctor: OK")


def test_doctor_names_a_dropped_cache(monkeypatch, capsys):
    # the transformers 5.24 failure mode: the forward loses the cache it was given
    monkeypatch.setattr(modeling, "resolve_cache", lambda cache, past_key_values: None)
    monkeypatch.setattr("yuan_hf.doctor.check_remote_code", lambda workdir: "not run here")
    assert cli(["doctor"]) == 1
    captured = capsys.readouterr()
    verdict = captured.out.strip().splitlines()[-1]
    assert verdict.startswith("yuan-hf doctor: FAILED: cached generation: AssertionError: generate with a dynamic")
    assert "What to do:" in verdict and "Traceback" not in captured.out + captured.err


def test_support_policy_names_the_range_and_the_doctor(caplog):
    assert support.transformers_support(support.TRANSFORMERS_NEWEST_TESTED + ".3") is None
    assert support.transformers_support(support.TRANSFORMERS_FLOOR + ".0") is None
    newer = support.transformers_support("5.99.0")
    assert "newer than the newest release" in newer and "yuan-hf doctor" in newer
    assert "older than yuan-hf supports" in support.transformers_support("5.16.1")
    # scripts/test.sh installs the newest release on PyPI: a new one fails here until the suite has passed on it
    # and TRANSFORMERS_NEWEST_TESTED names it (the warning users see must stay true)
    assert support.transformers_support(transformers.__version__) is None, (
        f"transformers {transformers.__version__} is outside yuan_hf.support's tested range: if the suite passes on "
        "it, raise TRANSFORMERS_NEWEST_TESTED in src/yuan_hf/support.py"
    )
    with caplog.at_level(logging.WARNING, logger="yuan_hf"):
        support.warn_if_untested()
        support.warn_if_untested("5.99.0")
    assert len(caplog.records) == 1 and "yuan-hf doctor" in caplog.records[0].getMessage()
