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
#pragma once

#include <cmath>

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

    const int m_block = blockIdx.x;
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int tig = lane & 3;
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
    // Captures only the two ints: a by-value capture of p would copy the whole struct.
    auto key_col = [&](int n0) {
        const int N = p.N;
        return [n0, N](int c) -> int64_t { return n0 + c < N ? n0 + c : -1; };
    };
    auto key_pairs_from = [&](int first, int count) { return min(kBlockN / 16, (count - first + 15) / 16); };

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
    const bool token_mass_in_loop = p.token_mass != nullptr && n_blocks == 1;
    float* token_mass_bh = p.token_mass == nullptr ? nullptr
        : p.token_mass + b * p.token_mass_stride[0] + h * p.token_mass_stride[1];
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
        const int key_pairs = key_pairs_from(n0, p.N);
        compute_qk<Traits, Elem>(s, sQ_warp, sK + (j & 1) * kBlockN * kStride, d_steps, key_pairs, lane);
        finish_logits<Traits>(s, p, bias_bh, row0, key_col(n0), lane);

        float alpha[2];
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

        if (token_mass_in_loop) {
            // The only key block: the running sum is the final normaliser.
            float inv_l[2];
            #pragma unroll
            for (int i = 0; i < 2; ++i) {
                const float l = quad_sum(l_run[i]);
                inv_l[i] = (row0 + 8 * i < p.M && l > 0.f) ? 1.f / l : 0.f;
            }
            add_token_mass<Traits>(s, inv_l, sColSum, token_mass_bh, p.token_mass_stride[2], n0, p.N, warp, lane);
        }

        if (p.prob_mult != nullptr) {
            #pragma unroll
            for (int nt = 0; nt < kNT; ++nt) {
                #pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const int row = row0 + 8 * (r / 2);
                    const int col = n0 + nt * 8 + tig * 2 + (r & 1);
                    s[nt][r] *= (row < p.M && col < p.N)
                        ? load_as_float(p.prob_mult, pm_bh + row * p.prob_mult_stride[2]
                                                         + col * p.prob_mult_stride[3], p.prob_mult_dtype)
                        : 0.f;
                }
            }
        }

        #pragma unroll
        for (int dt = 0; dt < kDT; ++dt) {
            o[dt][0] *= alpha[0];
            o[dt][1] *= alpha[0];
            o[dt][2] *= alpha[1];
            o[dt][3] *= alpha[1];
        }
        const Elem* sVs = sV + (j & 1) * kBlockN * kStride;
        #pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
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

    // ---- output: staged through the K/V buffers for 16-byte stores --------------------------
    __syncthreads();  // every warp is done with sK / sV
    {
        Elem* sO = sK + warp * 16 * kStride;  // this warp's 16 rows
        const int r = lane >> 2;
        #pragma unroll
        for (int dt = 0; dt < kDT; ++dt) {
            if (dt < 2 * dv_pairs) {
                *reinterpret_cast<uint32_t*>(sO + r * kStride + dt * 8 + tig * 2) =
                    ElemTraits<Elem>::pack(o[dt][0] * inv_l[0], o[dt][1] * inv_l[0]);
                *reinterpret_cast<uint32_t*>(sO + (r + 8) * kStride + dt * 8 + tig * 2) =
                    ElemTraits<Elem>::pack(o[dt][2] * inv_l[1], o[dt][3] * inv_l[1]);
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

    if (p.lse != nullptr && tig == 0) {
        #pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int row = row0 + 8 * i;
            if (row < p.M) {
                // Only this thread's CTA covers (b, h, row): a plain read-add-write.
                float* ptr = p.lse + b * p.lse_stride[0] + h * p.lse_stride[1] + row * p.lse_stride[2];
                *ptr += lse[i];
            }
        }
    }

    // ---- token mass over several key blocks: recompute S with the final (m, l) --------------
    if (p.token_mass != nullptr && n_blocks > 1) {
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
                                     key_pairs_from(n0, p.N), lane);
            finish_logits<Traits>(s, p, bias_bh, row0, key_col(n0), lane);
            normalise<Traits>(s, m_ref, inv_l);
            const float ones[2] = {1.f, 1.f};  // already normalised; rows past M have inv_l = 0
            add_token_mass<Traits>(s, ones, sColSum, token_mass_bh, p.token_mass_stride[2], n0, p.N, warp, lane);
        }
    }

    // ---- maps / head maps: logits of the captured token columns only -------------------------
    if (p.maps != nullptr || p.head_maps != nullptr) {
        const int64_t tok_b = b * p.tokens_stride[0];
        auto token = [&](int t) { return load_index(p.tokens, tok_b + t * p.tokens_stride[1], p.tokens_dtype); };
        auto load_token_rows = [&](int t0, int stage) {
            load_tile<Traits, kBlockN>(sK + stage * kBlockN * kStride, [&](int r) -> const Elem* {
                return t0 + r < p.T ? k_bh + token(t0 + r) * p.k_stride[2] : nullptr;
            }, p.k_stride[3], p.D, p.k_vec, k_base);
        };
        const float weight = p.head_weights == nullptr ? 1.f
            : load_as_float(p.head_weights, b * p.head_weights_stride[0] + h * p.head_weights_stride[1],
                            p.head_weights_dtype);
        const int t_blocks = (p.T + kBlockN - 1) / kBlockN;
        __syncthreads();  // the previous users of sK (output staging, token-mass pass) are done
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
                                     key_pairs_from(t0, p.T), lane);
            finish_logits<Traits>(s, p, bias_bh, row0, [&](int c) -> int64_t {
                return t0 + c < p.T ? token(t0 + c) : -1;
            }, lane);
            normalise<Traits>(s, m_ref, inv_l);
            #pragma unroll
            for (int nt = 0; nt < kNT; ++nt) {
                #pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const int row = row0 + 8 * (r / 2);
                    const int t = t0 + nt * 8 + tig * 2 + (r & 1);
                    if (row < p.M && t < p.T) {
                        if (p.head_maps != nullptr) {
                            // (b, h, row) belongs to this CTA alone: read-add-write.
                            float* ptr = p.head_maps + b * p.head_maps_stride[0] + h * p.head_maps_stride[1]
                                         + row * p.head_maps_stride[2] + t * p.head_maps_stride[3];
                            *ptr += s[nt][r];
                        }
                        if (p.maps != nullptr) {
                            // The heads of one batch item are other CTAs adding to the same map.
                            atomicAdd(p.maps + b * p.maps_stride[0] + row * p.maps_stride[1]
                                          + t * p.maps_stride[2], weight * s[nt][r]);
                        }
                    }
                }
            }
        }
    }
}

}  // namespace attnctl
