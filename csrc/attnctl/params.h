// Arguments of one attention launch, shared by the host API (attention_api.cpp) and the
// kernels. Plain data only: no torch types, so the extension's ABI is pointers and integers.
#pragma once

#include <cstdint>

namespace attnctl {

// Element types as the Python launcher names them (attnctl/backends/cuda_backend.py reads
// them from the module's `dtype_codes`, so this enum is the one definition).
enum DType : int {
    kFloat16 = 0,
    kBFloat16 = 1,
    kFloat32 = 2,
    kInt32 = 3,
    kInt64 = 4,
};

// The capture buffers of one term, fp32, accumulated into (`+=`); nullptr when not captured.
struct CaptureBuffers {
    float* token_mass;   // (B,H,N)
    float* maps;         // (B,M,T)
    float* head_maps;    // (B,H,M,T)
    float* lse;          // (B,H,M)
    const void* tokens;        // (B,T) through stride 0 on b; int32 or int64
    const void* head_weights;  // (B,H) through stride 0 on b; any float dtype
    // Strides in elements ([b, h|m, n|m|t], head_maps [b, h, m, t], tokens [b, t], weights [b, h]).
    int64_t token_mass_stride[3], maps_stride[3], head_maps_stride[4], lse_stride[3];
    int64_t tokens_stride[2], head_weights_stride[2];
    int T;
    int tokens_dtype, head_weights_dtype;
};

struct AttentionParams {
    // q (B,H,M,D), k (B,H,N,D), v (B,H,N,Dv), out (B,H,M,Dv): fp16 or bf16, all one dtype.
    const void* q;
    const void* k;
    const void* v;
    void* out;
    // Optional operands: nullptr when absent. bias / prob_mult broadcast to (B,H,M,N) through
    // stride 0; any float dtype.
    const void* bias;
    const void* prob_mult;
    CaptureBuffers capture;  // statistics of P (of P_src with injection)
    // Injection: (B,) batch indices, int32 or int64. Item b's logits use q, k and bias of item
    // source[b]; v, prob_mult, the captures and out stay b's. nullptr: source[b] = b.
    const void* source;
    // Two-source form (own_v not nullptr): out adds Σ_n P_b·own_prob_mult·own_v, P_b the
    // softmax of item b's own logits; own_v like v (any strides), own_prob_mult like
    // prob_mult; own_capture records P_b.
    const void* own_v;
    const void* own_prob_mult;
    CaptureBuffers own_capture;

    // Strides in elements, [b, h, seq, d] order.
    int64_t q_stride[4], k_stride[4], v_stride[4], out_stride[4];
    int64_t bias_stride[4], prob_mult_stride[4];
    int64_t source_stride;
    int64_t own_v_stride[4], own_prob_mult_stride[4];

    int B, H, M, N, D, Dv;
    float scale_log2;  // softmax scale times log2(e): the kernels use exp2

    int dtype;  // of q, k, v, own_v, out
    int bias_dtype, prob_mult_dtype, source_dtype, own_prob_mult_dtype;

    // Whether cp.async 16-byte copies may read the operand: unit stride on d, 16-byte aligned
    // base and every other stride a multiple of 8 elements. Otherwise an element-wise path runs.
    bool q_vec, k_vec, v_vec, out_vec, own_v_vec;
};

}  // namespace attnctl
