// Tile shapes per head-dim tile. Plain constexpr, included by host and device code.
//
// A head-dim tile is the compile-time width of the Q/K/V tiles. It is padded only to the
// MMA k-step of 16 (40 -> 48, 80 -> 80, 160 -> 160), where FlashAttention pads to 64, 96
// and 192: SD1.5's head dims waste 17 %, 0 % and 0 % of the tensor-core work instead of
// 38 %, 17 % and 17 %. Every tile also serves any smaller multiple of 8 (zero-filled in
// shared memory and k-steps past the real D skipped at run time), so the six tiles cover
// every head dim the op accepts; 256 is the generic tile for 168..256.
#pragma once

namespace attnctl {

constexpr int kHeadDimTiles[] = {48, 64, 80, 128, 160, 256};

// The smallest tile that holds max(D, Dv), or 0 when none does (D > 256).
constexpr int head_dim_tile(int d, int dv) {
    const int need = d > dv ? d : dv;
    for (int tile : kHeadDimTiles) {
        if (need <= tile) return tile;
    }
    return 0;
}

template <int kHeadDim_>
struct KernelTraits {
    static constexpr int kHeadDim = kHeadDim_;
    // One warp owns 16 query rows (one m16 MMA row block) through the whole kernel, so the
    // softmax statistics of a row never leave its warp. Narrow tiles use 8 warps: more rows
    // share each K/V tile in shared memory; wide tiles use 4 to bound registers (the O
    // accumulator is kHeadDim / 2 floats a thread).
    static constexpr int kNWarps = kHeadDim <= 80 ? 8 : 4;
    static constexpr int kBlockM = 16 * kNWarps;
    // 80 keys hold SD's 77 text tokens in one block (3 padding columns, where 64 would need
    // two blocks and 128 would waste 40 %): cross-attention runs single-pass, token mass
    // included. The generic 256 tile takes 32 keys to keep S + O within the register file.
    static constexpr int kBlockN = kHeadDim == 256 ? 32 : 80;
    static constexpr int kNThreads = 32 * kNWarps;
    // 8-warp tiles are held to 2 CTAs per SM (at most 128 registers a thread, which fits
    // their S + O accumulators without spilling): 16 warps per SM hide the memory latency
    // of cross-attention. Left to its own heuristics ptxas chose 128 registers for the 48
    // tile anyway but spilled 32 bytes on sm_80; stating the target makes it allocate
    // without spills.
    static constexpr int kMinBlocksPerSM = kNWarps == 8 ? 2 : 1;
    // Row pitch of every shared-memory tile, in elements: 8 more than the tile makes the
    // pitch an odd number of 16-byte chunks, so the 8 row addresses of an ldmatrix fall in
    // 8 different bank groups (no conflicts) without a swizzle.
    static constexpr int kSmemStride = kHeadDim + 8;
    static constexpr int kElemBytes = 2;
    static constexpr int kSmemQ = kBlockM * kSmemStride * kElemBytes;
    static constexpr int kSmemKV = 2 /*K,V*/ * 2 /*stages*/ * kBlockN * kSmemStride * kElemBytes;
    static constexpr int kSmemColSum = kNWarps * kBlockN * 4;  // per-warp column sums
    static constexpr int kSmemBytes = kSmemQ + kSmemKV + kSmemColSum;
    // The two-source kernel holds a second query tile (item b's own, beside item source[b]'s).
    static constexpr int kSmemOwnBytes = kSmemBytes + kSmemQ;

    static_assert(kHeadDim % 16 == 0, "head-dim tile must be a multiple of the MMA k-step");
    static_assert(kBlockN % 16 == 0, "key block must be a multiple of 16 (ldmatrix.x4 pairs)");
    // The output is staged through the K/V buffers after the main loop.
    static_assert(4 * kBlockN >= kBlockM, "K/V buffers too small to stage the output tile");
};

}  // namespace attnctl
