// Entry points of the kernel instantiations, one per (element type, head-dim tile); each is
// defined in its own flash_fwd_hdim<tile>_<dtype>.cu.
#pragma once

#include <cuda_runtime.h>

#include "params.h"

namespace attnctl {

// Launches on `stream`; throws std::runtime_error if the launch fails. Arguments are
// validated by attention_api.cpp before this is reached.
template <typename Elem, int kHeadDim>
void run_attention_fwd(const AttentionParams& params, cudaStream_t stream);

}  // namespace attnctl
