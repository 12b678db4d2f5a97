// Fused attention forward with controls and captures (the op contract of attnctl.reference).
//
// One CTA owns kBlockM query rows of one (batch, head); each warp owns 16 of those rows for
// the whole kernel. Per key block (double-buffered in shared memory through cp.async):
//
//   S = Q·Kᵀ (mma.sync m16n8k16, fp32 accumulate) · scale·log2e + bias·log2e
//   online softmax in registers (exp2), P before prob_mult feeds the captures,
//   O = O·α + (P·f)·V            (f = prob_mult scales the numerator only)
//
// then O / l is written. Captures are statistics of P (before f), ADDED to fp32 buffers:
//   * token mass Σ_m P: when all keys fit one block the running sum is already the final
//     normaliser and the column sums are taken in the main loop; otherwise a second pass
//     over the key blocks recomputes S and normalises with the final (m, l) (one more QKᵀ,
//     no PV). Column sums are reduced in the warp, then across warps in shared memory, then
//     added with one atomicAdd per column per CTA.
//   * maps / head maps: the K rows of the captured tokens are gathered into shared memory
//     and their logits recomputed against the final (m, l): an extra kBlockM × D × T
//     product. Head maps belong to this CTA alone (read-add-write); maps are summed over
//     heads by different CTAs (atomicAdd).
//   * LSE by the owning thread (read-add-write).
// A row whose logits are all -inf has l = 0: its output, P and maps are 0, its LSE -inf.
// Injection (p.source): every read of q, k and bias (main loop, token-mass pass, token
// columns) is at item src = source[b]; v, prob_mult, the captures and out stay at b.
// The two-source form (p.own_v) runs attention_fwd_own_kernel below.
#pragma once

#include <cmath>
#include <type_traits>

#include "kernel_traits.h"
#include "params.h"
#include "utils.h"

namespace attnctl {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Copies kRows rows of the tile's kHeadDim columns into shared memory (pitch kSmemStride).
// Row r comes from row_ptr(r) (nullptr: past the end, written as zeros); columns from
// d_valid on are zeros, so padded k-steps and padded V columns contribute nothing.
// vec: 16-byte cp.async (asynchronous; the caller commits and waits); otherwise element
// loads for arbitrary strides (synchronous).
template <typename Traits, int kRows, typename Elem, typename RowPtr>
__device__ __forceinline__ void load_tile(Elem* tile, RowPtr row_ptr, int64_t stride_d, int d_valid,
                                          bool vec, const Elem* base) {
    constexpr int kChunksPerRow = Traits::kHeadDim / 8;
    constexpr int kChunks = kRows * kChunksPerRow;
    for (int c = threadIdx.x; c < kChunks; c += Traits::kNThreads) {
        const int r = c / kChunksPerRow;
        const int d0 = (c % kChunksPerRow) * 8;
        const Elem* src = row_ptr(r);
        Elem* dst = tile + r * Traits::kSmemStride + d0;
        // d_valid is a multiple of 8: a chunk is wholly inside or wholly outside.
        const bool ok = src != nullptr && d0 < d_valid;
        if (vec) {
            // A zero-byte copy reads nothing but still needs a valid address: the base.
            cp_async_16(dst, ok ? src + d0 : base, ok ? 16 : 0);
        } else {
            #pragma unroll
            for (int e = 0; e < 8; ++e) {
                dst[e] = ok ? src[(d0 + e) * stride_d] : ElemTraits<Elem>::from_float(0.f);
            }
        }
    }
}

// S (16 rows of this warp × kBlockN keys) = Q_warp · K_tileᵀ. k-steps past the real head
// dim and 16-key groups past the last valid key are skipped (their S stays 0 and is masked).
template <typename Traits, typename Elem>
__device__ __forceinline__ void compute_qk(float (&s)[Traits::kBlockN / 8][4], const Elem* sQ_warp,
                                           const Elem* sK, int d_steps, int key_pairs, int lane) {
    constexpr int kStride = Traits::kSmemStride;
    #pragma unroll
    for (int nt = 0; nt < Traits::kBlockN / 8; ++nt) {
        s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
    }
    #pragma unroll
    for (int kk = 0; kk < Traits::kHeadDim / 16; ++kk) {
        if (kk < d_steps) {
            uint32_t a[4];  // rows 0-7 / 8-15 × cols 0-7 / 8-15 of the 16×16 Q block
            ldmatrix_x4(a, sQ_warp + (lane & 15) * kStride + kk * 16 + (lane >> 4) * 8);
            #pragma unroll
            for (int np = 0; np < Traits::kBlockN / 16; ++np) {
                if (np < key_pairs) {
                    // K rows are the B operand's columns: matrices (keys 0-7, d 0-7),
                    // (keys 0-7, d 8-15), (keys 8-15, d 0-7), (keys 8-15, d 8-15).
                    uint32_t b[4];
                    ldmatrix_x4(b, sK + (np * 16 + (lane >> 4) * 8 + (lane & 7)) * kStride
                                       + kk * 16 + ((lane >> 3) & 1) * 8);
                    mma_16816<Elem>(s[2 * np], a, b[0], b[1]);
                    mma_16816<Elem>(s[2 * np + 1], a, b[2], b[3]);
                }
            }
        }
    }
}

// S -> log2-domain logits: S·scale·log2e + bias·log2e, -inf where col_of(local column) < 0.
// This thread holds rows row0 (elements 0, 1) and row0 + 8 (elements 2, 3) at local columns
// nt*8 + 2*(lane%4) + {0, 1}.
template <typename Traits, typename ColOf>
__device__ __forceinline__ void finish_logits(float (&s)[Traits::kBlockN / 8][4], const AttentionParams& p,
                                              int64_t bias_bh, int row0, ColOf col_of, int lane) {
    const int tig = lane & 3;
    #pragma unroll
    for (int nt = 0; nt < Traits::kBlockN / 8; ++nt) {
        #pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int64_t col = col_of(nt * 8 + tig * 2 + e);
            #pragma unroll
            for (int i = 0; i < 2; ++i) {
                float& x = s[nt][2 * i + e];
                const int row = row0 + 8 * i;
                if (col < 0) {
                    x = -INFINITY;
                } else {
                    x *= p.scale_log2;
                    if (p.bias != nullptr && row < p.M) {
                        x += kLog2e * load_as_float(p.bias, bias_bh + row * p.bias_stride[2]
                                                               + col * p.bias_stride[3], p.bias_dtype);
                    }
                }
            }
        }
    }
}

// P -> P·inv_l in place (the normalised probabilities of the captures), from log2 logits.
template <typename Traits>
__device__ __forceinline__ void normalise(float (&s)[Traits::kBlockN / 8][4], const float (&m_ref)[2],
                                          const float (&inv_l)[2]) {
    #pragma unroll
    for (int nt = 0; nt < Traits::kBlockN / 8; ++nt) {
        #pragma unroll
        for (int r = 0; r < 4; ++r) {
            s[nt][r] = exp2_approx(s[nt][r] - m_ref[r / 2]) * inv_l[r / 2];
        }
    }
}

// token_mass[n0 + c] += Σ over the CTA's rows of prob[row][c]·scale[row]. Rows past M carry
// scale 0. Contains a CTA barrier; the caller keeps the next write of sColSum behind
// another one.
template <typename Traits>
__device__ __forceinline__ void add_token_mass(const float (&prob)[Traits::kBlockN / 8][4], const float (&scale)[2],
                                               float* sColSum, float* token_mass_bh, int64_t stride_n,
                                               int n0, int N, int warp, int lane) {
    const int tig = lane & 3;
    #pragma unroll
    for (int nt = 0; nt < Traits::kBlockN / 8; ++nt) {
        #pragma unroll
        for (int e = 0; e < 2; ++e) {
            const float c = column_sum(prob[nt][e] * scale[0] + prob[nt][2 + e] * scale[1]);
            if (lane < 4) sColSum[warp * Traits::kBlockN + nt * 8 + tig * 2 + e] = c;
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < Traits::kBlockN; c += Traits::kNThreads) {
        if (n0 + c < N) {
            float total = 0.f;
            #pragma unroll
            for (int w = 0; w < Traits::kNWarps; ++w) total += sColSum[w * Traits::kBlockN + c];
            atomicAdd(token_mass_bh + (n0 + c) * stride_n, total);
        }
    }
}

// One key block of the online softmax for this thread's two rows: s (log2-domain logits)
// becomes exp2(s - m), m the running row max; l_run takes the block's sum, and alpha is the
// factor that rescales what was accumulated over the earlier blocks.
template <typename Traits>
__device__ __forceinline__ void online_softmax_block(float (&s)[Traits::kBlockN / 8][4], float (&m_run)[2],
                                                     float (&l_run)[2], float (&alpha)[2]) {
    constexpr int kNT = Traits::kBlockN / 8;
    #pragma unroll
    for (int i = 0; i < 2; ++i) {
        float mx = m_run[i];
        #pragma unroll
        for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * i], s[nt][2 * i + 1]));
        mx = quad_max(mx);
        // A row with only -inf so far keeps a finite reference so exp2 gives 0, not NaN.
        const float ref = mx == -INFINITY ? 0.f : mx;
        alpha[i] = exp2_approx(m_run[i] - ref);
        m_run[i] = mx;
        float sum = 0.f;
        #pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
            s[nt][2 * i] = exp2_approx(s[nt][2 * i] - ref);
            s[nt][2 * i + 1] = exp2_approx(s[nt][2 * i + 1] - ref);
            sum += s[nt][2 * i] + s[nt][2 * i + 1];
        }
        l_run[i] = l_run[i] * alpha[i] + sum;
    }
}

template <typename Traits>
__device__ __forceinline__ int key_pairs_from(int first, int count) {
    return min(Traits::kBlockN / 16, (count - first + 15) / 16);
}

// Local column -> key index, -1 past N. Captures only the two ints: a by-value capture of
// the params would copy the whole struct.
__device__ __forceinline__ auto key_col(int n0, int N) {
    return [n0, N](int c) -> int64_t { return n0 + c < N ? n0 + c : -1; };
}

// s *= mult[row][col] (0 past M or N): prob_mult scales the numerator only.
template <typename Traits>
__device__ __forceinline__ void apply_prob_mult(float (&s)[Traits::kBlockN / 8][4], const void* mult, int dtype,
                                                const int64_t (&stride)[4], int64_t mult_bh, int row0, int n0,
                                                int M, int N, int lane) {
    const int tig = lane & 3;
    #pragma unroll
    for (int nt = 0; nt < Traits::kBlockN / 8; ++nt) {
        #pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int row = row0 + 8 * (r / 2);
            const int col = n0 + nt * 8 + tig * 2 + (r & 1);
            s[nt][r] *= (row < M && col < N)
                ? load_as_float(mult, mult_bh + row * stride[2] + col * stride[3], dtype)
                : 0.f;
        }
    }
}

// o += P·V over one key block (P in s, V the block's tile in shared memory).
template <typename Traits, typename Elem>
__device__ __forceinline__ void accumulate_pv(float (&o)[Traits::kHeadDim / 8][4],
                                              const float (&s)[Traits::kBlockN / 8][4], const Elem* sVs,
                                              int key_pairs, int dv_pairs, int lane) {
    constexpr int kStride = Traits::kSmemStride;
    #pragma unroll
    for (int kk = 0; kk < Traits::kBlockN / 16; ++kk) {
        if (kk < key_pairs) {
            // Two S accumulator tiles are exactly one A operand (16 rows × 16 keys).
            uint32_t a[4] = {
                ElemTraits<Elem>::pack(s[2 * kk][0], s[2 * kk][1]),
                ElemTraits<Elem>::pack(s[2 * kk][2], s[2 * kk][3]),
                ElemTraits<Elem>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                ElemTraits<Elem>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]),
            };
            #pragma unroll
            for (int dp = 0; dp < Traits::kHeadDim / 16; ++dp) {
                if (dp < dv_pairs) {
                    // V is row-major (key, d): transposed loads give the B operand,
                    // matrices (keys 0-7, d 0-7), (keys 8-15, d 0-7), (0-7, 8-15), (8-15, 8-15).
                    uint32_t bv[4];
                    ldmatrix_x4_trans(bv, sVs + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * kStride
                                              + dp * 16 + (lane >> 4) * 8);
                    mma_16816<Elem>(o[2 * dp], a, bv[0], bv[1]);
                    mma_16816<Elem>(o[2 * dp + 1], a, bv[2], bv[3]);
                }
            }
        }
    }
}

// out rows of this warp = o · row_scale, staged through sStage (the K/V buffers, which every
// warp must be done with) for 16-byte stores. Contains a CTA barrier.
template <typename Traits, typename Elem>
__device__ __forceinline__ void store_output(const float (&o)[Traits::kHeadDim / 8][4], const float (&row_scale)[2],
                                             Elem* sStage, const AttentionParams& p, int b, int h, int m0,
                                             int dv_pairs, int warp, int lane) {
    constexpr int kStride = Traits::kSmemStride;
    const int tig = lane & 3;
    __syncthreads();
    Elem* sO = sStage + warp * 16 * kStride;  // this warp's 16 rows
    const int r = lane >> 2;
    #pragma unroll
    for (int dt = 0; dt < Traits::kHeadDim / 8; ++dt) {
        if (dt < 2 * dv_pairs) {
            *reinterpret_cast<uint32_t*>(sO + r * kStride + dt * 8 + tig * 2) =
                ElemTraits<Elem>::pack(o[dt][0] * row_scale[0], o[dt][1] * row_scale[0]);
            *reinterpret_cast<uint32_t*>(sO + (r + 8) * kStride + dt * 8 + tig * 2) =
                ElemTraits<Elem>::pack(o[dt][2] * row_scale[1], o[dt][3] * row_scale[1]);
        }
    }
    __syncwarp();
    Elem* out_bh = static_cast<Elem*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1];
    const int chunks_per_row = p.Dv / 8;
    for (int c = lane; c < 16 * chunks_per_row; c += 32) {
        const int rr = c / chunks_per_row;
        const int d0 = (c % chunks_per_row) * 8;
        const int m = m0 + warp * 16 + rr;
        if (m < p.M) {
            const Elem* src = sO + rr * kStride + d0;
            Elem* dst = out_bh + m * p.out_stride[2];
            if (p.out_vec) {
                *reinterpret_cast<uint4*>(dst + d0) = *reinterpret_cast<const uint4*>(src);
            } else {
                #pragma unroll
                for (int e = 0; e < 8; ++e) dst[(d0 + e) * p.out_stride[3]] = src[e];
            }
        }
    }
}

__device__ __forceinline__ void add_lse(const CaptureBuffers& c, const float (&lse)[2], int b, int h, int row0,
                                        int M, int lane) {
    if (c.lse != nullptr && (lane & 3) == 0) {
        #pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int row = row0 + 8 * i;
            if (row < M) {
                // Only this thread's CTA covers (b, h, row): a plain read-add-write.
                float* ptr = c.lse + b * c.lse_stride[0] + h * c.lse_stride[1] + row * c.lse_stride[2];
                *ptr += lse[i];
            }
        }
    }
}

// maps / head maps of capture c: the logits of the captured token columns only (K rows of
// item k_bh, bias at bias_bh), normalised with the final (m_ref, inv_l). Starts with a CTA
// barrier: the previous users of sK are done.
template <typename Traits, typename Elem>
__device__ __forceinline__ void add_token_columns(const AttentionParams& p, const CaptureBuffers& c,
                                                  const Elem* sQ_warp, Elem* sK, const Elem* k_bh, int64_t bias_bh,
                                                  const float (&m_ref)[2], const float (&inv_l)[2], int b, int h,
                                                  int row0, int d_steps, int lane) {
    constexpr int kBlockN = Traits::kBlockN;
    constexpr int kStride = Traits::kSmemStride;
    constexpr int kNT = Traits::kBlockN / 8;
    if (c.maps == nullptr && c.head_maps == nullptr) return;
    const int tig = lane & 3;
    const Elem* k_base = static_cast<const Elem*>(p.k);
    const int64_t tok_b = b * c.tokens_stride[0];
    auto token = [&](int t) { return load_index(c.tokens, tok_b + t * c.tokens_stride[1], c.tokens_dtype); };
    auto load_token_rows = [&](int t0, int stage) {
        load_tile<Traits, kBlockN>(sK + stage * kBlockN * kStride, [&](int r) -> const Elem* {
            return t0 + r < c.T ? k_bh + token(t0 + r) * p.k_stride[2] : nullptr;
        }, p.k_stride[3], p.D, p.k_vec, k_base);
    };
    const float weight = c.head_weights == nullptr ? 1.f
        : load_as_float(c.head_weights, b * c.head_weights_stride[0] + h * c.head_weights_stride[1],
                        c.head_weights_dtype);
    const int t_blocks = (c.T + kBlockN - 1) / kBlockN;
    float s[kNT][4];
    __syncthreads();
    load_token_rows(0, 0);
    cp_async_commit();
    for (int j = 0; j < t_blocks; ++j) {
        cp_async_wait_all();
        __syncthreads();
        const int t0 = j * kBlockN;
        if (j + 1 < t_blocks) {
            load_token_rows(t0 + kBlockN, (j + 1) & 1);
            cp_async_commit();
        }
        compute_qk<Traits, Elem>(s, sQ_warp, sK + (j & 1) * kBlockN * kStride, d_steps,
                                 key_pairs_from<Traits>(t0, c.T), lane);
        finish_logits<Traits>(s, p, bias_bh, row0, [&](int col) -> int64_t {
            return t0 + col < c.T ? token(t0 + col) : -1;
        }, lane);
        normalise<Traits>(s, m_ref, inv_l);
        #pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
            #pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int row = row0 + 8 * (r / 2);
                const int t = t0 + nt * 8 + tig * 2 + (r & 1);
                if (row < p.M && t < c.T) {
                    if (c.head_maps != nullptr) {
                        // (b, h, row) belongs to this CTA alone: read-add-write.
                        float* ptr = c.head_maps + b * c.head_maps_stride[0] + h * c.head_maps_stride[1]
                                     + row * c.head_maps_stride[2] + t * c.head_maps_stride[3];
                        *ptr += s[nt][r];
                    }
                    if (c.maps != nullptr) {
                        // The heads of one batch item are other CTAs adding to the same map.
                        atomicAdd(c.maps + b * c.maps_stride[0] + row * c.maps_stride[1] + t * c.maps_stride[2],
                                  weight * s[nt][r]);
                    }
                }
            }
        }
    }
}

template <typename Traits, typename Elem>
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kMinBlocksPerSM)
attention_fwd_kernel(const __grid_constant__ AttentionParams p) {
    constexpr int kBlockM = Traits::kBlockM;
    constexpr int kBlockN = Traits::kBlockN;
    constexpr int kStride = Traits::kSmemStride;
    constexpr int kNT = Traits::kBlockN / 8;     // 8-key tiles of S
    constexpr int kDT = Traits::kHeadDim / 8;    // 8-column tiles of O

    extern __shared__ __align__(16) unsigned char smem[];
    Elem* sQ = reinterpret_cast<Elem*>(smem);                // [kBlockM][kStride]
    Elem* sK = sQ + kBlockM * kStride;                       // [2 stages][kBlockN][kStride]
    Elem* sV = sK + 2 * kBlockN * kStride;                   // [2 stages][kBlockN][kStride]
    float* sColSum = reinterpret_cast<float*>(sV + 2 * kBlockN * kStride);  // [kNWarps][kBlockN]

    const CaptureBuffers& cap = p.capture;
    const int m_block = blockIdx.x;
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int m0 = m_block * kBlockM;
    const int row0 = m0 + warp * 16 + (lane >> 2);  // this thread's rows: row0 and row0 + 8

    const Elem* q_base = static_cast<const Elem*>(p.q);
    const Elem* k_base = static_cast<const Elem*>(p.k);
    const Elem* v_base = static_cast<const Elem*>(p.v);
    const int64_t src = p.source == nullptr ? b : load_index(p.source, b * p.source_stride, p.source_dtype);
    const Elem* q_bh = q_base + src * p.q_stride[0] + h * p.q_stride[1];
    const Elem* k_bh = k_base + src * p.k_stride[0] + h * p.k_stride[1];
    const Elem* v_bh = v_base + b * p.v_stride[0] + h * p.v_stride[1];
    const int64_t bias_bh = src * p.bias_stride[0] + h * p.bias_stride[1];
    const int64_t pm_bh = b * p.prob_mult_stride[0] + h * p.prob_mult_stride[1];

    const int d_steps = (p.D + 15) / 16;    // k-steps of QKᵀ that touch real columns
    const int dv_pairs = (p.Dv + 15) / 16;  // 16-column groups of O that hold real columns
    const int n_blocks = (p.N + kBlockN - 1) / kBlockN;
    const Elem* sQ_warp = sQ + warp * 16 * kStride;

    auto load_k = [&](int n0, int stage) {
        load_tile<Traits, kBlockN>(sK + stage * kBlockN * kStride, [&](int r) -> const Elem* {
            return n0 + r < p.N ? k_bh + (n0 + r) * p.k_stride[2] : nullptr;
        }, p.k_stride[3], p.D, p.k_vec, k_base);
    };
    auto load_v = [&](int n0, int stage) {
        load_tile<Traits, kBlockN>(sV + stage * kBlockN * kStride, [&](int r) -> const Elem* {
            return n0 + r < p.N ? v_bh + (n0 + r) * p.v_stride[2] : nullptr;
        }, p.v_stride[3], p.Dv, p.v_vec, v_base);
    };

    load_tile<Traits, kBlockM>(sQ, [&](int r) -> const Elem* {
        return m0 + r < p.M ? q_bh + (m0 + r) * p.q_stride[2] : nullptr;
    }, p.q_stride[3], p.D, p.q_vec, q_base);
    load_k(0, 0);
    load_v(0, 0);
    cp_async_commit();

    float o[kDT][4];
    #pragma unroll
    for (int dt = 0; dt < kDT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY};
    float l_run[2] = {0.f, 0.f};  // this thread's share of the row sums (quad-reduced at the end)
    const bool token_mass_in_loop = cap.token_mass != nullptr && n_blocks == 1;
    float* token_mass_bh = cap.token_mass == nullptr ? nullptr
        : cap.token_mass + b * cap.token_mass_stride[0] + h * cap.token_mass_stride[1];
    float s[kNT][4];

    // ---- main pass: online softmax over key blocks ----------------------------------------
    for (int j = 0; j < n_blocks; ++j) {
        cp_async_wait_all();
        // Block j is visible to all, and every warp has finished block j-1, whose stage the
        // prefetch below overwrites.
        __syncthreads();
        const int n0 = j * kBlockN;
        if (j + 1 < n_blocks) {
            load_k(n0 + kBlockN, (j + 1) & 1);
            load_v(n0 + kBlockN, (j + 1) & 1);
            cp_async_commit();
        }
        const int key_pairs = key_pairs_from<Traits>(n0, p.N);
        compute_qk<Traits, Elem>(s, sQ_warp, sK + (j & 1) * kBlockN * kStride, d_steps, key_pairs, lane);
        finish_logits<Traits>(s, p, bias_bh, row0, key_col(n0, p.N), lane);

        float alpha[2];
        online_softmax_block<Traits>(s, m_run, l_run, alpha);

        if (token_mass_in_loop) {
            // The only key block: the running sum is the final normaliser.
            float inv_l[2];
            #pragma unroll
            for (int i = 0; i < 2; ++i) {
                const float l = quad_sum(l_run[i]);
                inv_l[i] = (row0 + 8 * i < p.M && l > 0.f) ? 1.f / l : 0.f;
            }
            add_token_mass<Traits>(s, inv_l, sColSum, token_mass_bh, cap.token_mass_stride[2], n0, p.N, warp, lane);
        }

        if (p.prob_mult != nullptr) {
            apply_prob_mult<Traits>(s, p.prob_mult, p.prob_mult_dtype, p.prob_mult_stride, pm_bh, row0, n0,
                                    p.M, p.N, lane);
        }

        #pragma unroll
        for (int dt = 0; dt < kDT; ++dt) {
            o[dt][0] *= alpha[0];
            o[dt][1] *= alpha[0];
            o[dt][2] *= alpha[1];
            o[dt][3] *= alpha[1];
        }
        accumulate_pv<Traits, Elem>(o, s, sV + (j & 1) * kBlockN * kStride, key_pairs, dv_pairs, lane);
    }

    // ---- final row statistics ----------------------------------------------------------------
    float inv_l[2], m_ref[2], lse[2];
    #pragma unroll
    for (int i = 0; i < 2; ++i) {
        const float l = quad_sum(l_run[i]);
        // Rows past M get inv_l = 0 so they add nothing to any capture.
        inv_l[i] = (row0 + 8 * i < p.M && l > 0.f) ? 1.f / l : 0.f;
        m_ref[i] = m_run[i] == -INFINITY ? 0.f : m_run[i];
        lse[i] = l > 0.f ? (m_ref[i] + log2f(l)) * kLn2 : -INFINITY;
    }

    store_output<Traits, Elem>(o, inv_l, sK, p, b, h, m0, dv_pairs, warp, lane);
    add_lse(cap, lse, b, h, row0, p.M, lane);

    // ---- token mass over several key blocks: recompute S with the final (m, l) --------------
    if (cap.token_mass != nullptr && n_blocks > 1) {
        __syncthreads();  // output staging reads are done before K is reloaded
        load_k(0, 0);
        cp_async_commit();
        for (int j = 0; j < n_blocks; ++j) {
            cp_async_wait_all();
            __syncthreads();
            const int n0 = j * kBlockN;
            if (j + 1 < n_blocks) {
                load_k(n0 + kBlockN, (j + 1) & 1);
                cp_async_commit();
            }
            compute_qk<Traits, Elem>(s, sQ_warp, sK + (j & 1) * kBlockN * kStride, d_steps,
                                     key_pairs_from<Traits>(n0, p.N), lane);
            finish_logits<Traits>(s, p, bias_bh, row0, key_col(n0, p.N), lane);
            normalise<Traits>(s, m_ref, inv_l);
            const float ones[2] = {1.f, 1.f};  // already normalised; rows past M have inv_l = 0
            add_token_mass<Traits>(s, ones, sColSum, token_mass_bh, cap.token_mass_stride[2], n0, p.N, warp, lane);
        }
    }

    add_token_columns<Traits, Elem>(p, cap, sQ_warp, sK, k_bh, bias_bh, m_ref, inv_l, b, h, row0, d_steps, lane);
}

// Two-source form: O_b = Σ_n P_src·f·v + Σ_n P_b·f_own·own_v, term 0 the logits of item
// src = source[b] (as in attention_fwd_kernel), term 1 item b's own logits, each its own
// softmax. Both terms share ONE output accumulator: their P are normalised before P·V, with
// the final (m, l) of each term known first. With one key block (cross-attention, where
// prompt-to-prompt's Refine and Reweight run) the block's statistics are final, so this costs
// nothing; with several, a statistics pass (QKᵀ only, both terms) runs before the main pass.
// A second accumulator with its own online rescaling would need kHeadDim / 2 more fp32
// registers a thread: the 256 tile would not fit the register file at all, the 160 tile would
// spill, and the 8-warp tiles would lose their 2 CTAs per SM. The normalised P also gives the
// token mass in the main pass for any N, so neither term needs the token-mass recompute.
// Key blocks run as steps (block j, term t) through the same two shared-memory stages, term t
// always in stage t; the two query tiles (items src and b) both stay in shared memory.
// One CTA per SM at least (not the 8-warp tiles' 2): the two inlined term bodies take ~240
// registers, and held to 128 they spilled 100-300 bytes; the 64 and 80 tiles' shared memory
// (85 and 104 KB) fits one CTA per SM on sm_80 anyway.
template <typename Traits, typename Elem>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
attention_fwd_own_kernel(const __grid_constant__ AttentionParams p) {
    constexpr int kBlockM = Traits::kBlockM;
    constexpr int kBlockN = Traits::kBlockN;
    constexpr int kStride = Traits::kSmemStride;
    constexpr int kNT = Traits::kBlockN / 8;
    constexpr int kDT = Traits::kHeadDim / 8;

    extern __shared__ __align__(16) unsigned char smem[];
    Elem* sQ = reinterpret_cast<Elem*>(smem);                // [2 terms][kBlockM][kStride]
    Elem* sK = sQ + 2 * kBlockM * kStride;                   // [2 stages][kBlockN][kStride]
    Elem* sV = sK + 2 * kBlockN * kStride;                   // [2 stages][kBlockN][kStride]
    float* sColSum = reinterpret_cast<float*>(sV + 2 * kBlockN * kStride);  // [kNWarps][kBlockN]

    const int h = blockIdx.y;
    const int b = blockIdx.z;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int m0 = blockIdx.x * kBlockM;
    const int row0 = m0 + warp * 16 + (lane >> 2);

    const Elem* q_base = static_cast<const Elem*>(p.q);
    const Elem* k_base = static_cast<const Elem*>(p.k);
    const Elem* v_base = static_cast<const Elem*>(p.v);
    const Elem* own_v_base = static_cast<const Elem*>(p.own_v);
    const int64_t src = p.source == nullptr ? b : load_index(p.source, b * p.source_stride, p.source_dtype);
    const int64_t item[2] = {src, b};  // whose q, k and bias give term t's logits
    const Elem* k_bh[2] = {k_base + item[0] * p.k_stride[0] + h * p.k_stride[1],
                           k_base + item[1] * p.k_stride[0] + h * p.k_stride[1]};
    const int64_t bias_bh[2] = {item[0] * p.bias_stride[0] + h * p.bias_stride[1],
                                item[1] * p.bias_stride[0] + h * p.bias_stride[1]};
    const Elem* v_bh = v_base + b * p.v_stride[0] + h * p.v_stride[1];
    const Elem* own_v_bh = own_v_base + b * p.own_v_stride[0] + h * p.own_v_stride[1];

    const int d_steps = (p.D + 15) / 16;
    const int dv_pairs = (p.Dv + 15) / 16;
    const int n_blocks = (p.N + kBlockN - 1) / kBlockN;
    auto sQ_warp = [&](int t) -> const Elem* { return sQ + (t * kBlockM + warp * 16) * kStride; };

    auto load_k = [&](int t, int n0) {
        const Elem* k_rows = t == 0 ? k_bh[0] : k_bh[1];
        load_tile<Traits, kBlockN>(sK + t * kBlockN * kStride, [&](int r) -> const Elem* {
            return n0 + r < p.N ? k_rows + (n0 + r) * p.k_stride[2] : nullptr;
        }, p.k_stride[3], p.D, p.k_vec, k_base);
    };
    auto load_v = [&](int t, int n0) {
        if (t == 0) {
            load_tile<Traits, kBlockN>(sV, [&](int r) -> const Elem* {
                return n0 + r < p.N ? v_bh + (n0 + r) * p.v_stride[2] : nullptr;
            }, p.v_stride[3], p.Dv, p.v_vec, v_base);
        } else {
            load_tile<Traits, kBlockN>(sV + kBlockN * kStride, [&](int r) -> const Elem* {
                return n0 + r < p.N ? own_v_bh + (n0 + r) * p.own_v_stride[2] : nullptr;
            }, p.own_v_stride[3], p.Dv, p.own_v_vec, own_v_base);
        }
    };
    // Waits for step (j, t)'s tiles, then prefetches the next step's into the other stage.
    auto next_step = [&](int j, int t, bool with_v) {
        cp_async_wait_all();
        // Step (j, t) is visible to all, and every warp is done with the step before, whose
        // stage the prefetch overwrites.
        __syncthreads();
        const int n0 = j * kBlockN;
        if (t == 0 || j + 1 < n_blocks) {
            const int next_n0 = t == 0 ? n0 : n0 + kBlockN;
            load_k(1 - t, next_n0);
            if (with_v) load_v(1 - t, next_n0);
            cp_async_commit();
        }
    };
    // Calls f(integral_constant<int, t>) for t = 0, 1: the term index stays a compile-time
    // constant, so the per-term register arrays are never indexed dynamically.
    auto for_each_term = [](auto f) {
        f(std::integral_constant<int, 0>{});
        f(std::integral_constant<int, 1>{});
    };

    #pragma unroll
    for (int t = 0; t < 2; ++t) {
        const Elem* q_bh = q_base + item[t] * p.q_stride[0] + h * p.q_stride[1];
        load_tile<Traits, kBlockM>(sQ + t * kBlockM * kStride, [&](int r) -> const Elem* {
            return m0 + r < p.M ? q_bh + (m0 + r) * p.q_stride[2] : nullptr;
        }, p.q_stride[3], p.D, p.q_vec, q_base);
    }

    float s[kNT][4];
    // Per term and row: the log2-domain LSE, so P = exp2(S - lse2) with one register a row;
    // +inf where P must be 0 (rows past M, rows of all -inf).
    float lse2[2][2] = {};
    // Row max and this thread's share of the row sum of one block (or a running pair over
    // several), from log2 logits; s becomes exp2(s - reference).
    auto softmax_step = [&](float (&m_run)[2], float (&l_run)[2]) {
        float alpha[2];  // no accumulator to rescale here
        online_softmax_block<Traits>(s, m_run, l_run, alpha);
    };
    // Sets lse2[t], adds the LSE capture of term t, returns 1/l (0 where lse2 is +inf).
    auto finalise = [&](int t, const float (&m_run)[2], const float (&l_run)[2], float (&inv_l)[2]) {
        const CaptureBuffers& cap = t == 0 ? p.capture : p.own_capture;
        float lse[2];
        #pragma unroll
        for (int i = 0; i < 2; ++i) {
            const float l = quad_sum(l_run[i]);
            const bool live = row0 + 8 * i < p.M && l > 0.f;  // l > 0: m_run is finite
            lse2[t][i] = live ? m_run[i] + log2f(l) : INFINITY;
            inv_l[i] = live ? 1.f / l : 0.f;
            lse[i] = l > 0.f ? lse2[t][i] * kLn2 : -INFINITY;
        }
        add_lse(cap, lse, b, h, row0, p.M, lane);
    };

    // ---- statistics pass (several key blocks): final (m, l) of both terms -------------------
    if (n_blocks > 1) {
        float m_run[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}};
        float l_run[2][2] = {};
        load_k(0, 0);
        cp_async_commit();
        for (int j = 0; j < n_blocks; ++j) {
            for_each_term([&](auto term) {
                constexpr int t = decltype(term)::value;
                next_step(j, t, false);
                compute_qk<Traits, Elem>(s, sQ_warp(t), sK + t * kBlockN * kStride, d_steps,
                                         key_pairs_from<Traits>(j * kBlockN, p.N), lane);
                finish_logits<Traits>(s, p, bias_bh[t], row0, key_col(j * kBlockN, p.N), lane);
                softmax_step(m_run[t], l_run[t]);
            });
        }
        for_each_term([&](auto term) {
            constexpr int t = decltype(term)::value;
            float inv_l[2];
            finalise(t, m_run[t], l_run[t], inv_l);
        });
    }

    // ---- main pass: O += Σ over both terms of (P·inv_l·f)·V ---------------------------------
    // The stage the first tiles go to was last read before the statistics pass's final barrier.
    load_k(0, 0);
    load_v(0, 0);
    cp_async_commit();
    float o[kDT][4];
    #pragma unroll
    for (int dt = 0; dt < kDT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
    const float ones[2] = {1.f, 1.f};
    for (int j = 0; j < n_blocks; ++j) {
        const int n0 = j * kBlockN;
        const int key_pairs = key_pairs_from<Traits>(n0, p.N);
        for_each_term([&](auto term) {
            constexpr int t = decltype(term)::value;
            const CaptureBuffers& cap = t == 0 ? p.capture : p.own_capture;
            next_step(j, t, true);
            compute_qk<Traits, Elem>(s, sQ_warp(t), sK + t * kBlockN * kStride, d_steps, key_pairs, lane);
            finish_logits<Traits>(s, p, bias_bh[t], row0, key_col(n0, p.N), lane);
            if (n_blocks == 1) {
                float m_run[2] = {-INFINITY, -INFINITY};
                float l_run[2] = {0.f, 0.f};
                float inv_l[2];
                softmax_step(m_run, l_run);
                finalise(t, m_run, l_run, inv_l);
                #pragma unroll
                for (int nt = 0; nt < kNT; ++nt) {
                    #pragma unroll
                    for (int r = 0; r < 4; ++r) s[nt][r] *= inv_l[r / 2];
                }
            } else {
                normalise<Traits>(s, lse2[t], ones);
            }
            if (cap.token_mass != nullptr) {
                add_token_mass<Traits>(s, ones, sColSum, cap.token_mass + b * cap.token_mass_stride[0]
                                       + h * cap.token_mass_stride[1], cap.token_mass_stride[2], n0, p.N, warp, lane);
            }
            const void* mult = t == 0 ? p.prob_mult : p.own_prob_mult;
            if (mult != nullptr) {
                if (t == 0) {
                    apply_prob_mult<Traits>(s, mult, p.prob_mult_dtype, p.prob_mult_stride,
                                            b * p.prob_mult_stride[0] + h * p.prob_mult_stride[1], row0, n0,
                                            p.M, p.N, lane);
                } else {
                    apply_prob_mult<Traits>(s, mult, p.own_prob_mult_dtype, p.own_prob_mult_stride,
                                            b * p.own_prob_mult_stride[0] + h * p.own_prob_mult_stride[1], row0,
                                            n0, p.M, p.N, lane);
                }
            }
            accumulate_pv<Traits, Elem>(o, s, sV + t * kBlockN * kStride, key_pairs, dv_pairs, lane);
        });
    }

    store_output<Traits, Elem>(o, ones, sK, p, b, h, m0, dv_pairs, warp, lane);
    for_each_term([&](auto term) {
        constexpr int t = decltype(term)::value;
        add_token_columns<Traits, Elem>(p, t == 0 ? p.capture : p.own_capture, sQ_warp(t), sK, k_bh[t],
                                        bias_bh[t], lse2[t], ones, b, h, row0, d_steps, lane);
    });
}

}  // namespace attnctl
