"""The conversion package's layout is its design: readers and the sink never depend on the writers."""

from __future__ import annotations

import subprocess
import sys


def test_readers_and_sink_do_not_import_the_writers():
    code = (
        "import sys, yuan_hf, yuan_hf.conversion.ieit_hf, yuan_hf.conversion.megatron, yuan_hf.conversion.cache, "
        "yuan_hf.conversion.tokenizer, yuan_hf.cli; "
        "print(sorted(m for m in sys.modules if m.startswith('yuan_hf.conversion.writers')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
