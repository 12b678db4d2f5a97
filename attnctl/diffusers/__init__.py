"""diffusers integration: the attnctl processor, install/uninstall and the controller protocol."""
from .controller import AttentionCall, BatchLayout, Controller, DenoiseStep, Plan
from .install import Generation, Installation, install, installation_of, uninstall
from .processor import AttnctlProcessor

__all__ = ["AttentionCall", "AttnctlProcessor", "BatchLayout", "Controller", "DenoiseStep",
           "Generation", "Installation", "Plan", "install", "installation_of", "uninstall"]
