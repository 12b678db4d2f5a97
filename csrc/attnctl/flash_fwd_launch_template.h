// Launch of one (element type, head-dim tile) instantiation. Included only by the
// flash_fwd_hdim*.cu files, one instantiation each, so ninja compiles them in parallel.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "flash_fwd.h"
#include "flash_fwd_kernel.h"

namespace attnctl {

template <typename Kernel>
void launch(Kernel kernel, int smem, int head_dim, int block_m, int threads, const AttentionParams& params,
            cudaStream_t stream) {
    if (smem > 48 * 1024) {
        // Above 48 KB a kernel must opt in to dynamic shared memory (per device context).
        const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
        if (err != cudaSuccess) {
            throw std::runtime_error(std::string("attnctl CUDA: cannot reserve ") + std::to_string(smem) +
                                     " bytes of shared memory for head-dim tile " + std::to_string(head_dim) +
                                     ": " + cudaGetErrorString(err));
        }
    }
    const dim3 grid((params.M + block_m - 1) / block_m, params.H, params.B);
    kernel<<<grid, threads, smem, stream>>>(params);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) {
        throw std::runtime_error(std::string("attnctl CUDA: kernel launch failed (head-dim tile ") +
                                 std::to_string(head_dim) + "): " + cudaGetErrorString(err));
    }
}

template <typename Elem, int kHeadDim>
void run_attention_fwd(const AttentionParams& params, cudaStream_t stream) {
    using Traits = KernelTraits<kHeadDim>;
    if (params.own_v != nullptr) {
        launch(&attention_fwd_own_kernel<Traits, Elem>, Traits::kSmemOwnBytes, kHeadDim, Traits::kBlockM,
               Traits::kNThreads, params, stream);
    } else {
        launch(&attention_fwd_kernel<Traits, Elem>, Traits::kSmemBytes, kHeadDim, Traits::kBlockM,
               Traits::kNThreads, params, stream);
    }
}

}  // namespace attnctl
