// Validation and dispatch for the CUDA backend. Every check runs before any CUDA call, so a
// machine without a GPU reports bad arguments exactly as a GPU machine does.
#include "attention_api.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "flash_fwd.h"
#include "kernel_traits.h"

namespace attnctl {
namespace {

constexpr int kMaxHeadDim = 256;
constexpr int kMaxGridYZ = 65535;  // gridDim.y holds H, gridDim.z holds B

const char* dtype_name(int code) {
    switch (code) {
        case kFloat16: return "float16";
        case kBFloat16: return "bfloat16";
        case kFloat32: return "float32";
        case kInt32: return "int32";
        case kInt64: return "int64";
        default: return "unknown";
    }
}

int dtype_bytes(int code) {
    switch (code) {
        case kFloat16: case kBFloat16: return 2;
        case kFloat32: case kInt32: return 4;
        default: return 8;
    }
}

[[noreturn]] void fail(const std::string& message) {
    throw std::invalid_argument("attnctl CUDA backend: " + message);
}

void require_size(const char* name, int value) {
    if (value < 1) fail(std::string(name) + ": expected >= 1, got " + std::to_string(value));
}

void require_head_dim(const char* name, int value) {
    if (value < 8 || value > kMaxHeadDim || value % 8 != 0) {
        fail(std::string(name) + ": expected a multiple of 8 from 8 to " + std::to_string(kMaxHeadDim) +
             ", got " + std::to_string(value));
    }
}

void require_pointer(const char* name, const void* ptr) {
    if (ptr == nullptr) fail(std::string(name) + ": null device pointer");
}

void require_aligned(const char* name, const void* ptr, int bytes) {
    if (ptr != nullptr && reinterpret_cast<std::uintptr_t>(ptr) % bytes != 0) {
        fail(std::string(name) + ": pointer " + std::to_string(reinterpret_cast<std::uintptr_t>(ptr)) +
             " is not aligned to its " + std::to_string(bytes) + "-byte elements");
    }
}

void require_float_dtype(const char* name, const void* ptr, int code) {
    if (ptr != nullptr && code != kFloat16 && code != kBFloat16 && code != kFloat32) {
        fail(std::string(name) + ": expected dtype code 0 (float16), 1 (bfloat16) or 2 (float32), got " +
             std::to_string(code));
    }
}

// A buffer the kernel writes must not alias itself: stride 0 on a dim longer than 1 would
// make several rows the same memory (a race for the read-add-write captures).
template <int kDims>
void require_distinct(const char* name, const void* ptr, const int64_t (&stride)[kDims], const int (&size)[kDims],
                      const char* dims) {
    if (ptr == nullptr) return;
    for (int i = 0; i < kDims; ++i) {
        if (size[i] > 1 && stride[i] == 0) {
            fail(std::string(name) + ": stride 0 on dim " + std::to_string(i) + " (" + dims + ") of size " +
                 std::to_string(size[i]) + "; a written buffer must not overlap itself");
        }
    }
}

// 16-byte copies need a unit d stride, a 16-byte aligned base and every other stride (of a
// dim longer than 1) a multiple of 8 two-byte elements.
bool vectorizable(const void* ptr, const int64_t (&stride)[4], const int (&size)[4]) {
    if (stride[3] != 1 || reinterpret_cast<std::uintptr_t>(ptr) % 16 != 0) return false;
    for (int i = 0; i < 3; ++i) {
        if (size[i] > 1 && stride[i] % 8 != 0) return false;
    }
    return true;
}

template <typename Elem>
void dispatch_tile(const AttentionParams& p, cudaStream_t stream) {
    switch (head_dim_tile(p.D, p.Dv)) {
        case 48: return run_attention_fwd<Elem, 48>(p, stream);
        case 64: return run_attention_fwd<Elem, 64>(p, stream);
        case 80: return run_attention_fwd<Elem, 80>(p, stream);
        case 128: return run_attention_fwd<Elem, 128>(p, stream);
        case 160: return run_attention_fwd<Elem, 160>(p, stream);
        case 256: return run_attention_fwd<Elem, 256>(p, stream);
        default: fail("no kernel for D=" + std::to_string(p.D) + ", Dv=" + std::to_string(p.Dv));
    }
}

// Makes `device` current for the launch and restores the previous device afterwards, so the
// caller's (torch's) notion of the current device is left as it was.
class DeviceGuard {
  public:
    explicit DeviceGuard(int device) {
        check(cudaGetDevice(&previous_), "cudaGetDevice");
        if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
    }
    ~DeviceGuard() {
        int current = previous_;
        if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
    }
    DeviceGuard(const DeviceGuard&) = delete;
    DeviceGuard& operator=(const DeviceGuard&) = delete;

  private:
    static void check(cudaError_t err, const char* what) {
        if (err != cudaSuccess) {
            throw std::runtime_error(std::string("attnctl CUDA backend: ") + what + " failed: " + cudaGetErrorString(err));
        }
    }
    int previous_ = 0;
};

void check_device(int device) {
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0) {
        cudaGetLastError();  // clear, so a later call does not report this again
        // Without a GPU the runtime finds no driver and reports it as "insufficient"; say both.
        throw std::runtime_error(std::string("attnctl CUDA backend: no usable CUDA device (") +
                                 (err != cudaSuccess ? cudaGetErrorString(err) : "device count is 0") +
                                 "): no NVIDIA GPU or driver, or a driver older than the CUDA " +
                                 std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10) +
                                 " runtime the module was built with");
    }
    if (device < 0 || device >= count) {
        fail("device: expected an index in [0, " + std::to_string(count) + "), got " + std::to_string(device));
    }
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    if (major < 8) {
        throw std::runtime_error("attnctl CUDA backend: device " + std::to_string(device) + " has compute capability " +
                                 std::to_string(major) + "." + std::to_string(minor) +
                                 "; the kernels need 8.0 or newer (mma.sync bf16, cp.async)");
    }
}

// Dtype and token checks of one term's capture; names carry `prefix` ("" or "own_").
void check_capture_arguments(const std::string& prefix, const CaptureBuffers& c) {
    require_float_dtype((prefix + "head_weights").c_str(), c.head_weights, c.head_weights_dtype);
    if (c.maps != nullptr || c.head_maps != nullptr) {
        if (c.tokens == nullptr) fail(prefix + "tokens: maps and head_maps need token indices, got a null pointer");
        require_size(prefix == "" ? "T (number of tokens)" : "own_T (number of tokens)", c.T);
        if (c.tokens_dtype != kInt32 && c.tokens_dtype != kInt64) {
            fail(prefix + "tokens: expected dtype code 3 (int32) or 4 (int64), got " + std::to_string(c.tokens_dtype));
        }
    }
    if (c.head_weights != nullptr && c.maps == nullptr) {
        fail(prefix + "head_weights: given without maps, which is what they weight");
    }
}

// Alignment and self-overlap checks of one term's capture.
void check_capture_memory(const std::string& prefix, const CaptureBuffers& c, const AttentionParams& p) {
    auto name = [&](const char* field) { return prefix + field; };
    if (c.head_weights != nullptr) {
        require_aligned(name("head_weights").c_str(), c.head_weights, dtype_bytes(c.head_weights_dtype));
    }
    if (c.tokens != nullptr && (c.maps != nullptr || c.head_maps != nullptr)) {
        require_aligned(name("tokens").c_str(), c.tokens, dtype_bytes(c.tokens_dtype));
    }
    require_aligned(name("token_mass").c_str(), c.token_mass, 4);
    require_aligned(name("maps").c_str(), c.maps, 4);
    require_aligned(name("head_maps").c_str(), c.head_maps, 4);
    require_aligned(name("lse").c_str(), c.lse, 4);
    require_distinct<3>(name("token_mass").c_str(), c.token_mass, c.token_mass_stride, {p.B, p.H, p.N}, "B, H, N");
    require_distinct<3>(name("maps").c_str(), c.maps, c.maps_stride, {p.B, p.M, c.T}, "B, M, T");
    require_distinct<4>(name("head_maps").c_str(), c.head_maps, c.head_maps_stride, {p.B, p.H, p.M, c.T},
                        "B, H, M, T");
    require_distinct<3>(name("lse").c_str(), c.lse, c.lse_stride, {p.B, p.H, p.M}, "B, H, M");
}

bool any_capture(const CaptureBuffers& c) {
    return c.token_mass != nullptr || c.maps != nullptr || c.head_maps != nullptr || c.lse != nullptr;
}

}  // namespace

void check_params(const AttentionParams& p) {
    require_pointer("q", p.q);
    require_pointer("k", p.k);
    require_pointer("v", p.v);
    require_pointer("out", p.out);
    require_size("B", p.B);
    require_size("H", p.H);
    require_size("M", p.M);
    require_size("N", p.N);
    require_head_dim("D (q/k head dim)", p.D);
    require_head_dim("Dv (v head dim)", p.Dv);
    if (p.dtype != kFloat16 && p.dtype != kBFloat16) {
        fail(std::string("dtype: q, k, v must be float16 (code 0) or bfloat16 (code 1), got code ") +
             std::to_string(p.dtype) + " (" + dtype_name(p.dtype) + ")");
    }
    require_float_dtype("bias", p.bias, p.bias_dtype);
    require_float_dtype("prob_mult", p.prob_mult, p.prob_mult_dtype);
    check_capture_arguments("", p.capture);
    // Its values (indices in [0, B)) are in device memory: attnctl.validation checks them.
    if (p.source != nullptr && p.source_dtype != kInt32 && p.source_dtype != kInt64) {
        fail("source: expected dtype code 3 (int32) or 4 (int64), got " + std::to_string(p.source_dtype));
    }
    if (p.own_v == nullptr && (p.own_prob_mult != nullptr || any_capture(p.own_capture))) {
        fail("own_values: null device pointer, but own_prob_mult or an own capture buffer is given");
    }
    if (p.own_v != nullptr) {
        require_float_dtype("own_prob_mult", p.own_prob_mult, p.own_prob_mult_dtype);
        check_capture_arguments("own_", p.own_capture);
    }
    if (p.H > kMaxGridYZ) fail("H: at most " + std::to_string(kMaxGridYZ) + " heads, got " + std::to_string(p.H));
    if (p.B > kMaxGridYZ) fail("B: at most " + std::to_string(kMaxGridYZ) + " batch items, got " + std::to_string(p.B));

    require_aligned("q", p.q, 2);
    require_aligned("k", p.k, 2);
    require_aligned("v", p.v, 2);
    require_aligned("out", p.out, 2);
    if (p.bias != nullptr) require_aligned("bias", p.bias, dtype_bytes(p.bias_dtype));
    if (p.prob_mult != nullptr) require_aligned("prob_mult", p.prob_mult, dtype_bytes(p.prob_mult_dtype));
    if (p.source != nullptr) require_aligned("source", p.source, dtype_bytes(p.source_dtype));
    check_capture_memory("", p.capture, p);
    require_distinct<4>("out", p.out, p.out_stride, {p.B, p.H, p.M, p.Dv}, "B, H, M, Dv");
    if (p.own_v != nullptr) {
        require_aligned("own_values", p.own_v, 2);
        if (p.own_prob_mult != nullptr) {
            require_aligned("own_prob_mult", p.own_prob_mult, dtype_bytes(p.own_prob_mult_dtype));
        }
        check_capture_memory("own_", p.own_capture, p);
    }
}

void set_vector_flags(AttentionParams& p) {
    p.q_vec = vectorizable(p.q, p.q_stride, {p.B, p.H, p.M, p.D});
    p.k_vec = vectorizable(p.k, p.k_stride, {p.B, p.H, p.N, p.D});
    p.v_vec = vectorizable(p.v, p.v_stride, {p.B, p.H, p.N, p.Dv});
    p.out_vec = vectorizable(p.out, p.out_stride, {p.B, p.H, p.M, p.Dv});
    p.own_v_vec = p.own_v != nullptr && vectorizable(p.own_v, p.own_v_stride, {p.B, p.H, p.N, p.Dv});
}

KernelConfig kernel_config(int head_dim, int value_dim) {
    require_head_dim("D (q/k head dim)", head_dim);
    require_head_dim("Dv (v head dim)", value_dim);
    switch (head_dim_tile(head_dim, value_dim)) {
#define ATTNCTL_CONFIG(TILE)                                                                            \
    case TILE: {                                                                                        \
        using T = KernelTraits<TILE>;                                                                   \
        return KernelConfig{TILE, T::kBlockM, T::kBlockN, T::kNThreads, T::kSmemBytes, T::kSmemOwnBytes};\
    }
        ATTNCTL_CONFIG(48)
        ATTNCTL_CONFIG(64)
        ATTNCTL_CONFIG(80)
        ATTNCTL_CONFIG(128)
        ATTNCTL_CONFIG(160)
        ATTNCTL_CONFIG(256)
#undef ATTNCTL_CONFIG
        default: fail("no kernel for D=" + std::to_string(head_dim) + ", Dv=" + std::to_string(value_dim));
    }
}

void attention_forward(AttentionParams params, int device, std::uintptr_t stream) {
    check_params(params);
    set_vector_flags(params);
    check_device(device);
    DeviceGuard guard(device);
    const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    if (params.dtype == kFloat16) {
        dispatch_tile<__half>(params, s);
    } else {
        dispatch_tile<__nv_bfloat16>(params, s);
    }
}

}  // namespace attnctl
