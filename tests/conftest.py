"""Session-wide test settings.

The suite never reaches a model or dataset hub (CI has no access to one). The Hugging Face
libraries read these switches when they are first imported, so they are set here, once, before
any test module is imported, rather than by whichever test module happens to be collected first.
"""

from __future__ import annotations

import os

HUB_OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def pytest_configure(config) -> None:
    for name in HUB_OFFLINE_SWITCHES:
        os.environ[name] = "1"
