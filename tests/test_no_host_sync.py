"""A denoising step with a tool installed adds no host-device synchronisation.

On a GPU every ``.item()``, ``bool(tensor)``, ``.tolist()``, ``nonzero()`` or ``.cpu()`` of
a device tensor in a step stalls the host until the device has drained its queue (and
breaks CUDA-graph capture), and so does a blocking copy of a host tensor to the device
(``.to(device)`` without ``non_blocking=True``: PyTorch synchronises the stream after it).
On the CPU nothing stalls and every tensor is a CPU tensor, so the test tells device tensors
from host ones by provenance: the UNet's parameters and inputs are device tensors, and so is
every result of an op with a device tensor among its inputs and every ``.to(device)``
result (a TorchDispatchMode follows every aten op). Counted, between the start of the
UNet's second call and the end of the generation: host reads of a device tensor
(``_local_scalar_dense``: item / bool / int / float; ``nonzero``; ``equal``;
``is_nonzero``; ``Tensor.tolist`` / ``.cpu`` / ``.numpy``, which never reach the dispatcher
for a CPU tensor and are wrapped), and blocking ``.to(device)`` copies of host tensors made
by attnctl. Reads of host-built tensors (a step's window factors) cost no sync and are not
counted; a tensor made on the device by a factory call (``torch.zeros(..., device=d)``)
cannot be told from a host one here, a gap of this CPU proxy. The count with a tool
installed must equal stock diffusers' in the same window (the scheduler's own reads). The
kernel runs on the Triton backend; its CPU interpreter reads tensors on the host by
design, which a GPU launch does not: its reads (made from Triton's frames) are not
counted, the launcher's own are.
"""
import sys
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import attnctl
from attnctl.p2p import Replace
from attnctl.tools.inside_outside import InsideOutside
from attnctl.tools.paint import PaintWithWords
from diffusion_helpers import HEIGHT, WIDTH, sd_pipe

HOST_READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.equal.default",
              "aten.is_nonzero.default"}
STEPS = 4


def _caller() -> str:
    """The first frame outside this module and torch's own Python that led here."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not name.startswith(("torch.", __name__)):
            return f"{name} {frame.f_code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


class HostSyncs(TorchDispatchMode):
    """Follows which tensors hold device data; records host reads of them and blocking
    host-to-device copies while ``active``."""

    def __init__(self):
        super().__init__()
        self.active = False
        self.where = []
        self._device = {}   # id -> weakref of the tensors holding device data

    def mark(self, tensors) -> None:
        for t in tree_leaves(tensors):
            if isinstance(t, torch.Tensor):
                self._device[id(t)] = weakref.ref(t)

    def on_device(self, t) -> bool:
        ref = self._device.get(id(t))
        return ref is not None and ref() is t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        device_input = any(self.on_device(t) for t in inputs)
        if self.active and device_input and str(func) in HOST_READS:
            self._record(str(func))
        out = func(*args, **kwargs)
        if device_input:
            self.mark(out)
        return out

    def _record(self, what: str) -> None:
        caller = _caller()
        if not caller.startswith("triton"):   # the CPU interpreter's own reads (see the module doc)
            self.where.append(f"{what} at {caller}")

    def wrap_methods(self):
        originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "cpu", "numpy", "to")}
        syncs = self

        def read(name):
            def method(tensor, *args, **kwargs):
                if syncs.active and syncs.on_device(tensor):
                    syncs._record(f"Tensor.{name}")
                return originals[name](tensor, *args, **kwargs)
            return method

        def to(tensor, *args, **kwargs):
            out = originals["to"](tensor, *args, **kwargs)
            to_device = any(isinstance(a, (torch.device, str)) for a in args) or "device" in kwargs
            if to_device:
                caller = _caller()
                if (syncs.active and not syncs.on_device(tensor) and not kwargs.get("non_blocking", False)
                        and caller.startswith("attnctl")):
                    syncs.where.append(f"blocking Tensor.to(device) at {caller}")
                syncs.mark(out)
            return out

        for name in ("tolist", "cpu", "numpy"):
            setattr(torch.Tensor, name, read(name))
        torch.Tensor.to = to
        return originals


def _host_syncs_in_later_steps(pipe, prompt, **kwargs):
    syncs = HostSyncs()
    calls = {"n": 0}

    def before(module, args, kwargs_):
        calls["n"] += 1
        if calls["n"] == 1:
            syncs.mark(list(module.parameters()) + list(module.buffers()))
        syncs.mark((args, kwargs_))
        syncs.active = calls["n"] >= 2

    hook = pipe.unet.register_forward_pre_hook(before, with_kwargs=True)
    originals = syncs.wrap_methods()
    try:
        with syncs:
            pipe(prompt, num_inference_steps=STEPS, height=HEIGHT, width=WIDTH,
                 generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs)
            syncs.active = False
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
        hook.remove()
    return syncs.where


def _mask(top_left: bool) -> torch.Tensor:
    m = torch.zeros(HEIGHT // 2, WIDTH // 2)
    if top_left:
        m[: HEIGHT // 4, : WIDTH // 4] = 1.0
    else:
        m[HEIGHT // 4:, WIDTH // 4:] = 1.0
    return m


def _tools():
    return {
        "trace": lambda pipe: attnctl.trace(pipe, backend="triton"),
        "p2p replace": lambda pipe: _installed(pipe, Replace(cross_steps=0.8, self_steps=0.4)),
        "paint-with-words": lambda pipe: _installed(pipe, PaintWithWords({"cat": (_mask(True), 1.5),
                                                                          "car": _mask(False)})),
        "inside-outside": lambda pipe: _installed(pipe, InsideOutside(_mask(True), inside="cat", outside=["car"])),
    }


class _installed:
    """attnctl.install as a context manager."""

    def __init__(self, pipe, *controllers):
        self.pipe, self.controllers = pipe, controllers

    def __enter__(self):
        attnctl.install(self.pipe, *self.controllers, backend="triton")
        return self

    def __exit__(self, *exc):
        attnctl.uninstall(self.pipe)


@pytest.mark.parametrize("tool", list(_tools()))
def test_a_step_with_a_tool_installed_adds_no_host_sync(tool):
    pipe = sd_pipe()
    prompts = ["a cat on a car", "a dog on a car"] if tool == "p2p replace" else ["a cat on a car"]
    stock = _host_syncs_in_later_steps(pipe, prompts)
    with _tools()[tool](pipe):
        got = _host_syncs_in_later_steps(pipe, prompts)
    assert len(got) == len(stock), "host syncs added by attnctl:\n" + "\n".join(
        sorted(set(got) - set(stock)) or got)
