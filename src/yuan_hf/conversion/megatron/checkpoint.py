"""The on-disk layout of a Megatron-LM checkpoint: tracker file, iteration folder, the TP x PP grid of rank files.

::

    ROOT/latest_checkpointed_iteration.txt                          "1477" or "release" (newline optional)
    ROOT/iter_0001477/mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt  when PP > 1
    ROOT/iter_0001477/mp_rank_{tp:02d}/model_optim_rng.pt           when PP == 1

:meth:`MegatronCheckpoint.open` finds and validates the rank files of one iteration against the saved
args; no tensor is read here.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..common import ConversionError
from .args import args_dict
from .pickle_reader import load_megatron_file, open_zip

__all__ = ["CHECKPOINT_VERSION", "MegatronCheckpoint", "RANK_FILE", "TRACKER_FILE", "rank_dir"]

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0

_RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?")
_ITER_DIR = re.compile(r"iter_(\d{7,})")


def rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def _iteration_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (_ITER_DIR.fullmatch(p.name) or p.name == "release"))


@dataclass(frozen=True)
class MegatronCheckpoint:
    """The rank files of one iteration of a Megatron checkpoint, validated against its saved args.

    ``files[(tp_rank, pp_rank)]`` is the ``model_optim_rng.pt`` of that rank; ``iteration`` is ``None`` for a
    ``release`` folder. Open with :meth:`open`.
    """

    path: Path
    iteration: int | None
    tp_size: int
    pp_size: int
    files: Mapping[tuple[int, int], Path]
    args: argparse.Namespace | dict
    checkpoint_version: float

    @property
    def num_stages(self) -> int:
        """Pipeline stages, i.e. how many dicts :func:`iter_ieit_stages` yields (a progress-bar total)."""
        return self.pp_size

    def stage_files(self, stage: int) -> list[Path]:
        """The TP rank files of pipeline stage ``stage``, rank 0 first."""
        return [self.files[(tp_rank, stage)] for tp_rank in range(self.tp_size)]

    @classmethod
    def open(cls, src: str | Path, *, iteration: int | None = None) -> MegatronCheckpoint:
        """Find the rank files of ``src``: a checkpoint root or one ``iter_XXXXXXX`` (or ``release``) folder.

        A root's iteration comes from ``iteration`` or else ``latest_checkpointed_iteration.txt`` (a number, or
        ``release``; a trailing newline is fine). Every ``mp_rank_*`` folder of the TP x PP grid must hold a
        ``model_optim_rng.pt``, and the grid must match ``args.tensor/pipeline_model_parallel_size``. Only the
        first file's pickle is parsed here (no tensor is read).
        """
        src = Path(src)
        if not src.is_dir():
            raise ConversionError(
                f"{src} is not a directory; pass a Megatron checkpoint root (holding {TRACKER_FILE}) or one of "
                "its iter_XXXXXXX folders"
            )
        folder, found_iteration = cls._iteration_folder(src, iteration)
        files, tp_size, pp_size = cls._rank_files(folder)
        first = load_megatron_file(files[(0, 0)], lazy=True)
        if "args" not in first:
            raise ConversionError(f"{files[(0, 0)]} holds no 'args'; the conversion needs the saved training arguments")
        args = first["args"]
        if not isinstance(args, (argparse.Namespace, Mapping)):
            raise ConversionError(f"{files[(0, 0)]}: 'args' is a {type(args).__name__}, expected argparse.Namespace")
        a = args_dict(args)
        for name, on_disk in (("tensor_model_parallel_size", tp_size), ("pipeline_model_parallel_size", pp_size)):
            if a.get(name, 1) != on_disk:
                raise ConversionError(
                    f"{folder} holds {tp_size} TP x {pp_size} PP rank folders but args.{name} = {a.get(name)!r} "
                    f"(read from {files[(0, 0)]}); the checkpoint is incomplete or mixes runs"
                )
        version = first.get("checkpoint_version")
        if not isinstance(version, (int, float)) or version < CHECKPOINT_VERSION:
            raise ConversionError(
                f"{files[(0, 0)]} has checkpoint_version {version!r}; only {CHECKPOINT_VERSION} (Megatron since 2021, "
                "and IEIT's fork) is supported: older versions order the attention weights differently"
            )
        stored = first.get("iteration")
        if found_iteration is not None and stored not in (None, found_iteration):
            raise ConversionError(f"{files[(0, 0)]} says iteration {stored} but lies in {folder.name}")
        return cls(folder, found_iteration, tp_size, pp_size, files, args, float(version))

    @staticmethod
    def _iteration_folder(src: Path, iteration: int | None) -> tuple[Path, int | None]:
        if any(_RANK_DIR.fullmatch(p.name) for p in src.iterdir() if p.is_dir()):
            match = _ITER_DIR.fullmatch(src.name)
            named = int(match.group(1)) if match else None
            if iteration is not None and named is not None and iteration != named:
                raise ConversionError(f"{src} is iteration {named}, but iteration {iteration} was asked for")
            return src, named if named is not None else iteration
        available = _iteration_dirs(src)
        if iteration is not None:
            folder, origin = src / f"iter_{iteration:07d}", f"--iteration {iteration}"
        else:
            tracker = src / TRACKER_FILE
            if not tracker.is_file():
                example = src / (available[-1] if available else "iter_0001000")
                raise ConversionError(
                    f"{src} has no {TRACKER_FILE} and no mp_rank_* folders: pass the iteration folder itself "
                    f"(e.g. {example}) or choose one with --iteration N (found: {', '.join(available) or 'none'})"
                )
            text = tracker.read_text(encoding="utf-8").strip()
            if text == "release":
                folder, iteration = src / "release", None
            elif text.isdigit():
                iteration = int(text)
                folder = src / f"iter_{iteration:07d}"
            else:
                raise ConversionError(
                    f"{tracker} holds {text!r}; expected an iteration number or 'release'. Pass --iteration N"
                )
            origin = f"{tracker} says {text!r}"
        if not folder.is_dir():
            raise ConversionError(
                f"iteration folder {folder} does not exist ({origin}); available: {', '.join(available) or 'none'}"
            )
        return folder, iteration

    @staticmethod
    def _rank_files(folder: Path) -> tuple[dict[tuple[int, int], Path], int, int]:
        ranks: dict[tuple[int, int], Path] = {}
        with_pp: set[bool] = set()
        for child in sorted(folder.iterdir()):
            if not child.name.startswith("mp_rank_"):
                continue
            match = _RANK_DIR.fullmatch(child.name)
            if match is None or not child.is_dir():
                raise ConversionError(
                    f"unexpected {child}: expected folders mp_rank_TT (PP = 1) or mp_rank_TT_PPP; expert-parallel "
                    "checkpoints (mp_rank_TT_PPP_EEE) are not supported"
                )
            with_pp.add(match.group(2) is not None)
            ranks[(int(match.group(1)), int(match.group(2) or 0))] = child
        if not ranks:
            raise ConversionError(f"{folder} holds no mp_rank_* folders; is it a Megatron iteration folder?")
        if len(with_pp) > 1:
            raise ConversionError(f"{folder} mixes mp_rank_TT and mp_rank_TT_PPP folders")
        tp_size = max(t for t, _ in ranks) + 1
        pp_size = max(p for _, p in ranks) + 1
        pp_named = with_pp.pop()
        missing = [
            rank_dir(t, p, pp_size if pp_named else 1) for p in range(pp_size) for t in range(tp_size) if (t, p) not in ranks
        ]
        if missing:
            raise ConversionError(
                f"{folder} lacks rank folder(s) {', '.join(missing)} of its {tp_size} TP x {pp_size} PP grid; "
                "copy the complete checkpoint"
            )
        files = {}
        for rank, directory in ranks.items():
            path = directory / RANK_FILE
            if not path.is_file():
                raise ConversionError(f"{path} is missing; every rank folder needs its {RANK_FILE}")
            open_zip(path)  # cheap: central directory and data.pkl; catches truncated files early
            files[rank] = path
        return files, tp_size, pp_size


