"""Run open_clip's own trainer in a subprocess: CPU, a micro model.

The trainer module (``open_clip_train.main`` or ``jobs.openclip_train``) runs as ``__main__``
in a process where the micro model config is registered (open_clip has no command-line option
for a config file); with ``SEEN_FILE_ENV`` set, the process also appends the uid of
every sample that open_clip's webdataset pipeline lets through (its caption/image filter) to
that file, from whichever process iterates the data (main or a DataLoader worker).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
MICRO = "diffin-micro-test"
MICRO_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
SEEN_FILE_ENV = "DIFFIN_TEST_SEEN_FILE"
# argv: CONFIG_JSON MODULE, then the trainer's arguments.
TRAIN_WRAPPER = (
    "import json, os, sys, runpy\n"
    "import pipeline, open_clip\n"
    "open_clip.add_model_config(sys.argv[1])\n"
    f"seen = os.environ.get({SEEN_FILE_ENV!r})\n"
    "if seen:\n"
    "    import open_clip_train.data as data\n"
    "    passes = data.filter_no_caption_or_no_image\n"
    "    def record(sample):\n"
    "        ok = passes(sample)\n"
    "        if ok:\n"
    "            with open(seen, 'a') as out:\n"
    "                out.write(json.loads(sample['json'])['uid'] + '\\n')\n"
    "        return ok\n"
    "    data.filter_no_caption_or_no_image = record\n"
    "sys.argv = sys.argv[2:]\n"
    "runpy.run_module(sys.argv[0], run_name='__main__')\n"
)


def write_micro_config(directory: Path) -> Path:
    """The micro model's config file (``<MICRO>.json``) in ``directory``."""
    path = directory / f"{MICRO}.json"
    path.write_text(json.dumps(MICRO_CONFIG))
    return path


def start_train(config: Path, args: Sequence[str], module: str = "open_clip_train.main",
                seen_file: Path | None = None) -> subprocess.Popen:
    """Start ``python -m MODULE ARGS`` with the micro config registered (stdout and stderr piped)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop(SEEN_FILE_ENV, None)
    if seen_file is not None:
        env[SEEN_FILE_ENV] = str(seen_file)
    argv = [sys.executable, "-c", TRAIN_WRAPPER, str(config), module, *args]
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
