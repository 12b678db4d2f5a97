"""attnctl: fused attention with head/token controls and attention-map capture."""
from .capture import Capture
from .injection import OwnTerm
from .op import BACKENDS, Dispatch, attention, last_dispatch, logit_max
from .attention_maps import attention_with_maps
from .reference import attention_reference
from .regions import Regions
from .diffusers import AttentionCall, Controller, Plan, install, uninstall
from .tools.maps import TraceMaps
from .tools.trace import trace
from .tools.concept_attention import ConceptMaps, concept_attention
from . import p2p

__version__ = "0.1.0"

__all__ = ["attention", "attention_with_maps", "attention_reference", "Capture", "Dispatch", "last_dispatch", "BACKENDS",
           "install", "uninstall", "logit_max", "Regions", "OwnTerm", "trace", "TraceMaps", "concept_attention", "ConceptMaps", "Controller", "Plan", "AttentionCall", "p2p"]
