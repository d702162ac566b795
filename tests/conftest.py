"""Suite-wide settings: no hub access, and hypothesis tuned for torch (the first torch call is slow)."""

import os

from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

settings.register_profile("proxim", deadline=None, max_examples=40, derandomize=True)
settings.load_profile("proxim")
