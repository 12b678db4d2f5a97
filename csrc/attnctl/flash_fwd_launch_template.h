// Launch of one (element type, head-dim tile) instantiation. Included only by the
// flash_fwd_hdim*.cu files, one instantiation each, so ninja compiles them in parallel.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "flash_fwd.h"
#include "flash_fwd_kernel.h"

namespace attnctl {

template <typename Elem, int kHeadDim>
void run_attention_fwd(const AttentionParams& params, cudaStream_t stream) {
    using Traits = KernelTraits<kHeadDim>;
    auto kernel = &attention_fwd_kernel<Traits, Elem>;
    constexpr int kSmem = Traits::kSmemBytes;
    if (kSmem > 48 * 1024) {
        // Above 48 KB a kernel must opt in to dynamic shared memory (per device context).
        const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
        if (err != cudaSuccess) {
            throw std::runtime_error(std::string("attnctl CUDA: cannot reserve ") + std::to_string(kSmem) +
                                     " bytes of shared memory for head-dim tile " + std::to_string(kHeadDim) +
                                     ": " + cudaGetErrorString(err));
        }
    }
    const dim3 grid((params.M + Traits::kBlockM - 1) / Traits::kBlockM, params.H, params.B);
    kernel<<<grid, Traits::kNThreads, kSmem, stream>>>(params);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) {
        throw std::runtime_error(std::string("attnctl CUDA: kernel launch failed (head-dim tile ") +
                                 std::to_string(kHeadDim) + "): " + cudaGetErrorString(err));
    }
}

}  // namespace attnctl
