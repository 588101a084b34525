"""`python -m yuan_hf.finetune RECIPE [key=value ...]`; works under `torchrun` and `accelerate launch`."""

import sys

from .runner import main

sys.exit(main())
