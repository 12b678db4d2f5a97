"""attnctl.p2p: prompt-to-prompt editing controllers (see attnctl.tools.p2p)
and the AttentionStore view (attnctl.tools.p2p_store)."""
from .tools.alignment import global_align, refinement_mapper
from .tools.p2p_store import AttentionStore
from .tools.p2p import Edit, LocalBlend, Refine, Replace, Reweight, edit, replacement_mapper

__all__ = ["AttentionStore", "Edit", "LocalBlend", "Replace", "Refine", "Reweight", "edit", "global_align",
           "refinement_mapper", "replacement_mapper"]
