"""attnctl: fused attention with head/token controls and attention-map capture."""
from .capture import Capture
from .op import BACKENDS, Dispatch, attention, last_dispatch
from .reference import attention_reference
from .diffusers import AttentionCall, Controller, Plan, install, uninstall
from .tools.maps import TraceMaps
from .tools.trace import trace

__version__ = "0.1.0"

__all__ = ["attention", "attention_reference", "Capture", "Dispatch", "last_dispatch", "BACKENDS",
           "install", "uninstall", "trace", "TraceMaps", "Controller", "Plan", "AttentionCall"]
