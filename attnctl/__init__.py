"""attnctl: fused attention with head/token controls and attention-map capture."""
from .capture import Capture
from .op import BACKENDS, Dispatch, attention, last_dispatch
from .reference import attention_reference

__version__ = "0.1.0"

__all__ = ["attention", "attention_reference", "Capture", "Dispatch", "last_dispatch", "BACKENDS"]
