// Host API of the CUDA backend: validation and dispatch, no Python and no torch. The
// pybind11 module (bindings.cpp) is a thin conversion layer over these functions.
#pragma once

#include <cstdint>

#include "params.h"

namespace attnctl {

// Throws std::invalid_argument (Python ValueError) naming the argument when `params` cannot
// be launched: a null required pointer, a size < 1, an unsupported head dim or dtype code, a
// pointer not aligned to its element, a capture without its tokens, a written buffer with
// stride 0 on a dim longer than 1, a grid too large. Reads no device memory.
void check_params(const AttentionParams& params);

// Sets q_vec / k_vec / v_vec / out_vec: whether 16-byte vector accesses are legal for each.
void set_vector_flags(AttentionParams& params);

struct KernelConfig {
    int head_dim_tile, block_m, block_n, threads, smem_bytes;
    int own_smem_bytes;  // of the two-source kernel (a second query tile)
};

// The tile a (D, Dv) pair runs on; throws std::invalid_argument when none exists.
KernelConfig kernel_config(int head_dim, int value_dim);

// check_params, then the device checks (std::runtime_error when there is no usable CUDA
// device or its compute capability is below 8.0), then the launch on `stream` of `device`.
void attention_forward(AttentionParams params, int device, std::uintptr_t stream);

}  // namespace attnctl
