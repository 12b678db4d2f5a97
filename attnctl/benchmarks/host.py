"""`attnctl bench --host`: the host time of one attention call, up to the driver's launch.

Runs on a CPU. Only the final launch is stubbed: a stand-in Triton driver (current device 0,
stream 0, an sm_90 target) lets Triton's JIT bind and specialise the real kernel's
arguments as on a GPU, its compile step is replaced by a stand-in CompiledKernel (no PTX
is built), and that kernel's ``run`` (what would call cuLaunchKernel) does nothing. Every
number is the median of ``repeat`` calls timed with time.perf_counter_ns, in microseconds:

* ``sdpa``: torch SDPA on (1, 1, 1, 8) fp32 CPU tensors: dispatch plus a negligible
  computation (SDPA on the call's own tensors would compute on the CPU for real; on meta
  tensors it runs a decomposition that costs far more than the CUDA dispatch).
* ``plain``, ``captured`` (token mass + maps at 4 token columns), ``injection``
  (prompt-to-prompt: a source index per item): attnctl.attention(backend="triton") on
  (2, 8, 256, 40) fp16 queries and 77 keys, diffusers' (B, M, H, D) views: validation,
  dispatch, output allocation, the argument list, the launch. ``*_jit`` is the same call
  launched through ``kernel[grid](...)`` (Triton's binder on every call, as before the
  prepared launches), in the same run.
* ``layer_attnctl`` / ``layer_stock``: one cross-attention layer call of a tiny SD UNet
  traced by attnctl.trace (AttnctlProcessor, controllers consulted) and the same call
  through diffusers' AttnProcessor2_0, whose SDPA computes for real: ``layer_stock_sdpa``
  is that SDPA alone on tensors of the call's shapes, ``layer_stock_host`` the stock call
  less it, ``layer_overhead_us`` attnctl's call less that (the projections are tiny and
  compute in both).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict

import torch
import torch.nn.functional as F


def median_us(call: Callable[[], object], repeat: int, warmup: int = 20) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeat):
        start = time.perf_counter_ns()
        call()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e3


class _StubCompiledKernel:
    """What the JIT would have compiled; ``run`` is the launch and does nothing."""
    function = 0
    packed_metadata = ()

    def __init__(self):
        self.launches = 0

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        self.launches += 1


class _StubDriver:
    def __init__(self):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def stubbed_launch():
    """Triton's JIT on CPU tensors with only the launch stubbed (see the module doc).

    Imports the kernels compiled (not interpreted) and lets attnctl's CUDA check pass CPU
    tensors (TRITON_INTERPRET=1 is set only after the import, for that check)."""
    from triton.runtime import driver
    os.environ.pop("TRITON_INTERPRET", None)
    from attnctl.kernels.attention import attention_fwd_kernel
    from triton.runtime.jit import JITFunction
    if not isinstance(attention_fwd_kernel, JITFunction):
        raise RuntimeError("attnctl bench --host: the kernels were imported under TRITON_INTERPRET=1; "
                           "run it in a process without TRITON_INTERPRET")
    stub = _StubCompiledKernel()

    def compile_stub(key, signature, device, constexprs, options, attrs, warmup):
        attention_fwd_kernel.device_caches[device][0][key] = stub
        return stub

    previous = driver._active  # reset_active would look for a real driver: there is none on a CPU
    driver.set_active(_StubDriver())
    attention_fwd_kernel._do_compile = compile_stub
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield stub
    finally:
        os.environ.pop("TRITON_INTERPRET", None)
        del attention_fwd_kernel._do_compile
        attention_fwd_kernel.device_caches.clear()
        driver._active = previous


@contextlib.contextmanager
def jit_launches():
    """Launch through ``kernel[grid](...)`` on every call (the path before prepared launches)."""
    from attnctl.backends import triton_backend
    prepared = triton_backend._attention_launches
    prepared.launch = lambda grid, args, meta: prepared.kernel[grid](*args, **meta)
    try:
        yield
    finally:
        del prepared.launch


def _attention_calls() -> Dict[str, Callable[[], object]]:
    import attnctl
    B, H, M, N, D = 2, 8, 256, 77, 40
    q = torch.randn(B, M, H, D, dtype=torch.float16).transpose(1, 2)
    k = torch.randn(B, N, H, D, dtype=torch.float16).transpose(1, 2)
    v = torch.randn(B, N, H, D, dtype=torch.float16).transpose(1, 2)
    capture = attnctl.Capture(token_mass=torch.zeros(B, H, N), maps=torch.zeros(B, M, 4),
                              tokens=torch.tensor([[1, 2, 3, 4]] * B))
    source = torch.tensor([0, 0])
    return {
        "plain": lambda: attnctl.attention(q, k, v, backend="triton"),
        "captured": lambda: attnctl.attention(q, k, v, capture=capture, backend="triton"),
        "injection": lambda: attnctl.attention(q, k, v, source=source, backend="triton"),
    }


def _sdpa_call() -> Callable[[], object]:
    q = torch.randn(1, 1, 1, 8)
    return lambda: F.scaled_dot_product_attention(q, q, q)


def _layer_times(repeat: int) -> Dict[str, float]:
    """One cross-attention layer call of a tiny SD UNet under attnctl.trace, against the
    same call through AttnProcessor2_0, both timed inside a pipeline step (so the trace's
    step state is live)."""
    import attnctl
    from diffusers.models.attention_processor import AttnProcessor2_0
    from attnctl.diffusers.offline import tiny_sd_pipeline
    pipe = tiny_sd_pipeline()
    times: Dict[str, float] = {}
    with attnctl.trace(pipe, layers="*", backend="triton"):
        name, attn = next((n, m) for n, m in pipe.unet.named_modules() if n.endswith("attn2"))
        traced, stock = attn.processor, AttnProcessor2_0()

        def measure(module, args, kwargs):  # a forward pre-hook: the processor stays the installed one
            if not times:
                times["layer_attnctl"] = median_us(lambda: traced(module, *args, **kwargs), repeat)
                times["layer_stock"] = median_us(lambda: stock(module, *args, **kwargs), repeat)
                times["layer_stock_sdpa"] = median_us(_layer_sdpa(module, *args, **kwargs), repeat)

        hook = attn.register_forward_pre_hook(measure, with_kwargs=True)
        try:
            pipe("a cat", num_inference_steps=1, height=64, width=64, output_type="pt",
                 generator=torch.Generator().manual_seed(0))
        finally:
            hook.remove()
    times["layer"] = name
    return times


def _layer_sdpa(attn, hidden_states, encoder_hidden_states=None, *args, **kwargs) -> Callable[[], object]:
    """AttnProcessor2_0's SDPA alone, on tensors of the layer call's shapes."""
    B = hidden_states.shape[0]
    M = hidden_states.shape[-2] * hidden_states.shape[-1] if hidden_states.dim() == 4 else hidden_states.shape[1]
    N = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else M
    d = attn.inner_dim // attn.heads
    q, k = torch.randn(B, attn.heads, M, d), torch.randn(B, attn.heads, N, d)
    return lambda: F.scaled_dot_product_attention(q, k, k)


def run(repeat: int, out_dir: Path) -> Path:
    results: Dict[str, object] = {"sdpa": median_us(_sdpa_call(), repeat)}
    with stubbed_launch() as stub:
        calls = _attention_calls()
        for name, call in calls.items():
            results[name] = median_us(call, repeat)
        with jit_launches():
            for name, call in calls.items():
                results[f"{name}_jit"] = median_us(call, repeat)
        results.update(_layer_times(repeat))
        if not stub.launches:
            raise RuntimeError("attnctl bench --host: no call reached the stubbed launch")
    sdpa = results["sdpa"]
    results["ratios_to_sdpa"] = {name: results[name] / sdpa for name in (*calls, *(f"{n}_jit" for n in calls))}
    # The stock processor's SDPA computes for real; attnctl's launch is stubbed: compare host work.
    results["layer_stock_host"] = results["layer_stock"] - results["layer_stock_sdpa"]
    results["layer_overhead_us"] = results["layer_attnctl"] - results["layer_stock_host"]
    import triton
    results["environment"] = {"python": platform.python_version(), "torch": torch.__version__,
                              "triton": triton.__version__, "machine": platform.machine(),
                              "processor": platform.processor(), "repeat": repeat,
                              "torch_threads": torch.get_num_threads()}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"host-{datetime.date.today():%Y%m%d}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path
