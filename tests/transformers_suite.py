"""transformers' own common model tests, taken from the source distribution of the *installed* release.

`load()` returns the test mixins an in-tree model's test file would import (`ModelTesterMixin`,
`GenerationTesterMixin`, `PipelineTesterMixin`) plus helpers (`ids_tensor`, `random_attention_mask`), from:

1. `$YUAN_HF_TRANSFORMERS_TESTS`, if set: the `tests/` folder of a transformers source tree at the installed
   version (e.g. a clone of its git tag). It has everything.
2. Otherwise the PyPI sdist `transformers-<version>.tar.gz`, fetched once with `pip download` into
   `$YUAN_HF_TEST_CACHE` (default `~/.cache/yuan_hf_tests`)/`transformers-<version>/` and extracted atomically
   (a temporary folder renamed into place), then reused.

What the sdist lacks (checked for 5.17 and 5.25: it ships only the top-level `tests/test_*.py`):
`tests/generation/test_utils.py` (`GenerationTesterMixin`), `tests/exporters/test_export.py`
(`ExportTesterMixin`, a base of `ModelTesterMixin`), `tests/causal_lm_tester.py`, `tests/pipelines/` and
`tests/utils/tiny_model_summary.json`. So, from the sdist alone:

- `ExportTesterMixin` becomes an empty class (its torch.export tests do not run), so `test_modeling_common`
  imports; `GenerationTesterMixin` becomes `MissingGenerationTesterMixin`, whose one test skips and says how to
  get the real one (source 1).
- `PipelineTesterMixin` is imported with `TRANSFORMERS_TINY_MODEL_PATH` pointing at an empty tiny-model summary
  (transformers' own knob for local tiny models). For a model outside transformers this changes nothing: its
  pipeline tests only run models listed in that summary (tiny Hub checkpoints of in-tree models) and skip the
  rest, Yuan included, with either file.

If the sdist cannot be fetched (no index, no pip), the tests that use `load()` are skipped with the reason, and
fail when `CI` is set: CI must run them.
"""

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import pytest
import transformers

VERSION = transformers.__version__
PACKAGE = "transformers_upstream_tests"  # the sdist's tests/ is imported as this package (ours is not a package)


class SuiteUnavailable(RuntimeError):
    """The common tests of the installed transformers could not be obtained; the message says why."""


def cache_dir() -> Path:
    root = Path(os.environ.get("YUAN_HF_TEST_CACHE") or Path.home() / ".cache" / "yuan_hf_tests")
    return root / f"transformers-{VERSION}"


def fetch_sdist_tests() -> Path:
    """`tests/` of the sdist of the installed transformers, downloaded and extracted once (atomic rename)."""
    target = cache_dir()
    tests = target / "tests"
    if (tests / "test_modeling_common.py").is_file():
        return tests
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
            "-q", f"transformers=={VERSION}", "-d", str(work / "download"),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        archives = sorted((work / "download").glob(f"transformers-{VERSION}.tar.gz"))
        if result.returncode or not archives:
            raise SuiteUnavailable(
                f"could not download the sdist of transformers {VERSION} ({' '.join(command[2:])} exited "
                f"{result.returncode}): {(result.stderr or result.stdout).strip()[-500:]}"
            )
        with tarfile.open(archives[0]) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(f"transformers-{VERSION}/")]
            try:
                archive.extractall(work / "extract", members=members, filter="data")
            except TypeError:  # Python < 3.10.12 / 3.11.4: no extraction filters (members are prefix-checked)
                archive.extractall(work / "extract", members=members)
        extracted = work / "extract" / f"transformers-{VERSION}"
        if not (extracted / "tests" / "test_modeling_common.py").is_file():
            raise SuiteUnavailable(f"the sdist of transformers {VERSION} has no tests/test_modeling_common.py")
        try:
            extracted.rename(target)  # atomic: a concurrent run either sees nothing or the whole tree
        except OSError:
            if not (tests / "test_modeling_common.py").is_file():  # lost a race to a complete copy: use it
                raise
    except (OSError, subprocess.SubprocessError, tarfile.TarError) as err:
        raise SuiteUnavailable(f"could not fetch the sdist of transformers {VERSION}: {err}") from err
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tests


def tests_root() -> Path:
    override = os.environ.get("YUAN_HF_TRANSFORMERS_TESTS")
    if override:
        root = Path(override)
        if not (root / "test_modeling_common.py").is_file():
            raise SuiteUnavailable(f"YUAN_HF_TRANSFORMERS_TESTS={override} has no test_modeling_common.py")
        return root
    return fetch_sdist_tests()


class MissingGenerationTesterMixin:
    """Stands in for transformers' `GenerationTesterMixin` when its file is not available (the sdist lacks it)."""

    def test_generation_tester_mixin_available(self):
        pytest.skip(
            f"tests/generation/test_utils.py is not in the sdist of transformers {VERSION}: set "
            "YUAN_HF_TRANSFORMERS_TESTS to the tests/ folder of a transformers checkout at that version to run "
            "GenerationTesterMixin"
        )


class MissingPipelineTesterMixin:
    """Stands in for `PipelineTesterMixin` where its module imports files the sdist lacks (5.17 imports the
    `tests/pipelines/` test classes eagerly; later releases resolve them lazily)."""

    missing = ""

    def test_pipeline_tester_mixin_available(self):
        pytest.skip(
            f"test_pipeline_mixin.py of transformers {VERSION} needs {self.missing}, which its sdist lacks: set "
            "YUAN_HF_TRANSFORMERS_TESTS to the tests/ folder of a transformers checkout at that version to run "
            "PipelineTesterMixin (test_text_generation_pipeline covers Yuan's text-generation pipeline meanwhile)"
        )


def _package(name: str, path: Path | None) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = [str(path)] if path is not None else []
    module.__package__ = name
    sys.modules[name] = module
    return module


def _import_pipeline_mixin(root: Path) -> types.ModuleType:
    name = f"{PACKAGE}.test_pipeline_mixin"
    if name in sys.modules:
        return sys.modules[name]
    saved = {key: os.environ.get(key) for key in ("TRANSFORMERS_TINY_MODEL_PATH",)}
    installed = sys.modules["transformers"]
    summary_root = None
    if not (root / "utils" / "tiny_model_summary.json").is_file():
        summary_root = Path(tempfile.mkdtemp(prefix="yuan-tiny-models-"))
        (summary_root / "reports").mkdir()
        (summary_root / "reports" / "tiny_model_summary.json").write_text(json.dumps({}))
        os.environ["TRANSFORMERS_TINY_MODEL_PATH"] = str(summary_root)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith(PACKAGE + "."):
            raise
        sys.modules.pop(name, None)
        missing = err.name.removeprefix(PACKAGE + ".").replace(".", "/")
        stand_in = type("PipelineTesterMixin", (MissingPipelineTesterMixin,), {"missing": f"tests/{missing}"})
        return types.SimpleNamespace(PipelineTesterMixin=stand_in)
    finally:
        # the module imports the transformers source next to tests/ as `transformers`; keep the installed one
        sys.modules["transformers"] = installed
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if summary_root is not None:
            shutil.rmtree(summary_root, ignore_errors=True)


def _load(root: Path) -> types.SimpleNamespace:
    if importlib.util.find_spec("parameterized") is None:
        raise SuiteUnavailable("transformers' common tests need `parameterized` (pip install -e '.[dev]')")
    if PACKAGE not in sys.modules:
        _package(PACKAGE, root)
        stubs = {}
        if not (root / "exporters" / "test_export.py").is_file():
            stubs["exporters.test_export"] = {"ExportTesterMixin": type("ExportTesterMixin", (), {})}
        if not (root / "generation" / "test_utils.py").is_file():
            stubs["generation.test_utils"] = {"GenerationTesterMixin": MissingGenerationTesterMixin}
        for dotted, attributes in stubs.items():
            parent, child = dotted.split(".")
            _package(f"{PACKAGE}.{parent}", None)
            module = types.ModuleType(f"{PACKAGE}.{dotted}")
            module.__dict__.update(attributes)
            sys.modules[module.__name__] = module
    try:
        common = importlib.import_module(f"{PACKAGE}.test_modeling_common")
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith(PACKAGE + "."):
            raise
        raise SuiteUnavailable(
            f"test_modeling_common.py of transformers {VERSION} imports {err.name.removeprefix(PACKAGE + '.')}, which "
            "is not in its sdist: set YUAN_HF_TRANSFORMERS_TESTS to the tests/ folder of a transformers checkout"
        ) from err
    generation = importlib.import_module(f"{PACKAGE}.generation.test_utils")
    pipeline = _import_pipeline_mixin(root)
    return types.SimpleNamespace(
        root=root,
        ModelTesterMixin=common.ModelTesterMixin,
        GenerationTesterMixin=generation.GenerationTesterMixin,
        PipelineTesterMixin=pipeline.PipelineTesterMixin,
        ids_tensor=common.ids_tensor,
        random_attention_mask=common.random_attention_mask,
        has_generation_tests=generation.GenerationTesterMixin is not MissingGenerationTesterMixin,
    )


def load() -> types.SimpleNamespace | None:
    """The common test mixins of the installed transformers, or `None` (with the reason in `UNAVAILABLE`)."""
    global UNAVAILABLE
    try:
        return _load(tests_root())
    except SuiteUnavailable as err:
        UNAVAILABLE = str(err)
        return None


UNAVAILABLE = ""


def require(suite: types.SimpleNamespace | None) -> None:
    """Skip (outside CI) or fail (under CI) when `load()` returned `None`."""
    if suite is None:
        if os.environ.get("CI"):
            pytest.fail(f"transformers' common tests are unavailable under CI: {UNAVAILABLE}", pytrace=False)
        pytest.skip(UNAVAILABLE)
