"""Prepared launches of a @triton.jit kernel: the JIT's binder runs once per call signature.

``kernel[grid](*args, **meta)`` binds and specialises every argument on every call (Triton
3.6 and 3.9 alike: a generated binder over all ~150 arguments, a cache-key string, then
``CompiledKernel.run``), which is most of a small attention call's host time. A
:class:`PreparedKernel` goes through the JIT once per call signature, keeps the
CompiledKernel the JIT returns, and launches it directly afterwards with the arguments in
the order the JIT hands them to the launcher (every parameter, constexprs included: both
versions' launchers skip what the compiled signature marks constexpr, also the ints the
JIT specialised as constexpr 1).

The signature key covers everything the JIT specialises on: the compile-time arguments and
launch options (``meta``), the exact value of every integer argument (finer than Triton's
==1 / %16 / i64 classes: a new shape costs one pass through the JIT, never a compile the JIT
would not do), and for each pointer argument its dtype and 16-byte alignment, or None.
Float arguments are not specialised by the JIT and are left out of the key, so a new scale
or region strength reuses the entry. The JIT also re-checks on each call that the
kernel's global variables are unchanged; the kernels launched here read none.

Under TRITON_INTERPRET=1 the kernel is an InterpretedFunction with no compiled form: the
entry's launcher then hands the same assembled argument list to the interpreter, so the
signature cache and the argument filling run (and are tested) on the CPU too.
"""
from __future__ import annotations

import inspect
import logging
from typing import Callable, Dict, Sequence, Tuple

from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction

logger = logging.getLogger("attnctl")


class PreparedKernel:
    """Launches of ``kernel`` whose first ``pointers`` parameters are tensors or None and
    whose remaining runtime parameters are ints, except those named in ``floats``."""

    def __init__(self, kernel, pointers: int, floats: Sequence[str], max_entries: int = 256):
        self.kernel = kernel
        self.pointers = pointers
        names = list(kernel.arg_names)
        self._float_slots = tuple(names.index(name) - pointers for name in floats)
        parameters = list(inspect.signature(kernel.fn).parameters.values())
        self._parameter_count = len(parameters)
        # Constexpr parameters in signature order with their defaults: the tail of the
        # launcher's argument list after the runtime arguments (the kernels put them last).
        self._constexprs = tuple((p.name, p.default) for p in parameters if "constexpr" in str(p.annotation))
        self._compiled = isinstance(kernel, JITFunction)
        self.max_entries = max_entries
        self.entries: Dict[tuple, Tuple[tuple, Callable]] = {}
        # Why repeat calls go through the JIT instead (None while the direct launch works):
        # the compiled launcher's calling convention is Triton-internal and has been read
        # from the 3.6 and 3.9 sources, not yet run on a GPU.
        self.direct_launch_unavailable = None

    def signature_key(self, args: list, meta: dict, device) -> tuple:
        scalars = args[self.pointers:]
        for slot in self._float_slots:
            scalars[slot] = None
        pointers = tuple([None if t is None else (t.dtype, not t.data_ptr() & 15) for t in args[:self.pointers]])
        return (device, pointers, tuple(scalars), tuple(meta.items()))

    def launch(self, grid: tuple, args: list, meta: dict) -> None:
        """Launch ``kernel[grid](*args, **meta)``; ``grid`` has two or three dims."""
        device = _current_device() if self._compiled else None
        key = self.signature_key(args, meta, device)
        entry = self.entries.get(key)
        if entry is None:
            self._prepare(key, grid, args, meta)
            return
        tail, run = entry
        if self.direct_launch_unavailable is not None:
            self.kernel[grid](*args, **meta)
            return
        try:
            run(grid, (*args, *tail), device)
        except TypeError as exc:  # refused before launching: a launcher of another convention
            if not self._compiled:
                raise
            self.direct_launch_unavailable = f"{type(exc).__name__}: {exc}"
            logger.warning("attnctl: %s: direct launches of the compiled kernel failed (%s); every launch now "
                           "goes through Triton's JIT binder (slower host path)", self.kernel.fn.__name__,
                           self.direct_launch_unavailable)
            self.kernel[grid](*args, **meta)

    def _prepare(self, key: tuple, grid: tuple, args: list, meta: dict) -> None:
        """First call of a signature: through the JIT (which compiles or finds the kernel
        and launches it); keep what a repeat call needs."""
        runtime = len(args)
        if runtime + len(self._constexprs) != self._parameter_count:
            raise TypeError(f"{self.kernel.fn.__name__}: expected "
                            f"{self._parameter_count - len(self._constexprs)} runtime arguments, got {runtime}")
        tail = tuple(meta.get(name, default) for name, default in self._constexprs)
        if self._compiled:
            compiled = self.kernel[grid](*args, **meta)
            if compiled is None:  # a JIT cache hook declined to compile: nothing to keep
                return
            if hasattr(compiled, "result"):  # asynchronous compilation (Triton 3.6)
                compiled = compiled.result()
            run = _compiled_launcher(compiled)
        else:
            self.kernel[grid](*args, **meta)
            run = _interpreted_launcher(self.kernel, runtime, self._constexprs, meta)
        if len(self.entries) >= self.max_entries:
            self.entries.clear()
        self.entries[key] = (tail, run)


def _current_device():
    return driver.active.get_current_device()


def _compiled_launcher(compiled) -> Callable:
    """``run(grid, full_args, device)`` as JITFunction.run launches a CompiledKernel."""
    function, packed_metadata = compiled.function, compiled.packed_metadata
    hooks = knobs.runtime

    def run(grid, full_args, device):
        stream = driver.active.get_current_stream(device)
        enter = hooks.launch_enter_hook
        metadata = compiled.launch_metadata(grid, stream, *full_args) if enter is not None else None
        compiled.run(grid[0], grid[1], grid[2] if len(grid) > 2 else 1, stream, function, packed_metadata,
                     metadata, enter, hooks.launch_exit_hook, *full_args)
    return run


def _interpreted_launcher(kernel, runtime: int, constexprs: tuple, meta: dict) -> Callable:
    """``run(grid, full_args, device)`` handing the launcher's argument list (runtime
    arguments, then every constexpr) to the interpreter."""
    names = [name for name, _ in constexprs]
    options = {name: value for name, value in meta.items() if name not in names}

    def run(grid, full_args, device):
        kernel[grid](*full_args[:runtime], **dict(zip(names, full_args[runtime:])), **options)
    return run
