"""Environment for the jobs the tools and tests launch (pretrain, evaluate, make_* tools).

One place for what every launched process needs here: the repository on PYTHONPATH, the venv's
launchers on PATH, a persistent DeepSpeed extension cache, one thread per rank, offline Hugging Face,
and DeepSpeed's CPU accelerator unless the caller chose another.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def launch_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
            "PYTHONPATH": str(REPO),
            "TORCH_EXTENSIONS_DIR": env.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "DS_ACCELERATOR": env.get("DS_ACCELERATOR", "cpu"),
        }
    )
    env.update(extra or {})
    return env
