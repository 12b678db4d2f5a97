"""Backward of the fused attention (Triton, FlashAttention-2 style): no (M, N) tensor.

The forward saved the output O and the row log-sum-exp L (natural log). With
S = s·q·kᵀ + bias, P = exp(S - L), F the numerator factor (prob_mult × regions factor)
and O = (P∘F)·V, for an upstream dO and, optionally, an upstream G[b,h,m,t] on the
per-head maps P[b,h,m,tokens[b,t]]:

    dV = (P∘F)ᵀ·dO
    dP = (dO·Vᵀ)∘F + Σ_t G[:, t]·[n = tokens[t]]          (maps read P before F)
    dS = P∘(dP - Δ),   Δ = rowsum(P∘dP) = rowsum(dO∘O) + Σ_t G[:, t]·P[:, tokens[t]]
    dq = s·dS·K,  dK = s·dSᵀ·q,  dBias = dS summed over the bias's broadcast dims

Δ is a per-row scalar computed by the launcher before these kernels (FlashAttention's D;
the maps add their own per-row term). P is recomputed per tile from q, K, bias and L in
both kernels:

* ``attention_bwd_dkdv_kernel``: one program per (key block, batch·head, query split)
  accumulates dK and dV over its share of the query blocks and adds them atomically into
  fp32 buffers (several splits keep the GPU busy when N is one key block, N = 77).
* ``attention_bwd_dq_kernel``: one program per (query block, batch·head) accumulates dq
  over all key blocks and adds dS into the fp32 bias gradient (reduced in registers over
  a broadcast query or key axis, atomically over broadcast batch/head axes).
"""
import triton
import triton.language as tl

from .attention import _numerator


@triton.jit
def _region_keep(region_q, lk_base, offs_n, mask_n, stride_lk_n, region_strength):
    """1 - s·[r_q >= 0, r_k >= 0, r_q != r_k] for one tile."""
    region_k = tl.load(lk_base + offs_n * stride_lk_n, mask=mask_n, other=-1)
    differ = (region_q[:, None] >= 0) & (region_k[None, :] >= 0) & (region_q[:, None] != region_k[None, :])
    return tl.where(differ, 1.0 - region_strength, 1.0)


@triton.jit
def _tile_gradients(
    q, do, k, v, lse_log2, delta, bias_base, pm_base, lk_base, region_q, g_base, tok_base,
    offs_m, mask_m, offs_n, mask_n, T,
    stride_bias_m, stride_bias_n, stride_pm_m, stride_pm_n, stride_lk_n, stride_g_m, stride_g_t, stride_tok_t,
    qk_scale_log2, region_strength,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PROB_MULT: tl.constexpr, HAS_REGIONS: tl.constexpr,
    HAS_MAP_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """(P∘F, dS) of one (query block, key block) tile, both fp32; k (BLOCK_N, BLOCK_D) and
    v (BLOCK_N, BLOCK_DV) are the key block's rows, already loaded by the caller."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
    if HAS_BIAS:
        bias = tl.load(bias_base + offs_m[:, None] * stride_bias_m + offs_n[None, :] * stride_bias_n,
                       mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        s += bias.to(tl.float32) * 1.4426950408889634
    # Keys past N get P = 0; rows past M (lse 0, logits 0) would give P = 1: zero them too.
    p = tl.where(mask_m[:, None] & mask_n[None, :], tl.exp2(s - lse_log2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    pf = p
    if HAS_PROB_MULT or HAS_REGIONS:
        region_keep = 1.0
        if HAS_REGIONS:
            region_keep = _region_keep(region_q, lk_base, offs_n, mask_n, stride_lk_n, region_strength)
        factor = _numerator(tl.full([BLOCK_M, BLOCK_N], 1.0, tl.float32), pm_base, offs_m, mask_m, offs_n, mask_n,
                            stride_pm_m, stride_pm_n, region_keep, HAS_PROB_MULT, HAS_REGIONS)
        pf = p * factor
        dp = dp * factor
    if HAS_MAP_GRAD:
        # The maps read P before F: their upstream enters dP at the captured columns only.
        for t in range(0, T):
            col = tl.load(tok_base + t * stride_tok_t)
            g = tl.load(g_base + offs_m * stride_g_m + t * stride_g_t, mask=mask_m, other=0.0)
            dp += tl.where(offs_n[None, :] == col, g[:, None], 0.0)
    ds = p * (dp - delta[:, None])
    return pf, ds


@triton.jit
def _rows(base, offs, mask, stride_row, stride_col, COLS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Rows ``offs`` of a (rows, COLS) matrix (q, dO, k or v of one head) as a tile, 0 outside."""
    offs_c = tl.arange(0, BLOCK_COLS)
    return tl.load(base + offs[:, None] * stride_row + offs_c[None, :] * stride_col,
                   mask=mask[:, None] & (offs_c[None, :] < COLS), other=0.0)


@triton.jit
def _row_statistics(Lse, Delta, LabelsQ, b, h, H, M, offs_m, mask_m, stride_lse_b, stride_lse_h, stride_lse_m,
                    stride_lq_b, stride_lq_m, HAS_REGIONS: tl.constexpr):
    """Per query row: log2-domain LSE, Δ and the region label (-1 without regions)."""
    lse = tl.load(Lse + b * stride_lse_b + h * stride_lse_h + offs_m * stride_lse_m, mask=mask_m, other=0.0)
    # A fully masked row has L = -inf and logits -inf: a finite reference gives P = 0.
    lse_log2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    delta = tl.load(Delta + (b * H + h) * M + offs_m, mask=mask_m, other=0.0)
    region_q = tl.full(offs_m.shape, -1, tl.int32)
    if HAS_REGIONS:
        region_q = tl.load(LabelsQ + b * stride_lq_b + offs_m * stride_lq_m, mask=mask_m, other=-1)
    return lse_log2, delta, region_q


@triton.jit
def _head_bases(K, V, Bias, ProbMult, LabelsK, GradHeadMaps, Tokens, b, h, stride_kb, stride_kh, stride_vb, stride_vh,
                stride_bias_b, stride_bias_h, stride_pm_b, stride_pm_h, stride_lk_b, stride_g_b, stride_g_h,
                stride_tok_b):
    """Base addresses of (batch b, head h) in the operands both kernels read per tile."""
    return (K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
            Bias + b * stride_bias_b + h * stride_bias_h, ProbMult + b * stride_pm_b + h * stride_pm_h,
            LabelsK + b * stride_lk_b, GradHeadMaps + b * stride_g_b + h * stride_g_h, Tokens + b * stride_tok_b)


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, Bias, ProbMult, LabelsQ, LabelsK, GradHeadMaps, Tokens, GradK, GradV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lse_b, stride_lse_h, stride_lse_m,
    stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
    stride_pm_b, stride_pm_h, stride_pm_m, stride_pm_n,
    stride_lq_b, stride_lq_m, stride_lk_b, stride_lk_n,
    stride_g_b, stride_g_h, stride_g_m, stride_g_t,
    stride_tok_b, stride_tok_t,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, M, N, T, SPLITS, qk_scale_log2, scale, region_strength,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PROB_MULT: tl.constexpr, HAS_REGIONS: tl.constexpr,
    HAS_MAP_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_base, v_base, bias_base, pm_base, lk_base, g_base, tok_base = _head_bases(
        K, V, Bias, ProbMult, LabelsK, GradHeadMaps, Tokens, b, h, stride_kb, stride_kh, stride_vb, stride_vh,
        stride_bias_b, stride_bias_h, stride_pm_b, stride_pm_h, stride_lk_b, stride_g_b, stride_g_h, stride_tok_b)

    k = _rows(k_base, offs_n, mask_n, stride_kn, stride_kd, D, BLOCK_D)
    v = _rows(v_base, offs_n, mask_n, stride_vn, stride_vd, DV, BLOCK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for start_m in range(split * BLOCK_M, M, SPLITS * BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        q = _rows(Q + b * stride_qb + h * stride_qh, offs_m, mask_m, stride_qm, stride_qd, D, BLOCK_D)
        do = _rows(DO + b * stride_dob + h * stride_doh, offs_m, mask_m, stride_dom, stride_dod, DV, BLOCK_DV)
        lse_log2, delta, region_q = _row_statistics(
            Lse, Delta, LabelsQ, b, h, H, M, offs_m, mask_m, stride_lse_b, stride_lse_h, stride_lse_m,
            stride_lq_b, stride_lq_m, HAS_REGIONS)
        pf, ds = _tile_gradients(
            q, do, k, v, lse_log2, delta, bias_base, pm_base, lk_base, region_q, g_base, tok_base,
            offs_m, mask_m, offs_n, mask_n, T,
            stride_bias_m, stride_bias_n, stride_pm_m, stride_pm_n, stride_lk_n, stride_g_m, stride_g_t, stride_tok_t,
            qk_scale_log2, region_strength, BLOCK_M, BLOCK_N,
            HAS_BIAS, HAS_PROB_MULT, HAS_REGIONS, HAS_MAP_GRAD, DOT_PRECISION)
        dv += tl.dot(tl.trans(pf.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)

    mask_nd = mask_n[:, None] & (offs_d[None, :] < D)
    tl.atomic_add(GradK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
                  dk * scale, mask=mask_nd, sem="relaxed")
    mask_ndv = mask_n[:, None] & (offs_dv[None, :] < DV)
    tl.atomic_add(GradV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn
                  + offs_dv[None, :] * stride_dvd, dv, mask=mask_ndv, sem="relaxed")


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, Bias, ProbMult, LabelsQ, LabelsK, GradHeadMaps, Tokens, GradQ, GradBias,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lse_b, stride_lse_h, stride_lse_m,
    stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
    stride_pm_b, stride_pm_h, stride_pm_m, stride_pm_n,
    stride_lq_b, stride_lq_m, stride_lk_b, stride_lk_n,
    stride_g_b, stride_g_h, stride_g_m, stride_g_t,
    stride_tok_b, stride_tok_t,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_db_b, stride_db_h, stride_db_m, stride_db_n,
    H, M, N, T, qk_scale_log2, scale, region_strength,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PROB_MULT: tl.constexpr, HAS_REGIONS: tl.constexpr,
    HAS_MAP_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BIAS_GRAD: tl.constexpr = False, DBIAS_ROWS_SHARED: tl.constexpr = False,
    DBIAS_COLS_SHARED: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_d = tl.arange(0, BLOCK_D)
    q = _rows(Q + b * stride_qb + h * stride_qh, offs_m, mask_m, stride_qm, stride_qd, D, BLOCK_D)
    do = _rows(DO + b * stride_dob + h * stride_doh, offs_m, mask_m, stride_dom, stride_dod, DV, BLOCK_DV)
    lse_log2, delta, region_q = _row_statistics(
        Lse, Delta, LabelsQ, b, h, H, M, offs_m, mask_m, stride_lse_b, stride_lse_h, stride_lse_m,
        stride_lq_b, stride_lq_m, HAS_REGIONS)
    k_base, v_base, bias_base, pm_base, lk_base, g_base, tok_base = _head_bases(
        K, V, Bias, ProbMult, LabelsK, GradHeadMaps, Tokens, b, h, stride_kb, stride_kh, stride_vb, stride_vh,
        stride_bias_b, stride_bias_h, stride_pm_b, stride_pm_h, stride_lk_b, stride_g_b, stride_g_h, stride_tok_b)
    db_base = GradBias + b * stride_db_b + h * stride_db_h

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        k = _rows(k_base, offs_n, mask_n, stride_kn, stride_kd, D, BLOCK_D)
        v = _rows(v_base, offs_n, mask_n, stride_vn, stride_vd, DV, BLOCK_DV)
        _, ds = _tile_gradients(
            q, do, k, v, lse_log2, delta, bias_base, pm_base, lk_base, region_q, g_base, tok_base,
            offs_m, mask_m, offs_n, mask_n, T,
            stride_bias_m, stride_bias_n, stride_pm_m, stride_pm_n, stride_lk_n, stride_g_m, stride_g_t, stride_tok_t,
            qk_scale_log2, region_strength, BLOCK_M, BLOCK_N,
            HAS_BIAS, HAS_PROB_MULT, HAS_REGIONS, HAS_MAP_GRAD, DOT_PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        if BIAS_GRAD:
            # Sum over a broadcast (size-1) query or key axis here; broadcast batch or head
            # axes are summed by the atomics of the programs that share the address.
            if DBIAS_ROWS_SHARED and DBIAS_COLS_SHARED:
                tl.atomic_add(db_base, tl.sum(tl.sum(ds, 1), 0), sem="relaxed")
            elif DBIAS_ROWS_SHARED:
                tl.atomic_add(db_base + offs_n * stride_db_n, tl.sum(ds, 0), mask=mask_n, sem="relaxed")
            elif DBIAS_COLS_SHARED:
                tl.atomic_add(db_base + offs_m * stride_db_m, tl.sum(ds, 1), mask=mask_m, sem="relaxed")
            else:
                tl.atomic_add(db_base + offs_m[:, None] * stride_db_m + offs_n[None, :] * stride_db_n, ds,
                              mask=mask_m[:, None] & mask_n[None, :], sem="relaxed")
    tl.store(GradQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             (dq * scale).to(GradQ.dtype.element_ty), mask=mask_m[:, None] & (offs_d[None, :] < D))
