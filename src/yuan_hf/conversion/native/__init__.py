"""The native sink: every converter ends here (builder -> atomic sharded writer -> folder, summary, verify)."""

from .builder import IEIT_KEYS, NativeStateBuilder
from .folder import ConversionSummary, verify_folder, write_converted
from .output import ShardedSafetensorsWriter, atomic_output_dir, parse_size

__all__ = [
    "ConversionSummary",
    "IEIT_KEYS",
    "NativeStateBuilder",
    "ShardedSafetensorsWriter",
    "atomic_output_dir",
    "parse_size",
    "verify_folder",
    "write_converted",
]
