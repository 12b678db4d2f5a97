"""Prepared Triton launches (attnctl/backends/prepared.py), under TRITON_INTERPRET=1: a
repeat call of a signature skips the JIT's binder and launches from the prepared entry
with the argument list it assembles; a call that differs in anything the JIT specialises
on gets its own entry. And `attnctl bench --host` runs and writes its JSON."""
import json
import os
import subprocess
import sys

import pytest
import torch

import attnctl
from attnctl import Capture, attention_reference
from attnctl.backends import triton_backend

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")

B, H, M, N, D = 1, 2, 16, 16, 16


@pytest.fixture
def launches(monkeypatch):
    """The backend's prepared launches, emptied, counting the calls that go through the JIT."""
    prepared = triton_backend._attention_launches
    monkeypatch.setattr(prepared, "entries", {})
    jit_calls = []
    prepare = prepared._prepare

    def counting(*args):
        jit_calls.append(args[0])
        return prepare(*args)

    monkeypatch.setattr(prepared, "_prepare", counting)
    return prepared, jit_calls


def qkv(seed, layout="bhmd"):
    g = torch.Generator().manual_seed(seed)
    if layout == "bmhd":  # diffusers' transposed views
        return [torch.randn(B, M if i == 0 else N, H, D, generator=g).transpose(1, 2) for i in range(3)]
    return [torch.randn(B, H, M if i == 0 else N, D, generator=g) for i in range(3)]


def check(out, q, k, v, scale=D ** -0.5, **kwargs):
    ref = attention_reference(q, k, v, scale=scale, **kwargs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_repeat_call_with_new_tensors_launches_from_the_prepared_entry(launches):
    prepared, jit_calls = launches
    tokens = torch.tensor([[1, 3]])
    results = []
    for seed in (0, 1):
        q, k, v = qkv(seed)
        capture = Capture(token_mass=torch.zeros(B, H, N), maps=torch.zeros(B, M, 2), tokens=tokens)
        out = attnctl.attention(q, k, v, capture=capture, backend="triton")
        reference = Capture(token_mass=torch.zeros(B, H, N), maps=torch.zeros(B, M, 2), tokens=tokens)
        check(out, q, k, v, capture=reference)
        torch.testing.assert_close(capture.token_mass, reference.token_mass, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(capture.maps, reference.maps, atol=1e-5, rtol=1e-5)
        results.append(out)
    assert len(jit_calls) == 1 and len(prepared.entries) == 1
    assert not torch.equal(results[0], results[1])


def test_a_new_scale_reuses_the_entry(launches):
    """Float arguments are not specialised: a new scale (or region strength) is no new signature."""
    prepared, jit_calls = launches
    q, k, v = qkv(2)
    bias = torch.randn(B, H, M, N)
    for scale in (0.25, 0.5):
        check(attnctl.attention(q, k, v, scale=scale, bias=bias, backend="triton"), q, k, v, scale=scale, bias=bias)
    assert len(jit_calls) == 1


def _misaligned(t):
    """``t``'s values at a data pointer 4 bytes past a 16-byte boundary, same strides."""
    storage = torch.empty(t.numel() + 1, dtype=t.dtype)[1:]
    return storage.view(t.shape).copy_(t)


@pytest.mark.parametrize("change", ["alignment", "stride_one", "new_operand", "dtype", "shape"])
def test_a_call_differing_in_a_specialised_class_gets_its_own_entry(launches, change):
    prepared, jit_calls = launches
    q, k, v = qkv(3)
    bias = torch.randn(B, H, M, N)
    check(attnctl.attention(q, k, v, bias=bias, backend="triton"), q, k, v, bias=bias)
    kwargs = dict(bias=bias)
    if change == "alignment":
        q = _misaligned(q)
        assert q.data_ptr() % 16
    elif change == "stride_one":  # a (B, M, H, D) view: the head stride becomes D, the row stride H*D
        q, k, v = qkv(4, "bmhd")
    elif change == "new_operand":
        kwargs["prob_mult"] = torch.rand(B, H, M, N)
    elif change == "dtype":
        kwargs["bias"] = bias.half()
    elif change == "shape":
        kwargs["bias"] = bias[:, :1]  # broadcast over heads: a 0 head stride
    out = attnctl.attention(q, k, v, backend="triton", **kwargs)
    check(out, q, k, v, **kwargs)
    assert len(jit_calls) == 2 and len(prepared.entries) == 2
    assert jit_calls[0] != jit_calls[1]


def test_signature_key_reads_alignment_dtype_and_presence():
    prepared = triton_backend._attention_launches
    a = torch.zeros(64)
    args = [a, None, 7, 0.5]
    prepared_small = type(prepared).__new__(type(prepared))
    prepared_small.pointers, prepared_small._float_slots = 2, (1,)
    key = prepared_small.signature_key(list(args), {"X": 1}, None)
    assert key == (None, ((torch.float32, True), None), (7, None), (("X", 1),))
    assert prepared_small.signature_key([a[1:], None, 7, 0.25], {"X": 1}, None)[1] == ((torch.float32, False), None)
    assert prepared_small.signature_key([a, a, 7, 0.25], {"X": 1}, None)[1][1] == (torch.float32, True)


def test_bench_host_writes_json(tmp_path):
    """As a user runs it: a fresh process (the kernels compiled by Triton's JIT, only the launch stubbed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "attnctl.cli", "bench", "--host", "--host-repeat", "3",
                           "--host-dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = tmp_path.glob("host-*.json")
    result = json.loads(path.read_text())
    for name in ("sdpa", "plain", "captured", "injection", "plain_jit", "captured_jit", "injection_jit",
                 "layer_attnctl", "layer_stock", "layer_stock_sdpa", "layer_overhead_us"):
        assert isinstance(result[name], float), name
    assert set(result["ratios_to_sdpa"]) == {"plain", "captured", "injection", "plain_jit", "captured_jit",
                                             "injection_jit"}
    assert result["environment"]["repeat"] == 3


def test_a_direct_launch_the_launcher_refuses_falls_back_to_the_jit_and_says_why(monkeypatch, caplog):
    """The compiled launcher's calling convention is Triton-internal: where it refuses the
    arguments (TypeError, before anything launches), every later call goes through the JIT,
    with one warning and the reason queryable, never silently."""
    from attnctl.backends import prepared

    launched = []

    class FakeKernel:
        arg_names = ["X", "n"]

        @staticmethod
        def fn(X, n, BLOCK: "tl.constexpr" = 4):
            pass

        def __getitem__(self, grid):
            return lambda *args, **meta: launched.append((grid, args, meta))

    monkeypatch.setattr(prepared, "_current_device", lambda: 0)
    kernel = prepared.PreparedKernel(FakeKernel(), pointers=1, floats=())
    kernel._compiled = True
    x = torch.zeros(4)

    def refusing(grid, full_args, device):
        raise TypeError("function takes exactly 13 arguments (12 given)")

    kernel.entries[kernel.signature_key([x, 4], {"BLOCK": 4}, 0)] = ((4,), refusing)
    with caplog.at_level("WARNING", logger="attnctl"):
        kernel.launch((1, 1), [x, 4], {"BLOCK": 4})
        kernel.launch((1, 1), [x, 4], {"BLOCK": 4})
    assert len(launched) == 2 and launched[0][2] == {"BLOCK": 4}
    assert "13 arguments" in kernel.direct_launch_unavailable
    assert sum("direct launches" in r.getMessage() for r in caplog.records) == 1
