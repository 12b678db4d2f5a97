"""The observable state of a diffusers pipeline that attnctl may change, to check that a
call that raised left the pipeline exactly as it was.

Compared by identity: every module's attention processor and the dispatcher backend and
parallel config it holds (Flux, Wan), every module's hook dicts, the pipeline's instance
attributes that are components or
methods (attnctl wraps ``encode_prompt`` there) and torch's global module hooks; and
the installation attnctl reports (``installation_of``) with its backend, controllers and
current generation (what a controller added later is told of).
"""
from __future__ import annotations

import torch
from torch.nn.modules import module as torch_module

from attnctl.diffusers.install import installation_of

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks",
               "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def _ids(mapping) -> tuple:
    return tuple((key, id(value)) for key, value in mapping.items())


def _modules(pipe):
    if isinstance(pipe, torch.nn.Module):
        return {"model": pipe}
    return {name: value for name, value in vars(pipe).items() if isinstance(value, torch.nn.Module)}


def pipeline_state(pipe) -> dict:
    # the pipeline's own call sets plain attributes (_guidance_scale, ...); compared are its
    # components and methods
    state = {"attributes": _ids({k: v for k, v in vars(pipe).items() if callable(v)}),
             "global_hooks": tuple(_ids(getattr(torch_module, name)) for name in _GLOBAL_HOOKS)}
    for component, model in _modules(pipe).items():
        for name, module in model.named_modules():
            key = f"{component}.{name}"
            state[key + " hooks"] = tuple(_ids(getattr(module, d, {})) for d in _HOOK_DICTS)
            processor = getattr(module, "processor", None)
            if processor is not None:
                state[key + " processor"] = (id(processor), getattr(processor, "_attention_backend", None),
                                             id(getattr(processor, "_parallel_config", None)))
    installation = installation_of(pipe)
    state["installation"] = None if installation is None else (
        id(installation), installation.backend, tuple(id(c) for c in installation.controllers))
    state["generation"] = None if installation is None else id(installation.generation)
    return state


def assert_unchanged(before: dict, pipe, ignore=()) -> None:
    """``ignore``: keys not compared ("generation" after a pipeline call that ran)."""
    after = pipeline_state(pipe)
    changed = sorted(k for k in before.keys() | after.keys() if k not in ignore and before.get(k) != after.get(k))
    assert not changed, f"{len(changed)} parts of the pipeline changed, e.g. {changed[:5]}"
