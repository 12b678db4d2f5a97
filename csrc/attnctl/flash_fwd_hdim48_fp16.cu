// Instantiation: fp16, head-dim tile 48 (one per file so that builds run in parallel).
#include "flash_fwd_launch_template.h"

template void attnctl::run_attention_fwd<__half, 48>(const attnctl::AttentionParams&, cudaStream_t);
