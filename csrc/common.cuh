// Shared device helpers for the pefops CUDA kernels (csrc/*.cu).
//
// Conventions:
//  * device code works on the CUDA scalar types (float, __half, __nv_bfloat16); CudaType<> maps
//    at::Half / at::BFloat16 to them. torch builds extensions with __CUDA_NO_HALF_CONVERSIONS__ and
//    friends, so every conversion is spelled out with an intrinsic (Cvt<>).
//  * all arithmetic is float32; loads convert on the way in, stores round (RNE) on the way out.
//  * "VEC" is a vector width in elements: either 1 (scalar path) or 16 / sizeof(T) (one 16-byte
//    load). The host picks 16 bytes only when the base pointer is 16-byte aligned and the row length
//    is a multiple of VEC, so a vector never straddles a row end.
#pragma once

#include <cstdint>

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace pefops {

constexpr unsigned kFullMask = 0xffffffffu;

// Constants the Python side defines in kernels/shared.py (tests/csrc/test_shared_constants.py checks
// that the two agree): the activation codes the adapter kernels switch on, and the largest bottleneck
// size r the adapter decode kernels serve.
enum Activation : int {
  kIdentity = 0,
  kRelu = 1,
  kGelu = 2,      // exact, erf
  kGeluTanh = 3,  // tanh approximation ("gelu_new")
  kSilu = 4,
  kTanh = 5,
  kLeakyRelu = 6,
};
constexpr int kNumActivations = 7;
constexpr int kMaxRank = 1024;

// at:: scalar type -> CUDA scalar type used in device code.
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) {
    return __float2bfloat16_rn(v);
  }
};

// Elements per 16-byte vector.
template <typename T>
constexpr int vec16() {
  return static_cast<int>(16 / sizeof(T));
}

// Two 16-bit values packed in a 32-bit word -> 2 floats (element 0 in the low half).
template <typename T>
__device__ __forceinline__ void unpack_pair(uint32_t w, float* out);

template <>
__device__ __forceinline__ void unpack_pair<__half>(uint32_t w, float* out) {
  out[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
  out[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}

// bf16 -> fp32 is exact: the bf16 bits are the high half of the fp32 bits.
template <>
__device__ __forceinline__ void unpack_pair<__nv_bfloat16>(uint32_t w, float* out) {
  out[0] = __uint_as_float(w << 16);
  out[1] = __uint_as_float(w & 0xffff0000u);
}

// One 16-byte word -> 16 / sizeof(T) floats (element 0 sits in the low bits: little endian).
// The 16-bit types (__half, __nv_bfloat16): four packed pairs.
template <typename T>
__device__ __forceinline__ void unpack16(const uint4& u, float* out) {
  static_assert(sizeof(T) == 2, "unpack16: float has its own specialisation; T must be 16-bit");
  unpack_pair<T>(u.x, out + 0);
  unpack_pair<T>(u.y, out + 2);
  unpack_pair<T>(u.z, out + 4);
  unpack_pair<T>(u.w, out + 6);
}

template <>
__device__ __forceinline__ void unpack16<float>(const uint4& u, float* out) {
  out[0] = __uint_as_float(u.x);
  out[1] = __uint_as_float(u.y);
  out[2] = __uint_as_float(u.z);
  out[3] = __uint_as_float(u.w);
}

// Load VEC elements of T from global memory (read-only path) as floats. VEC is 1 or vec16<T>();
// for the vector case p must be 16-byte aligned.
template <typename T, int VEC>
__device__ __forceinline__ void load_global_f32(const T* __restrict__ p, float (&out)[VEC]) {
  static_assert(VEC == 1 || VEC == vec16<T>(), "VEC must be 1 or one 16-byte vector");
  if constexpr (VEC == 1) {
    out[0] = Cvt<T>::to_float(p[0]);
  } else {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    unpack16<T>(u, out);
  }
}

// Same, from shared memory.
template <typename T, int VEC>
__device__ __forceinline__ void load_shared_f32(const T* p, float (&out)[VEC]) {
  static_assert(VEC == 1 || VEC == vec16<T>(), "VEC must be 1 or one 16-byte vector");
  if constexpr (VEC == 1) {
    out[0] = Cvt<T>::to_float(p[0]);
  } else {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    unpack16<T>(u, out);
  }
}

// VEC consecutive floats from shared memory (p aligned to 4 * VEC bytes when VEC is a multiple of 4).
template <int VEC>
__device__ __forceinline__ void load_shared_floats(const float* p, float (&out)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int i = 0; i < VEC; i += 4) {
      const float4 f = *reinterpret_cast<const float4*>(p + i);
      out[i + 0] = f.x;
      out[i + 1] = f.y;
      out[i + 2] = f.z;
      out[i + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = p[i];
  }
}

// Copy VEC elements global -> shared unchanged, or write zeros when !valid.
template <typename T, int VEC>
__device__ __forceinline__ void copy_or_zero(T* dst, const T* __restrict__ src, bool valid) {
  if constexpr (VEC == 1) {
    dst[0] = valid ? src[0] : Cvt<T>::from_float(0.0f);
  } else {
    uint4 u = make_uint4(0u, 0u, 0u, 0u);  // all-zero bits are +0.0 in fp32 / fp16 / bf16
    if (valid) u = *reinterpret_cast<const uint4*>(src);
    *reinterpret_cast<uint4*>(dst) = u;
  }
}

// Reduce-scatter of N per-lane partial sums over aligned groups of G lanes (G a power of two,
// 1 <= G <= 32, warp-uniform; N a power of two known at compile time). All 32 lanes must call it.
//
// Instead of reducing each of the N values over log2(G) butterfly steps (N * log2(G) shuffles),
// every step exchanges half of the values still held: lane gl = lane % G keeps the lower half of its
// indices when bit o of gl is clear and the upper half when set, adding the partner's copy of the
// half it keeps. That costs N/2 + N/4 + ... shuffles (about N). Steps run for o = 1, 2, 4, ... < G,
// so the number of halvings done (and hence which entries of v are live) only depends on the
// compile-time step index, never on the run-time G.
//
// Result: v[0 .. nf) with nf = max(1, N / G) hold the group totals of the original indices
// base + 0 .. base + nf - 1, where base is the return value. When N < G, several lanes hold the same
// totals; exactly the lanes with gl < N are the "owners" (one per index) and should write.
namespace detail {
// One halving step (offset 1 << STEP) and, recursively, the following ones. Template recursion keeps
// the number of live values a compile-time constant at every step, so v stays in registers.
template <int N, int STEP>
__device__ __forceinline__ void reduce_scatter_step(float (&v)[N], int gl, int G, int& base) {
  if constexpr (STEP < 5) {
    constexpr int o = 1 << STEP;
    constexpr int n = N >> STEP;  // live values before this step
    if (o < G) {
      if constexpr (n > 1) {
        const bool upper = (gl & o) != 0;
#pragma unroll
        for (int i = 0; i < n / 2; ++i) {
          const float send = upper ? v[i] : v[i + n / 2];
          const float keep = upper ? v[i + n / 2] : v[i];
          v[i] = keep + __shfl_xor_sync(kFullMask, send, o);
        }
        if (upper) base += n / 2;
      } else {
        v[0] += __shfl_xor_sync(kFullMask, v[0], o);
      }
      reduce_scatter_step<N, STEP + 1>(v, gl, G, base);
    }
  }
}
}  // namespace detail

template <int N>
__device__ __forceinline__ int group_reduce_scatter(float (&v)[N], int gl, int G) {
  static_assert(N >= 1 && (N & (N - 1)) == 0, "N must be a power of two");
  int base = 0;
  detail::reduce_scatter_step<N, 0>(v, gl, G, base);
  return base;
}

// Block-wide sum (blockDim.x a multiple of 32, <= 1024); every thread gets the total.
// `scratch` holds at least 33 floats of shared memory; the call starts and ends with __syncthreads.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < nwarps ? scratch[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) w += __shfl_xor_sync(kFullMask, w, o);
    if (lane == 0) scratch[32] = w;
  }
  __syncthreads();
  return scratch[32];
}

}  // namespace pefops
