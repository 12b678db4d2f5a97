"""Launcher for the Triton kernel: output allocation, strides, block sizes, grid."""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from attnctl.capture import Capture
from attnctl.injection import OwnTerm
from attnctl.kernels.attention import LOG2E, attention_fwd_kernel, logit_max_kernel
from attnctl.regions import Regions
from ._layout import broadcast_strides, empty_output
from .prepared import PreparedKernel


def _next_pow2(n: int) -> int:
    # Integer bit arithmetic: this runs on every launch, and triton.next_power_of_2 costs
    # microseconds per call.
    return 1 << (n - 1).bit_length()


def _pow2_at_least_16(n: int) -> int:
    # tl.dot needs every block dim >= 16 and a power of two.
    return max(16, _next_pow2(n))


def head_tiles(dim: int) -> tuple:
    """(main, tail) widths of the column tiles that cover a head dim of ``dim``.

    tl.arange and tl.dot need power-of-two widths of at least 16, so a dim that is not a
    power of two is covered by a power-of-two main tile plus a power-of-two tail (at least
    16 wide): 40 = 32 + 16 (8 masked), 72 = 64 + 16 (8 masked), 80 = 64 + 16, 160 = 128 + 32.
    Tail 0 (one tile, as wide as the next power of two) when the split would not be
    narrower: 16, 64, 128, and 112 (64 + 64 = 128), 24 (16 + 16 = 32)."""
    padded = _pow2_at_least_16(dim)
    main = padded // 2
    if main < 16:
        return padded, 0
    tail = _pow2_at_least_16(dim - main)
    return (padded, 0) if main + tail >= padded else (main, tail)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@lru_cache(maxsize=None)
def launch_config(head_dim: int, value_dim: int, num_keys: int, num_tokens: int,
                  captures: bool, elem_size: int, accumulators: int = 1, probes: bool = False,
                  controls: bool = False) -> dict:
    """Block sizes, warps and pipeline stages by shape.

    N up to 128 keys (cross-attention, N = 77) fits a single key block, which makes
    token-mass capture single-pass (not with captures at head dims up to 64: see below). Tiles are chosen so that ptxas spills
    no register and shared memory fits, on sm_80 and sm_90 (tests/compile_kernel.py
    compiles every variant without a GPU; tests/test_kernel_compiles.py fails on a spill):

    * 128 query rows only for 16-bit inputs with head dims up to 64, one output
      accumulator, no capture and no control (the capture epilogues and the bias /
      prob_mult tiles hold extra registers); 16 for 512
      value columns (the two-source form at d = 160) and for probes at d = 160; 32 for
      probes at other head dims than 64 (64 rows spill at d = 40 on sm_80 with Triton 3.6,
      32 rows at d = 64 on sm_90 with 3.9), for 256-wide tiles (d = 160, the two-source form at d = 128,
      fan-out to 4) on a single key block, with captures or controls or fanned out to 4, and for the
      two-source form with captures; else 64;
    * 64-key blocks with probes, with controls and no capture (the bias / prob_mult tiles),
      and with captures at head dims up to 64 or 256-wide tiles (a 128-key tile spills
      there, measured: 16-1700 B of stack), so N = 77 runs two key blocks;
    * 8 warps for 128-row tiles, 128 x 128-element tiles, 256-wide tiles, with captures
      or controls and for a head-dim tail on one 128-key block, else 4;
    * two pipeline stages, also when all keys fit one block: the pipeliner then copies
      K and V to shared memory asynchronously, without a register round trip (one stage
      spills at d 80-128, N = 77); one stage for fp32 (twice the bytes per tile), for 512
      value columns (the two-source form at d = 160) and for 256-wide head tiles on a
      single key block (d = 160, N = 77: two stages need 176 KB on sm_80, 288 KB on sm_90).

    Head and value columns: BLOCK_D + BLOCK_D_TAIL and BLOCK_DV + BLOCK_DV_TAIL
    (head_tiles), with the exceptions noted in the body where the split spilled; the rules
    above read the padded power-of-two widths.

    ``controls``: bias, prob_mult or region labels (more live state in the main loop).
    ``accumulators``: output tiles a program keeps (2 for the two-source form, the fan-out
    width), which count like a wider value tile.

    Memoised: a pipeline calls it with a handful of distinct shapes, on every launch, and
    the launch's host time is what small cross-attention calls are made of. Callers must
    not mutate the returned dict.
    """
    # Tiles, warps and stages are chosen by the padded power-of-two widths (the classes the
    # spill sweep was run for); the head columns themselves are split (head_tiles), which
    # narrows the q, k tiles and the QKᵀ products. Captures at head dims up to 64 with
    # N <= 128 keep one padded tile: split, d 40 spilled 16 B of stack on sm_80 (captures)
    # and 8 B on sm_90 (the two-source form).
    block_d = _pow2_at_least_16(head_dim)
    block_dv = _pow2_at_least_16(value_dim)
    keep_padded = captures and block_d <= 64 and num_keys <= 128
    d_main, d_tail = (block_d, 0) if keep_padded else head_tiles(head_dim)
    width = block_dv * accumulators
    # Captures and controls (bias, prob_mult, region labels) hold extra tiles in the main
    # loop: plain attention's 128-row, 4-warp tiles spilled with controls alone at N = 77
    # (150-1100 B of stack at d 40-128).
    heavy = captures or controls
    narrow = max(block_d, width) <= 64 and elem_size == 2 and not heavy
    wide = max(block_d, width) >= 256
    single_key_block = num_keys <= (64 if probes or (controls and not captures) or (captures and (block_d <= 64 or wide))
                                     else 128)
    block_n = _pow2_at_least_16(num_keys) if single_key_block else 64
    if narrow:
        block_m = 128
    elif width >= 512 or (probes and wide):
        block_m = 16
    elif ((probes and head_dim != 64) or (wide and (single_key_block or heavy or accumulators > 2))
          or (accumulators > 1 and captures)):
        block_m = 32
    else:
        block_m = 64
    big_tile = block_m * max(block_n, width) >= 128 * 128
    # Value columns split likewise (every accumulator a main and a tail part) only for
    # plain attention (one accumulator, no control, no capture), and not for 256-wide tiles
    # on one key block: with controls, captures, fan-out, the two-source form or d 160 at
    # N <= 128 the split accumulators spilled (8-600 B of stack on sm_80 or sm_90).
    split_values = not (captures or controls) and accumulators == 1 and not (wide and single_key_block)
    dv_main, dv_tail = head_tiles(value_dim) if split_values else (block_dv, 0)
    return dict(
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=d_main,
        BLOCK_D_TAIL=d_tail,
        BLOCK_DV=dv_main,
        BLOCK_DV_TAIL=dv_tail,
        BLOCK_T=min(64, _pow2_at_least_16(num_tokens)),
        # 8 warps also for a head-dim tail on one 128-key block: d 72, N = 77 spilled with 4.
        num_warps=8 if block_m == 128 or big_tile or wide or heavy or (d_tail and single_key_block) else 4,
        num_stages=1 if elem_size == 4 or width >= 512 or (single_key_block and block_d >= 256) else 2,
    )


def stride_alignment(element_size: int, *tensors) -> int:
    """The ALIGN of the kernel: 16 bytes in elements when every batch, head and row stride
    (dims 0-2) of ``tensors`` (None skipped) is a multiple of it and one of them is not a
    multiple of 16 elements, else 1. diffusers' (B, M, H, D) views at D = 40, 72, 80 have head
    strides of 40, 72, 80 elements: 16-byte multiples at 2 bytes per element, which Triton's
    own specialisation (ints divisible by 16) misses. Where that specialisation already sees
    every stride (D = 64, 128) the hint adds nothing but the instructions that state it
    (which tipped d 128 at N = 77 into spilling 8-24 B on sm_80), so it is left out."""
    align = 16 // element_size
    strides = [s for t in tensors if t is not None for s in t.stride()[:3]]
    if any(s % align for s in strides) or all(s % 16 == 0 for s in strides):
        return 1
    return align


_NO_CAPTURE_STRIDES = (0,) * 17   # token_mass 3, maps 3, head_maps 4, lse 3, tokens 2, head_weights 2


def kernel_arguments(q, k, v, out, *, scale: float, bias: Optional[torch.Tensor],
                     prob_mult: Optional[torch.Tensor], capture: Optional[Capture],
                     regions: Optional[Regions] = None, source: Optional[torch.Tensor] = None,
                     own: Optional[OwnTerm] = None, fanout: Optional[torch.Tensor] = None):
    """(grid, positional arguments, compile-time arguments) of one kernel launch.

    ``fanout``: a table from :func:`fanout_table` (used in place of ``source``)."""
    B, H, M, D = q.shape
    N, DV = k.shape[2], v.shape[3]
    cap = capture if capture is not None else Capture()
    own_values = own.values if own is not None else None
    own_pm = own.prob_mult if own is not None else None
    own_cap = own.capture if own is not None and own.capture is not None else Capture()
    tokens = cap.tokens if cap.wants_token_columns else None
    own_tokens = own_cap.tokens if own_cap.wants_token_columns else None
    T = tokens.shape[-1] if tokens is not None else 0
    T_own = own_tokens.shape[-1] if own_tokens is not None else 0
    fan = fanout.shape[1] - 1 if fanout is not None else 1
    probes = cap.probe_keys is not None and cap.probe_mass is not None
    controls = bias is not None or prob_mult is not None or regions is not None
    cfg = launch_config(D, DV, N, max(T, T_own), captures=not (cap.empty and own_cap.empty),
                        elem_size=q.element_size(), accumulators=2 if own is not None else fan, probes=probes,
                        controls=controls)
    C = cap.probe_keys.shape[2] if probes else 0
    # Probe blocks: up to 64 probe keys per block (a concept set of a few words fits one).
    block_c = min(64, _pow2_at_least_16(C)) if probes else 16
    labels_q = regions.labels_q if regions is not None else None
    labels_k = regions.labels_k if regions is not None else None
    region_mask = regions is not None and regions.is_mask
    if region_mask:  # the kernel reads the mask as bit sets in the label slots
        labels_q, labels_k = regions.mask_bits
    probe_keys = cap.probe_keys if probes else None
    probe_mass = cap.probe_mass if probes else None

    def ptr(t):  # absent operands get q: their loads are compiled out by the flags below
        return t if t is not None else q

    def capture_strides(c: Capture, column_tokens):
        if c.empty:
            return _NO_CAPTURE_STRIDES
        return (*broadcast_strides(c.token_mass, 3), *broadcast_strides(c.maps, 3),
                *broadcast_strides(c.head_maps, 4), *broadcast_strides(c.lse, 3),
                *broadcast_strides(column_tokens, 2), *broadcast_strides(c.head_weights, 2))

    args = [
        q, k, v, out, ptr(bias), ptr(prob_mult), ptr(cap.token_mass), ptr(cap.maps),
        ptr(cap.head_maps), ptr(cap.lse), ptr(tokens), ptr(cap.head_weights),
        ptr(labels_q), ptr(labels_k), ptr(probe_keys), ptr(probe_mass), ptr(source),
        ptr(own_values), ptr(own_pm), ptr(own_cap.token_mass), ptr(own_cap.maps), ptr(own_cap.head_maps),
        ptr(own_cap.lse), ptr(own_tokens), ptr(own_cap.head_weights), ptr(fanout),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *broadcast_strides(bias, 4), *broadcast_strides(prob_mult, 4),
        *capture_strides(cap, tokens),
        *broadcast_strides(labels_q, 2), *broadcast_strides(labels_k, 2),
        *broadcast_strides(probe_keys, 4), *broadcast_strides(probe_mass, 3),
        *broadcast_strides(own_values, 4), *broadcast_strides(own_pm, 4),
        *capture_strides(own_cap, own_tokens),
        fanout.stride(0) if fanout is not None else 0,
        H, M, N, T, C, T_own, scale * LOG2E,
        float(regions.strength) if regions is not None and not region_mask else 0.0,
        *cap.row_range(B), *own_cap.row_range(B),
    ]
    meta = dict(
        D=D, DV=DV,
        HAS_BIAS=bias is not None, HAS_PROB_MULT=prob_mult is not None,
        CAPTURE_TOKEN_MASS=cap.token_mass is not None, CAPTURE_MAPS=cap.maps is not None,
        CAPTURE_HEAD_MAPS=cap.head_maps is not None, CAPTURE_LSE=cap.lse is not None,
        HAS_HEAD_WEIGHTS=cap.head_weights is not None,
        SINGLE_KEY_BLOCK=N <= cfg["BLOCK_N"],
        # fp32 inputs must not be rounded to tf32 on tensor cores: the contract is fp32-exact.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        HAS_REGIONS=regions is not None and not region_mask, HAS_REGION_MASK=region_mask,
        CAPTURE_PROBES=probes,
        BLOCK_C=block_c, SINGLE_PROBE_BLOCK=C <= block_c,
        HAS_SOURCE=source is not None,
        HAS_OWN=own is not None, HAS_OWN_PROB_MULT=own_pm is not None,
        OWN_CAPTURE_TOKEN_MASS=own_cap.token_mass is not None, OWN_CAPTURE_MAPS=own_cap.maps is not None,
        OWN_CAPTURE_HEAD_MAPS=own_cap.head_maps is not None, OWN_CAPTURE_LSE=own_cap.lse is not None,
        OWN_HAS_HEAD_WEIGHTS=own_cap.head_weights is not None,
        FANOUT=fan,
        # Probes (HRV construction) and uncaptured controls (paint, scaling, Reweight) keep
        # unhinted loads: their tiles sit at the register cap, and with the hint ptxas spilled
        # (probes 16 B at d 40 on sm_90 with Triton 3.9, controls 8 B at d 40, N = 77 on sm_80
        # with Triton 3.6; tests/compile_kernel.py).
        ALIGN=1 if probes or (controls and cap.empty and own_cap.empty)
        else stride_alignment(q.element_size(), q, k, v, out, own_values),
        **cfg,
    )
    programs = fanout.shape[0] if fanout is not None else B
    grid = (_cdiv(M, cfg["BLOCK_M"]), programs * H)
    return grid, args, meta


# The fan-out kernel keeps one output tile per destination: at most 4, and at most 256
# value columns in all (so d = 160 never fans out, d = 80 pairs, d <= 64 takes four).
MAX_FANOUT, MAX_FANOUT_COLUMNS = 4, 256
_fanout_memo: list = []


def fanout_width(value_dim: int, largest_group: int) -> int:
    """Destinations per fan-out program (2 or 4), or 1 when fanning out does not apply."""
    cap = min(MAX_FANOUT, MAX_FANOUT_COLUMNS // _pow2_at_least_16(value_dim))
    if largest_group < 2 or cap < 2:
        return 1
    return min(cap, _next_pow2(largest_group))


def fanout_table(source: torch.Tensor, value_dim: int) -> Optional[torch.Tensor]:
    """Injection grouped by logit item: rows [item, destinations...] (-1 pads) covering
    every batch item once, or None when no item gives its P to two.

    Reading ``source`` syncs the device once per (tensor, version): controllers reuse one
    source tensor for all the layers of a step."""
    for t, version, dim, table in _fanout_memo:
        if t is source and version == source._version and dim == value_dim:
            return table
    groups: dict = {}
    for b, s in enumerate(source.tolist()):
        groups.setdefault(s, []).append(b)
    width = fanout_width(value_dim, max(len(g) for g in groups.values()))
    table = None
    if width > 1:
        rows = [[s] + (dests[i:i + width] + [-1] * width)[:width]
                for s, dests in groups.items() for i in range(0, len(dests), width)]
        table = torch.tensor(rows, dtype=torch.int32).to(source.device, non_blocking=True)
    _fanout_memo[:] = _fanout_memo[-15:] + [(source, source._version, value_dim, table)]
    return table


def attention_triton(q, k, v, *, scale: float, bias: Optional[torch.Tensor],
                     prob_mult: Optional[torch.Tensor], capture: Optional[Capture],
                     regions: Optional[Regions] = None, source: Optional[torch.Tensor] = None,
                     own: Optional[OwnTerm] = None) -> torch.Tensor:
    out = empty_output(q, v.shape[3])
    fanout = None
    per_item_work = (prob_mult is not None or regions is not None or own is not None
                     or (capture is not None and not capture.empty))
    if source is not None and not per_item_work:
        fanout = fanout_table(source, v.shape[3])
    grid, args, meta = kernel_arguments(q, k, v, out, scale=scale, bias=bias, prob_mult=prob_mult,
                                        capture=capture, regions=regions,
                                        source=source if fanout is None else None, own=own, fanout=fanout)
    _attention_launches.launch(grid, args, meta)
    return out


# The launches of attention_fwd_kernel, prepared per call signature: its pointer arguments
# come first, up to the strides of q (see kernel_arguments).
_attention_launches = PreparedKernel(attention_fwd_kernel, pointers=attention_fwd_kernel.arg_names.index("stride_qb"),
                                     floats=("qk_scale_log2", "region_strength"))


def logit_max_arguments(q, k, partial):
    """(grid, positional arguments, compile-time arguments) of a logit_max launch into
    ``partial`` (B*H, number of query blocks) fp32."""
    B, H, M, D = q.shape
    N = k.shape[2]
    cfg = logit_max_config(D, N, M)
    args = [q, k, partial, *q.stride(), *k.stride(), *partial.stride(), H, M, N]
    meta = dict(D=D, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **cfg)
    grid = (_cdiv(M, cfg["BLOCK_M"]), B * H)
    return grid, args, meta


def logit_max_config(head_dim: int, num_keys: int, num_queries: int) -> dict:
    d_main, d_tail = head_tiles(head_dim)
    return dict(BLOCK_M=64, BLOCK_N=min(64, _pow2_at_least_16(num_keys)),
                BLOCK_D=d_main, BLOCK_D_TAIL=d_tail, num_warps=4, num_stages=2)


def logit_max_triton(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """max over (m, n) of q·k per (b, h): (B, H) fp32, never storing QKᵀ."""
    B, H, M, _ = q.shape
    blocks = _cdiv(M, logit_max_config(q.shape[3], k.shape[2], M)["BLOCK_M"])
    partial = torch.empty(B * H, blocks, dtype=torch.float32, device=q.device)
    grid, args, meta = logit_max_arguments(q, k, partial)
    logit_max_kernel[grid](*args, **meta)
    return partial.amax(dim=1).view(B, H)
