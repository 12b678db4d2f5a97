"""Fused attention-control forward kernel (Triton).

One program owns BLOCK_M query rows of one (batch, head). It runs flash-style online
softmax over key blocks, applying the additive ``bias`` before the softmax and the
``prob_mult`` factor after it (numerator only), then writes

    O = (Σ_n exp(S - m) · f · v) / Σ_n exp(S - m)

Statistics of P (before f) are added into fp32 caller buffers:

* token mass Σ_m P (B, H, N): when every key fits one block the last running sum *is*
  the final normaliser, so it is taken in the main loop; otherwise a second pass over
  all key blocks recomputes S and normalises with the final (m, l): one extra QKᵀ, no PV.
* maps / head maps at token columns: after the main loop, the captured key columns are
  gathered and their logits recomputed against the final (m, l) — an extra
  BLOCK_M × D × T product, whatever N is. (Taking them from the main loop's P tile when
  every key fits one block keeps that tile live through the capture work: selected by
  tl.gather it lowers to kilobytes of per-thread stack, by a one-hot product it spills
  at d 80 on sm_80 unless the tile has 16 rows; measured with tests/compile_kernel.py.)
* row log-sum-exp.
* auxiliary-key probes Σ_m softmax_c(s · q · probe_keys) (B, H, C): a softmax over the
  probe keys only, from the q block already in registers, after the main loop. One probe
  block: single pass; more: a first pass for the row max and sum (online), a second for
  the normalised values.

Captured rows: captures apply only to batch items in [capture_rows_start,
capture_rows_stop) (own term: [own_rows_start, own_rows_stop)); a program of another item
skips every capture (no token mass, no column gather or recompute, no probe softmax, no
buffer access) by a uniform branch.

Injection (``HAS_SOURCE``): program (b, h) loads q, k and bias of batch item Source[b]
and v, prob_mult, region labels and capture/output addresses of b, so b's output is
P_src · f · V_b and b's captures record that P (prompt-to-prompt).

Two-source form (``HAS_OWN``): the same pass also runs item b's own logits with a second
online softmax (its own m, l, accumulator) over the second value tensor, and adds the two
normalised terms: O_b = (P_src·f)·V_b + (P_b·f_own)·V_own_b. Each term has its captures.

Fan-out (``FANOUT`` > 1, injection with no per-item factor or capture): a program owns one
logit item and up to FANOUT destination items that all take its P (prompt-to-prompt's
self-attention P_tgt ← P_src together with the source itself); QKᵀ and the softmax run
once and only the P·V products repeat, per destination.

Region labels (``HAS_REGIONS``) multiply the numerator by 1 - s·[r_q >= 0, r_k >= 0,
r_q != r_k], computed per tile from the two label vectors (no (M, N) mask in memory).

Region mask (``HAS_REGION_MASK``, attnctl.Regions with ``allowed``): LabelsQ / LabelsK hold
bit sets instead (Regions.mask_bits): query m may attend key n iff their AND is non-zero,
else its logit is -inf. A key block in which no query row of the program may attend any
key (the OR of the query bits and the OR of the key bits share no bit) is skipped: no
QKᵀ, no PV, no capture work. The recomputed logits of the captures get the same mask.

``logit_max_kernel`` reduces max over (m, n) of the unscaled q·k per (batch, head) and
query block with the same logit helper, without storing QKᵀ.

Head and value columns: tl.arange and tl.dot need power-of-two widths, so a head dim D
that is not one is split into a power-of-two main tile (BLOCK_D) and a tail
(BLOCK_D_TAIL >= 16; 0 when one tile is no wider): q·kᵀ = q_main·k_mainᵀ + q_tail·k_tailᵀ
in one MMA accumulation, so only the tail's columns past D are padding (72 = 64 + 16: 8
padded columns, not 56). The value columns split the same way (BLOCK_DV, BLOCK_DV_TAIL;
the launcher gives a tail to plain attention only): every output accumulator is a
(main, tail) pair, P·V one product per part.

Logits live in the log2 domain (scale folded with log2 e) so the kernel uses exp2.
A row whose logits are all -inf has l = 0: its output, P and maps are 0 and its LSE -inf.
"""
import triton
import triton.language as tl

# log2(e): the launcher folds it into the softmax scale; literals inside @jit bodies
# below are log2(e) and ln(2) (module globals are not visible to every Triton version).
LOG2E = 1.4426950408889634


@triton.jit
def _head_tile(base, rows, row_mask, stride_row, stride_col, START: tl.constexpr, WIDTH: tl.constexpr,
               D: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """Head-dim columns [START, START + WIDTH) of ``rows``: (rows, WIDTH), or (WIDTH, rows)
    if TRANSPOSED; masked rows and columns past D read 0. A tile that ends within D loads
    without a column mask."""
    offs = START + tl.arange(0, WIDTH)
    if TRANSPOSED:
        ptrs = base + rows[None, :] * stride_row + offs[:, None] * stride_col
        mask = row_mask[None, :]
        if START + WIDTH > D:
            mask = mask & (offs[:, None] < D)
    else:
        ptrs = base + rows[:, None] * stride_row + offs[None, :] * stride_col
        mask = row_mask[:, None]
        if START + WIDTH > D:
            mask = mask & (offs[None, :] < D)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _multiple_of(stride, ALIGN: tl.constexpr):
    """``stride``, stated to the compiler as a multiple of ALIGN elements (the launcher has
    checked that it is). Triton marks an integer argument divisible only by 16, so the head
    stride of a (B, M, H, D) view with D = 40 or 80 reads as 1-divisible, the address of
    every (batch, head) row as 2-byte aligned, and every q / k / v / out access as a scalar
    16-bit one; (stride // ALIGN) * ALIGN carries the divisibility that lets them be 16-byte
    vectors and asynchronous copies."""
    if ALIGN > 1:
        return (stride // ALIGN) * ALIGN
    return stride


@triton.jit
def _logits_log2(q, q_tail, k_base, bias_base, offs_m, mask_m, cols, col_mask,
                 stride_kn, stride_kd, stride_bias_m, stride_bias_n, qk_scale_log2,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D_TAIL: tl.constexpr, HAS_BIAS: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """log2-domain logits of the query block (head columns split as q | q_tail) against key
    columns ``cols`` (-inf where masked)."""
    k_t = _head_tile(k_base, cols, col_mask, stride_kn, stride_kd, 0, BLOCK_D, D, True)
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION)
    if BLOCK_D_TAIL > 0:
        k_tail_t = _head_tile(k_base, cols, col_mask, stride_kn, stride_kd, BLOCK_D, BLOCK_D_TAIL, D, True)
        s = tl.dot(q_tail, k_tail_t, s, input_precision=DOT_PRECISION)
    s = s * qk_scale_log2
    if HAS_BIAS:
        bias = tl.load(bias_base + offs_m[:, None] * stride_bias_m + cols[None, :] * stride_bias_n,
                       mask=mask_m[:, None] & col_mask[None, :], other=0.0)
        s += bias.to(tl.float32) * 1.4426950408889634
    return tl.where(col_mask[None, :], s, float("-inf"))


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _region_masked(s, query_bits, key_bits):
    """Logits of (query, key) pairs whose region bits share no bit become -inf."""
    return tl.where((query_bits[:, None] & key_bits[None, :]) != 0, s, float("-inf"))


@triton.jit
def _online_softmax_step(s, m_i, l_i):
    """One key block of the online softmax: (p = exp2(s - m_new), rescale α, m_new, l_new)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with only -inf so far keeps a finite reference so exp2 gives 0, not NaN.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _add_token_mass_of_block(tm_base, p, l_i, mask_m, offs_n, mask_n, stride_tm_n):
    """Token mass of a block whose running sum l_i is already the final normaliser."""
    inv_l = tl.where(mask_m & (l_i > 0), 1.0 / l_i, 0.0)
    tl.atomic_add(tm_base + offs_n * stride_tm_n, tl.sum(p * inv_l[:, None], 0), mask=mask_n, sem="relaxed")


@triton.jit
def _numerator(p, pm_base, offs_m, mask_m, offs_n, mask_n, stride_pm_m, stride_pm_n, region_keep,
               HAS_PROB_MULT: tl.constexpr, HAS_REGIONS: tl.constexpr):
    """p · f · region factor: the post-softmax factors (numerator only)."""
    if HAS_PROB_MULT:
        f = tl.load(pm_base + offs_m[:, None] * stride_pm_m + offs_n[None, :] * stride_pm_n,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        p = p * f.to(tl.float32)
    if HAS_REGIONS:
        p = p * region_keep
    return p


@triton.jit
def _accumulators(BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DV_TAIL: tl.constexpr):
    """A zeroed output accumulator, its value columns split as (main, tail); with no tail
    the second stands in for the argument of _pv_update and _store_rows (never stored)."""
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc_tail = acc
    if BLOCK_DV_TAIL > 0:
        acc_tail = tl.zeros([BLOCK_M, BLOCK_DV_TAIL], dtype=tl.float32)
    return acc, acc_tail


@triton.jit
def _pv_update(acc, acc_tail, alpha, p, v_base, offs_n, mask_n, stride_vn, stride_vd,
               DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DV_TAIL: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """acc·α + p·V for the value rows of one key block, on the main and tail columns."""
    v = _head_tile(v_base, offs_n, mask_n, stride_vn, stride_vd, 0, BLOCK_DV, DV)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    if BLOCK_DV_TAIL > 0:
        v_tail = _head_tile(v_base, offs_n, mask_n, stride_vn, stride_vd, BLOCK_DV, BLOCK_DV_TAIL, DV)
        acc_tail = acc_tail * alpha[:, None] + tl.dot(p.to(v_tail.dtype), v_tail, input_precision=DOT_PRECISION)
    return acc, acc_tail


@triton.jit
def _store_columns(out_base, out, offs_m, mask_m, stride_om, stride_od, START: tl.constexpr,
                   WIDTH: tl.constexpr, DV: tl.constexpr):
    """Stores ``out`` into value columns [START, START + WIDTH) of the rows (none past DV)."""
    offs = START + tl.arange(0, WIDTH)
    mask = mask_m[:, None]
    if START + WIDTH > DV:
        mask = mask & (offs[None, :] < DV)
    tl.store(out_base + offs_m[:, None] * stride_om + offs[None, :] * stride_od,
             out.to(out_base.dtype.element_ty), mask=mask)


@triton.jit
def _store_rows(out_base, out, out_tail, offs_m, mask_m, stride_om, stride_od,
                DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DV_TAIL: tl.constexpr):
    _store_columns(out_base, out, offs_m, mask_m, stride_om, stride_od, 0, BLOCK_DV, DV)
    if BLOCK_DV_TAIL > 0:
        _store_columns(out_base, out_tail, offs_m, mask_m, stride_om, stride_od, BLOCK_DV, BLOCK_DV_TAIL, DV)


@triton.jit
def _capture_statistics(
    q, q_tail, k_base, bias_base, m_i, l_i, offs_m, mask_m, b, h, N, T, query_bits, lk_base, stride_lk_n,
    TokenMass, Maps, HeadMaps, Lse, Tokens, HeadWeights,
    stride_kn, stride_kd, stride_bias_m, stride_bias_n,
    stride_tm_b, stride_tm_h, stride_tm_n,
    stride_map_b, stride_map_m, stride_map_t,
    stride_hm_b, stride_hm_h, stride_hm_m, stride_hm_t,
    stride_lse_b, stride_lse_h, stride_lse_m,
    stride_tok_b, stride_tok_t, stride_w_b, stride_w_h, qk_scale_log2,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D_TAIL: tl.constexpr,
    BLOCK_T: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    CAPTURE_TOKEN_MASS: tl.constexpr, CAPTURE_MAPS: tl.constexpr, CAPTURE_HEAD_MAPS: tl.constexpr,
    CAPTURE_LSE: tl.constexpr, HAS_HEAD_WEIGHTS: tl.constexpr, SINGLE_KEY_BLOCK: tl.constexpr,
    HAS_REGION_MASK: tl.constexpr = False,
):
    """The captures that need the final (m, l) of the rows: LSE, token mass when N spans
    several key blocks, maps / head maps at token columns (logits recomputed)."""
    # Rows outside M get inv_l = 0 so they add nothing to any capture.
    inv_l = tl.where(mask_m & (l_i > 0), 1.0 / l_i, 0.0)
    m_ref = tl.where(m_i == float("-inf"), 0.0, m_i)
    if CAPTURE_LSE:
        lse_ptr = Lse + b * stride_lse_b + h * stride_lse_h + offs_m * stride_lse_m
        lse = (m_ref + tl.log2(l_i)) * 0.6931471805599453
        tl.store(lse_ptr, tl.load(lse_ptr, mask=mask_m, other=0.0) + lse, mask=mask_m)

    # Token mass over several key blocks: one extra QKᵀ, no PV.
    if CAPTURE_TOKEN_MASS and not SINGLE_KEY_BLOCK:
        tm_base = TokenMass + b * stride_tm_b + h * stride_tm_h
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            s = _logits_log2(q, q_tail, k_base, bias_base, offs_m, mask_m, offs_n, mask_n,
                             stride_kn, stride_kd, stride_bias_m, stride_bias_n, qk_scale_log2,
                             D, BLOCK_D, BLOCK_D_TAIL, HAS_BIAS, DOT_PRECISION)
            if HAS_REGION_MASK:
                s = _region_masked(s, query_bits, tl.load(lk_base + offs_n * stride_lk_n, mask=mask_n, other=0))
            p = tl.exp2(s - m_ref[:, None]) * inv_l[:, None]
            tl.atomic_add(tm_base + offs_n * stride_tm_n, tl.sum(p, 0), mask=mask_n, sem="relaxed")

    # Maps: recompute the logits of the captured key columns only.
    if CAPTURE_MAPS or CAPTURE_HEAD_MAPS:
        weight = 1.0
        if HAS_HEAD_WEIGHTS:
            weight = tl.load(HeadWeights + b * stride_w_b + h * stride_w_h).to(tl.float32)
        for start_t in range(0, T, BLOCK_T):
            offs_t = start_t + tl.arange(0, BLOCK_T)
            mask_t = offs_t < T
            cols = tl.load(Tokens + b * stride_tok_b + offs_t * stride_tok_t, mask=mask_t, other=0)
            s = _logits_log2(q, q_tail, k_base, bias_base, offs_m, mask_m, cols, mask_t,
                             stride_kn, stride_kd, stride_bias_m, stride_bias_n, qk_scale_log2,
                             D, BLOCK_D, BLOCK_D_TAIL, HAS_BIAS, DOT_PRECISION)
            if HAS_REGION_MASK:
                s = _region_masked(s, query_bits, tl.load(lk_base + cols * stride_lk_n, mask=mask_t, other=0))
            p = tl.exp2(s - m_ref[:, None]) * inv_l[:, None]
            mask_mt = mask_m[:, None] & mask_t[None, :]
            if CAPTURE_HEAD_MAPS:
                hm_ptr = (HeadMaps + b * stride_hm_b + h * stride_hm_h
                          + offs_m[:, None] * stride_hm_m + offs_t[None, :] * stride_hm_t)
                tl.store(hm_ptr, tl.load(hm_ptr, mask=mask_mt, other=0.0) + p, mask=mask_mt)
            if CAPTURE_MAPS:
                # Heads of one batch item add into the same map: atomics.
                map_ptr = (Maps + b * stride_map_b
                           + offs_m[:, None] * stride_map_m + offs_t[None, :] * stride_map_t)
                tl.atomic_add(map_ptr, p * weight, mask=mask_mt, sem="relaxed")


@triton.jit
def attention_fwd_kernel(
    Q, K, V, Out, Bias, ProbMult, TokenMass, Maps, HeadMaps, Lse, Tokens, HeadWeights,
    LabelsQ, LabelsK, ProbeKeys, ProbeMass, Source,
    OwnV, OwnProbMult, OwnTokenMass, OwnMaps, OwnHeadMaps, OwnLse, OwnTokens, OwnHeadWeights,
    Fanout,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
    stride_pm_b, stride_pm_h, stride_pm_m, stride_pm_n,
    stride_tm_b, stride_tm_h, stride_tm_n,
    stride_map_b, stride_map_m, stride_map_t,
    stride_hm_b, stride_hm_h, stride_hm_m, stride_hm_t,
    stride_lse_b, stride_lse_h, stride_lse_m,
    stride_tok_b, stride_tok_t,
    stride_w_b, stride_w_h,
    stride_lq_b, stride_lq_m, stride_lk_b, stride_lk_n,
    stride_pk_b, stride_pk_h, stride_pk_c, stride_pk_d,
    stride_pmass_b, stride_pmass_h, stride_pmass_c,
    stride_ov_b, stride_ov_h, stride_ov_n, stride_ov_d,
    stride_opm_b, stride_opm_h, stride_opm_m, stride_opm_n,
    stride_otm_b, stride_otm_h, stride_otm_n,
    stride_omap_b, stride_omap_m, stride_omap_t,
    stride_ohm_b, stride_ohm_h, stride_ohm_m, stride_ohm_t,
    stride_olse_b, stride_olse_h, stride_olse_m,
    stride_otok_b, stride_otok_t,
    stride_ow_b, stride_ow_h,
    stride_fan,
    H, M, N, T, C, T_OWN, qk_scale_log2, region_strength,
    capture_rows_start, capture_rows_stop, own_rows_start, own_rows_stop,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PROB_MULT: tl.constexpr,
    CAPTURE_TOKEN_MASS: tl.constexpr, CAPTURE_MAPS: tl.constexpr,
    CAPTURE_HEAD_MAPS: tl.constexpr, CAPTURE_LSE: tl.constexpr,
    HAS_HEAD_WEIGHTS: tl.constexpr, SINGLE_KEY_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_REGIONS: tl.constexpr = False, CAPTURE_PROBES: tl.constexpr = False,
    BLOCK_C: tl.constexpr = 16, SINGLE_PROBE_BLOCK: tl.constexpr = True,
    HAS_SOURCE: tl.constexpr = False,
    HAS_OWN: tl.constexpr = False, HAS_OWN_PROB_MULT: tl.constexpr = False,
    OWN_CAPTURE_TOKEN_MASS: tl.constexpr = False, OWN_CAPTURE_MAPS: tl.constexpr = False,
    OWN_CAPTURE_HEAD_MAPS: tl.constexpr = False, OWN_CAPTURE_LSE: tl.constexpr = False,
    OWN_HAS_HEAD_WEIGHTS: tl.constexpr = False,
    FANOUT: tl.constexpr = 1, HAS_REGION_MASK: tl.constexpr = False,
    BLOCK_D_TAIL: tl.constexpr = 0, BLOCK_DV_TAIL: tl.constexpr = 0, ALIGN: tl.constexpr = 1,
):
    # Batch, head and row strides of q, k, v, out and the own values: multiples of ALIGN.
    stride_qb, stride_qh, stride_qm = (_multiple_of(stride_qb, ALIGN), _multiple_of(stride_qh, ALIGN),
                                       _multiple_of(stride_qm, ALIGN))
    stride_kb, stride_kh, stride_kn = (_multiple_of(stride_kb, ALIGN), _multiple_of(stride_kh, ALIGN),
                                       _multiple_of(stride_kn, ALIGN))
    stride_vb, stride_vh, stride_vn = (_multiple_of(stride_vb, ALIGN), _multiple_of(stride_vh, ALIGN),
                                       _multiple_of(stride_vn, ALIGN))
    stride_ob, stride_oh, stride_om = (_multiple_of(stride_ob, ALIGN), _multiple_of(stride_oh, ALIGN),
                                       _multiple_of(stride_om, ALIGN))
    stride_ov_b, stride_ov_h, stride_ov_n = (_multiple_of(stride_ov_b, ALIGN), _multiple_of(stride_ov_h, ALIGN),
                                             _multiple_of(stride_ov_n, ALIGN))
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # int64 so that batch/head offsets of large (B, H, M, N) bias tensors cannot overflow.
    h = (pid_bh % H).to(tl.int64)
    if FANOUT > 1:
        # Fan-out (injection without per-item factors or captures): row c of the table is
        # [logit item, destination items...] (-1 pads); P is computed once from the logit
        # item and applied to each destination's values: one QKᵀ and softmax for all.
        fan_base = Fanout + (pid_bh // H).to(tl.int64) * stride_fan
        src = tl.load(fan_base).to(tl.int64)
        b = tl.load(fan_base + 1).to(tl.int64)
        b1 = tl.load(fan_base + 2).to(tl.int64)
        if FANOUT > 2:
            b2 = tl.load(fan_base + 3).to(tl.int64)
            b3 = tl.load(fan_base + 4).to(tl.int64)
    else:
        b = (pid_bh // H).to(tl.int64)
        # Injection: the logits (q, k, bias) come from batch item src = Source[b]; values,
        # prob_mult, regions, captures and the output stay those of b.
        src = b
        if HAS_SOURCE:
            src = tl.load(Source + b).to(tl.int64)

    # Captures apply to a range of batch items (capture.rows): other items do no capture
    # work at all (a uniform branch per program).
    capture_row = (b >= capture_rows_start) & (b < capture_rows_stop)
    own_capture_row = (b >= own_rows_start) & (b < own_rows_stop)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    # Head columns: a power-of-two main tile and, when D is not one, a tail (BLOCK_D_TAIL
    # > 0) so that QKᵀ computes no more padding than the tail's 16-column granularity.
    # Without a tail, q_tail only stands in for the argument (never read).
    q_base = Q + src * stride_qb + h * stride_qh
    q = _head_tile(q_base, offs_m, mask_m, stride_qm, stride_qd, 0, BLOCK_D, D)
    q_tail = q
    if BLOCK_D_TAIL > 0:
        q_tail = _head_tile(q_base, offs_m, mask_m, stride_qm, stride_qd, BLOCK_D, BLOCK_D_TAIL, D)

    k_base = K + src * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    bias_base = Bias + src * stride_bias_b + h * stride_bias_h
    pm_base = ProbMult + b * stride_pm_b + h * stride_pm_h

    lk_base = LabelsK + b * stride_lk_b
    if HAS_REGIONS:
        # Region of each query row (-1: unlabelled, never scaled).
        region_q = tl.load(LabelsQ + b * stride_lq_b + offs_m * stride_lq_m, mask=mask_m, other=-1)
    query_bits = 0
    if HAS_REGION_MASK:
        # Key labels each row may attend (rows past M: none); their OR decides which key
        # blocks this program visits.
        query_bits = tl.load(LabelsQ + b * stride_lq_b + offs_m * stride_lq_m, mask=mask_m, other=0)
        block_query_bits = tl.reduce(query_bits, 0, _bit_or)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Value columns split like the head columns: every accumulator is a (main, tail) pair.
    acc, acc_t = _accumulators(BLOCK_M, BLOCK_DV, BLOCK_DV_TAIL)
    if FANOUT > 1:
        acc1, acc1_t = _accumulators(BLOCK_M, BLOCK_DV, BLOCK_DV_TAIL)
        if FANOUT > 2:
            acc2, acc2_t = _accumulators(BLOCK_M, BLOCK_DV, BLOCK_DV_TAIL)
            acc3, acc3_t = _accumulators(BLOCK_M, BLOCK_DV, BLOCK_DV_TAIL)
    if HAS_OWN:
        # Two-source form: the second term is item b's own attention, its own normaliser.
        q_own_base = Q + b * stride_qb + h * stride_qh
        q_own = _head_tile(q_own_base, offs_m, mask_m, stride_qm, stride_qd, 0, BLOCK_D, D)
        q_own_tail = q_own
        if BLOCK_D_TAIL > 0:
            q_own_tail = _head_tile(q_own_base, offs_m, mask_m, stride_qm, stride_qd, BLOCK_D, BLOCK_D_TAIL, D)
        k_own_base = K + b * stride_kb + h * stride_kh
        bias_own_base = Bias + b * stride_bias_b + h * stride_bias_h
        v_own_base = OwnV + b * stride_ov_b + h * stride_ov_h
        opm_base = OwnProbMult + b * stride_opm_b + h * stride_opm_h
        m_own = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_own = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc_own, acc_own_t = _accumulators(BLOCK_M, BLOCK_DV, BLOCK_DV_TAIL)

    # ---- main pass: online softmax over key blocks ------------------------------------
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        live = True
        if HAS_REGION_MASK:
            key_bits = tl.load(lk_base + offs_n * stride_lk_n, mask=mask_n, other=0)
            live = (block_query_bits & tl.reduce(key_bits, 0, _bit_or)) != 0
        if live:  # False only for a key block the region mask hides from every row
            s = _logits_log2(q, q_tail, k_base, bias_base, offs_m, mask_m, offs_n, mask_n,
                             stride_kn, stride_kd, stride_bias_m, stride_bias_n, qk_scale_log2,
                             D, BLOCK_D, BLOCK_D_TAIL, HAS_BIAS, DOT_PRECISION)
            if HAS_REGION_MASK:
                s = _region_masked(s, query_bits, key_bits)
            p, alpha, m_i, l_i = _online_softmax_step(s, m_i, l_i)
            region_keep = 1.0
            if HAS_REGIONS:
                region_k = tl.load(lk_base + offs_n * stride_lk_n, mask=mask_n, other=-1)
                differ = ((region_q[:, None] >= 0) & (region_k[None, :] >= 0)
                          & (region_q[:, None] != region_k[None, :]))
                region_keep = tl.where(differ, 1.0 - region_strength, 1.0)
            pf = _numerator(p, pm_base, offs_m, mask_m, offs_n, mask_n, stride_pm_m, stride_pm_n, region_keep,
                            HAS_PROB_MULT, HAS_REGIONS)
            acc, acc_t = _pv_update(acc, acc_t, alpha, pf, v_base, offs_n, mask_n, stride_vn, stride_vd,
                                    DV, BLOCK_DV, BLOCK_DV_TAIL, DOT_PRECISION)
            if FANOUT > 1:
                # Uniform branches: a padded slot costs neither loads nor a product.
                if b1 >= 0:
                    acc1, acc1_t = _pv_update(acc1, acc1_t, alpha, p, V + b1 * stride_vb + h * stride_vh, offs_n,
                                              mask_n, stride_vn, stride_vd, DV, BLOCK_DV, BLOCK_DV_TAIL,
                                              DOT_PRECISION)
                if FANOUT > 2:
                    if b2 >= 0:
                        acc2, acc2_t = _pv_update(acc2, acc2_t, alpha, p, V + b2 * stride_vb + h * stride_vh, offs_n,
                                                  mask_n, stride_vn, stride_vd, DV, BLOCK_DV, BLOCK_DV_TAIL,
                                                  DOT_PRECISION)
                    if b3 >= 0:
                        acc3, acc3_t = _pv_update(acc3, acc3_t, alpha, p, V + b3 * stride_vb + h * stride_vh, offs_n,
                                                  mask_n, stride_vn, stride_vd, DV, BLOCK_DV, BLOCK_DV_TAIL,
                                                  DOT_PRECISION)

            if CAPTURE_TOKEN_MASS and SINGLE_KEY_BLOCK:
                if capture_row:
                    _add_token_mass_of_block(TokenMass + b * stride_tm_b + h * stride_tm_h, p, l_i, mask_m,
                                             offs_n, mask_n, stride_tm_n)

            if HAS_OWN:
                s_own = _logits_log2(q_own, q_own_tail, k_own_base, bias_own_base, offs_m, mask_m, offs_n, mask_n,
                                     stride_kn, stride_kd, stride_bias_m, stride_bias_n, qk_scale_log2,
                                     D, BLOCK_D, BLOCK_D_TAIL, HAS_BIAS, DOT_PRECISION)
                p_own, alpha_own, m_own, l_own = _online_softmax_step(s_own, m_own, l_own)
                pf_own = _numerator(p_own, opm_base, offs_m, mask_m, offs_n, mask_n, stride_opm_m, stride_opm_n,
                                    region_keep, HAS_OWN_PROB_MULT, HAS_REGIONS)
                acc_own, acc_own_t = _pv_update(acc_own, acc_own_t, alpha_own, pf_own, v_own_base, offs_n, mask_n,
                                                stride_ov_n, stride_ov_d, DV, BLOCK_DV, BLOCK_DV_TAIL, DOT_PRECISION)
                if OWN_CAPTURE_TOKEN_MASS and SINGLE_KEY_BLOCK:
                    if own_capture_row:
                        _add_token_mass_of_block(OwnTokenMass + b * stride_otm_b + h * stride_otm_h, p_own, l_own,
                                                 mask_m, offs_n, mask_n, stride_otm_n)

    inv_l = tl.where(mask_m & (l_i > 0), 1.0 / l_i, 0.0)
    out = acc * inv_l[:, None]
    out_t = acc_t * inv_l[:, None]  # with no tail: computed from the stand-in, never stored
    if HAS_OWN:
        inv_own = tl.where(mask_m & (l_own > 0), 1.0 / l_own, 0.0)
        out += acc_own * inv_own[:, None]
        out_t += acc_own_t * inv_own[:, None]
    _store_rows(Out + b * stride_ob + h * stride_oh, out, out_t, offs_m, mask_m, stride_om, stride_od,
                DV, BLOCK_DV, BLOCK_DV_TAIL)
    if FANOUT > 1:
        if b1 >= 0:
            _store_rows(Out + b1 * stride_ob + h * stride_oh, acc1 * inv_l[:, None], acc1_t * inv_l[:, None],
                        offs_m, mask_m, stride_om, stride_od, DV, BLOCK_DV, BLOCK_DV_TAIL)
        if FANOUT > 2:
            if b2 >= 0:
                _store_rows(Out + b2 * stride_ob + h * stride_oh, acc2 * inv_l[:, None], acc2_t * inv_l[:, None],
                            offs_m, mask_m, stride_om, stride_od, DV, BLOCK_DV, BLOCK_DV_TAIL)
            if b3 >= 0:
                _store_rows(Out + b3 * stride_ob + h * stride_oh, acc3 * inv_l[:, None], acc3_t * inv_l[:, None],
                            offs_m, mask_m, stride_om, stride_od, DV, BLOCK_DV, BLOCK_DV_TAIL)

    # ---- captures that need the final normaliser ---------------------------------------
    if capture_row:
        _capture_statistics(
            q, q_tail, k_base, bias_base, m_i, l_i, offs_m, mask_m, b, h, N, T, query_bits, lk_base, stride_lk_n,
            TokenMass, Maps, HeadMaps, Lse, Tokens, HeadWeights,
            stride_kn, stride_kd, stride_bias_m, stride_bias_n,
            stride_tm_b, stride_tm_h, stride_tm_n, stride_map_b, stride_map_m, stride_map_t,
            stride_hm_b, stride_hm_h, stride_hm_m, stride_hm_t, stride_lse_b, stride_lse_h, stride_lse_m,
            stride_tok_b, stride_tok_t, stride_w_b, stride_w_h, qk_scale_log2,
            D, BLOCK_N, BLOCK_D, BLOCK_D_TAIL, BLOCK_T, HAS_BIAS, DOT_PRECISION,
            CAPTURE_TOKEN_MASS, CAPTURE_MAPS, CAPTURE_HEAD_MAPS, CAPTURE_LSE, HAS_HEAD_WEIGHTS, SINGLE_KEY_BLOCK,
            HAS_REGION_MASK)
    if HAS_OWN:
        if own_capture_row:
            _capture_statistics(
                q_own, q_own_tail, k_own_base, bias_own_base, m_own, l_own, offs_m, mask_m, b, h, N, T_OWN, query_bits,
                lk_base, stride_lk_n,
                OwnTokenMass, OwnMaps, OwnHeadMaps, OwnLse, OwnTokens, OwnHeadWeights,
                stride_kn, stride_kd, stride_bias_m, stride_bias_n,
                stride_otm_b, stride_otm_h, stride_otm_n, stride_omap_b, stride_omap_m, stride_omap_t,
                stride_ohm_b, stride_ohm_h, stride_ohm_m, stride_ohm_t, stride_olse_b, stride_olse_h,
                stride_olse_m, stride_otok_b, stride_otok_t, stride_ow_b, stride_ow_h, qk_scale_log2,
                D, BLOCK_N, BLOCK_D, BLOCK_D_TAIL, BLOCK_T, HAS_BIAS, DOT_PRECISION,
                OWN_CAPTURE_TOKEN_MASS, OWN_CAPTURE_MAPS, OWN_CAPTURE_HEAD_MAPS, OWN_CAPTURE_LSE,
                OWN_HAS_HEAD_WEIGHTS, SINGLE_KEY_BLOCK)

    # ---- auxiliary-key probes: a softmax over the probe keys alone, summed over rows -----
    if CAPTURE_PROBES:
        if capture_row:
            pk_base = ProbeKeys + b * stride_pk_b + h * stride_pk_h
            pmass_base = ProbeMass + b * stride_pmass_b + h * stride_pmass_h
            if SINGLE_PROBE_BLOCK:
                offs_c = tl.arange(0, BLOCK_C)
                mask_c = offs_c < C
                s = _logits_log2(q, q_tail, pk_base, pk_base, offs_m, mask_m, offs_c, mask_c,
                                 stride_pk_c, stride_pk_d, 0, 0, qk_scale_log2,
                                 D, BLOCK_D, BLOCK_D_TAIL, False, DOT_PRECISION)
                p = tl.exp2(s - tl.max(s, 1)[:, None])
                row_w = tl.where(mask_m, 1.0 / tl.sum(p, 1), 0.0)
                tl.atomic_add(pmass_base + offs_c * stride_pmass_c, tl.sum(p * row_w[:, None], 0), mask=mask_c, sem="relaxed")
            else:
                pm_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
                pl_i = tl.zeros([BLOCK_M], dtype=tl.float32)
                for start_c in range(0, C, BLOCK_C):
                    offs_c = start_c + tl.arange(0, BLOCK_C)
                    mask_c = offs_c < C
                    s = _logits_log2(q, q_tail, pk_base, pk_base, offs_m, mask_m, offs_c, mask_c,
                                     stride_pk_c, stride_pk_d, 0, 0, qk_scale_log2,
                                     D, BLOCK_D, BLOCK_D_TAIL, False, DOT_PRECISION)
                    pm_new = tl.maximum(pm_i, tl.max(s, 1))  # finite: every block has a live key
                    pl_i = pl_i * tl.exp2(pm_i - pm_new) + tl.sum(tl.exp2(s - pm_new[:, None]), 1)
                    pm_i = pm_new
                row_w = tl.where(mask_m, 1.0 / pl_i, 0.0)
                for start_c in range(0, C, BLOCK_C):
                    offs_c = start_c + tl.arange(0, BLOCK_C)
                    mask_c = offs_c < C
                    s = _logits_log2(q, q_tail, pk_base, pk_base, offs_m, mask_m, offs_c, mask_c,
                                     stride_pk_c, stride_pk_d, 0, 0, qk_scale_log2,
                                     D, BLOCK_D, BLOCK_D_TAIL, False, DOT_PRECISION)
                    p = tl.exp2(s - pm_i[:, None]) * row_w[:, None]
                    tl.atomic_add(pmass_base + offs_c * stride_pmass_c, tl.sum(p, 0), mask=mask_c, sem="relaxed")


@triton.jit
def logit_max_kernel(
    Q, K, Out,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_o_bh, stride_o_blk,
    H, M, N,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_D_TAIL: tl.constexpr = 0,
):
    """Out[b*H + h, pid_m] = max over this query block's rows and every key of q·k (unscaled)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    q_base = Q + b * stride_qb + h * stride_qh
    q = _head_tile(q_base, offs_m, mask_m, stride_qm, stride_qd, 0, BLOCK_D, D)
    q_tail = q  # stands in when there is no tail (never read)
    if BLOCK_D_TAIL > 0:
        q_tail = _head_tile(q_base, offs_m, mask_m, stride_qm, stride_qd, BLOCK_D, BLOCK_D_TAIL, D)
    k_base = K + b * stride_kb + h * stride_kh
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        s = _logits_log2(q, q_tail, k_base, k_base, offs_m, mask_m, offs_n, mask_n,
                         stride_kn, stride_kd, 0, 0, 1.0, D, BLOCK_D, BLOCK_D_TAIL, False, DOT_PRECISION)
        s = tl.where(mask_m[:, None], s, float("-inf"))
        row_max = tl.maximum(row_max, tl.max(s, 1))
    tl.store(Out + pid_bh.to(tl.int64) * stride_o_bh + pid_m * stride_o_blk, tl.max(row_max, 0))
