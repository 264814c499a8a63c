"""Environment defaults for processes the project starts (CLI, jobs, Ray workers)."""

from __future__ import annotations

import os

DEFAULTS = {
    # No model weights or datasets from any hub at run time (open_clip otherwise retries ~46 s).
    "HF_HUB_OFFLINE": "1",
    # A loopback-only local cluster has no auth token; `ray job submit` fails without this.
    "RAY_AUTH_MODE": "disabled",
}


def apply_defaults() -> dict[str, str]:
    """Set the project's environment defaults where the user has not set them; return them."""
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in DEFAULTS}
