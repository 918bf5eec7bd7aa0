// Mixed-task bottleneck adapters, decode shapes (T <= 16 rows): forward. Every row t uses its own
// adapter i = adapter_index[t] of N stacked adapters:
//
//   z_t   = x_t @ Wd[i]^T + bd[i]                 [r]  fp32, pre-activation (returned)
//   u_t   = act(z_t) @ Wu[i]^T + bu[i]            [H]
//   y_t   = residual_t + scaling[i] * u_t         [H]  (scaling: fp32 [N, H])
//   out_t = LayerNorm(y_t) * ln_w + ln_b          when ln_w is given (one LayerNorm for all adapters;
//           per-row mean / rstd are returned), else y_t
//
// Everything is accumulated in float32; only `out` is rounded to the input dtype. A row whose index
// lies outside [0, N) reads no weights and comes back NaN (out, z, and with LayerNorm mean / rstd):
// checking on the host would cost a device synchronisation.
//
// No sorting: each row reads its own adapter's weights. The time floor is reading the weights of
// the U distinct adapters in the batch once, 2 * U * H * r * sizeof(dtype) bytes; rows sharing an
// adapter read its weights again, from L2 (a 16-row batch of one adapter of H = 4096, r = 64 in bf16
// streams 1 MB of weights from HBM and up to 16 MB from L2). Launch latency (2-4 kernels) dominates
// such shapes unless captured in a CUDA graph.
//
// Kernels (all on the current stream):
//   1. down_kernel   grid (ceil(r / 32), T, S): block (bx, t, s) computes rows 32 bx .. 32 bx + 31 of
//      Wd[i] (8 warps x 4 rows) against x_t over one slice of KS hidden columns, lanes striding the
//      slice with 16-byte loads; warp reductions. With S == 1 it finishes z and a = act(z),
//      otherwise it writes fp32 partials [S, T, r] (S splits H so that a few rows still fill the GPU).
//   1b. finalize_kernel (only when S > 1): sums the partials in a fixed order (deterministic), adds
//      bd[i], writes z and a.
//   2. up_kernel     grid (ceil(H / rows_per_block), T): a_t staged in shared memory; each group of
//      G lanes (G = pow2 >= r / VEC, 4..32) owns 4 rows of Wu[i] and reduces across the group; the
//      group's first lane applies + bu, * scaling, + residual. Writes out (no LayerNorm) or an fp32
//      y scratch.
//   3. layernorm_rows_kernel (decode_common.cuh; only with LayerNorm): one block per row, two-pass
//      mean / variance in fp32.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "common.cuh"
#include "decode_common.cuh"
#include "ops.h"

namespace pefops {
namespace {

using namespace decode;  // kWarps, kThreads, kRowsPerWarp, kRowsPerBlock, kSliceQuantum, helpers

constexpr const char* kOpName = "multi_adapter_decode_forward";


__device__ __forceinline__ float nan_f() { return __int_as_float(0x7fc00000); }

__device__ __forceinline__ bool in_range(int64_t adapter, int N) { return adapter >= 0 && adapter < N; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// ---------------------------------------------------------------------------------------------
// Kernel 1: z partials of row t = blockIdx.y over the hidden slice s = blockIdx.z.
// (__launch_bounds__(256, 1): without the explicit 1, ptxas for sm_80 / sm_90 held the bf16 vector
// variant at 64 registers and spilled 4 bytes; with it, 96 registers and no spills.)
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, 1) down_kernel(
    const T* __restrict__ x,               // [T, H]
    const int64_t* __restrict__ index,     // [T]
    const T* __restrict__ wd,              // [N, r, H]
    const T* __restrict__ bd,              // [N, r] or nullptr (used only when S == 1)
    float* __restrict__ zpart,             // [S, T, r] (used only when S > 1)
    float* __restrict__ z_out,             // [T, r]    (used only when S == 1)
    float* __restrict__ a_out,             // [T, r]    (used only when S == 1)
    int ntok, int N, int H, int r, int KS, int act, float slope) {
  const int t = blockIdx.y;
  const int s = blockIdx.z;
  const int S = gridDim.z;
  const int64_t adapter = index[t];
  const bool valid = in_range(adapter, N);  // block-uniform
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int j0 = blockIdx.x * kRowsPerBlock + warp * kRowsPerWarp;
  if (j0 >= r) return;  // whole warp idle; no barrier follows
  const int k0 = s * KS;
  const int klen = min(KS, H - k0);  // > 0: S = ceil(H / KS)

  float acc[kRowsPerWarp];
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) acc[k] = 0.0f;
  if (valid) {
    const T* xrow = x + static_cast<int64_t>(t) * H + k0;
    const T* wrow[kRowsPerWarp];
    bool row_ok[kRowsPerWarp];
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
      row_ok[k] = j0 + k < r;  // warp-uniform
      wrow[k] = wd + (adapter * r + (row_ok[k] ? j0 + k : j0)) * static_cast<int64_t>(H) + k0;
    }
#pragma unroll 2
    for (int c = lane * VEC; c < klen; c += 32 * VEC) {
      float xv[VEC];
      float w[kRowsPerWarp][VEC];
      load_global_f32<T, VEC>(xrow + c, xv);
      load_rows_or_zero<T, VEC, kRowsPerWarp>(wrow, row_ok, c, w);
      fma_rows<VEC, kRowsPerWarp, 1>(acc, 0, w, xv);
    }
  }
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) acc[k] = warp_sum(acc[k]);
  if (lane != 0) return;
  const float nan = nan_f();
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
    const int j = j0 + k;
    if (j >= r) continue;
    const int64_t o = static_cast<int64_t>(t) * r + j;
    if (S == 1) {
      const float zz = valid ? acc[k] + (bd != nullptr ? Cvt<T>::to_float(bd[adapter * r + j]) : 0.0f) : nan;
      z_out[o] = zz;
      a_out[o] = apply_activation(zz, act, slope);
    } else {
      zpart[static_cast<int64_t>(s) * ntok * r + o] = valid ? acc[k] : nan;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel 1b: z = sum_s zpart[s] + bd[i] (fixed order), a = act(z). One thread per (t, j).
template <typename T>
__global__ void __launch_bounds__(kThreads) finalize_kernel(
    const float* __restrict__ zpart,    // [S, T, r]
    const int64_t* __restrict__ index,  // [T]
    const T* __restrict__ bd,           // [N, r] or nullptr
    float* __restrict__ z_out,          // [T, r]
    float* __restrict__ a_out,          // [T, r]
    int ntok, int N, int r, int S, int act, float slope) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  const int n = ntok * r;
  if (idx >= n) return;
  const int t = idx / r;
  const int j = idx - t * r;
  const int64_t adapter = index[t];
  float acc = 0.0f;
  for (int p = 0; p < S; ++p) acc += zpart[static_cast<int64_t>(p) * n + idx];
  if (in_range(adapter, N)) {
    acc += bd != nullptr ? Cvt<T>::to_float(bd[adapter * r + j]) : 0.0f;
  } else {
    acc = nan_f();
  }
  z_out[idx] = acc;
  a_out[idx] = apply_activation(acc, act, slope);
}

// ---------------------------------------------------------------------------------------------
// Kernel 2: u = a_t @ Wu[i]^T + bu[i]; y = residual_t + scaling[i] * u. Group gi of G lanes in warp
// w owns rows h0 + (w * 4 + k) * gpw + gi, k < 4 (gpw = 32 / G groups per warp): for each k the
// groups of a warp hold consecutive rows. Lane gl of a group reads columns j = gl VEC + m G VEC.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) up_kernel(
    const float* __restrict__ a,         // [T, r] fp32
    const int64_t* __restrict__ index,   // [T]
    const T* __restrict__ wu,            // [N, H, r]
    const T* __restrict__ bu,            // [N, H] or nullptr
    const float* __restrict__ scaling,   // [N, H] fp32
    const T* __restrict__ residual,      // [T, H]
    T* __restrict__ out,                 // [T, H] (written when y32 == nullptr)
    float* __restrict__ y32,             // [T, H] fp32 scratch for the LayerNorm kernel, or nullptr
    int N, int H, int r, int G) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* abuf = reinterpret_cast<float*>(smem_raw);  // [r]
  const int t = blockIdx.y;
  const int64_t adapter = index[t];
  const int gpw = 32 / G;
  const int rows_per_block = kWarps * gpw * kUpRowsPerGroup;
  const int h0 = blockIdx.x * rows_per_block;
  const int64_t row_base = static_cast<int64_t>(t) * H;

  if (!in_range(adapter, N)) {  // block-uniform: no barrier is skipped by part of the block
    const float nan = nan_f();
    for (int i = threadIdx.x; i < rows_per_block; i += kThreads) {
      const int h = h0 + i;
      if (h >= H) continue;
      if (y32 != nullptr) {
        y32[row_base + h] = nan;
      } else {
        out[row_base + h] = Cvt<T>::from_float(nan);
      }
    }
    return;
  }

  for (int j = threadIdx.x; j < r; j += kThreads) abuf[j] = a[static_cast<int64_t>(t) * r + j];
  __syncthreads();

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int gi = lane / G;
  const int gl = lane % G;
  int hrow[kUpRowsPerGroup];
  bool row_ok[kUpRowsPerGroup];
  const T* wrow[kUpRowsPerGroup];
#pragma unroll
  for (int k = 0; k < kUpRowsPerGroup; ++k) {
    hrow[k] = h0 + (warp * kUpRowsPerGroup + k) * gpw + gi;
    row_ok[k] = hrow[k] < H;
    wrow[k] = wu + (adapter * H + (row_ok[k] ? hrow[k] : 0)) * static_cast<int64_t>(r);
  }
  float acc[kUpRowsPerGroup];
#pragma unroll
  for (int k = 0; k < kUpRowsPerGroup; ++k) acc[k] = 0.0f;

#pragma unroll 2
  for (int j = gl * VEC; j < r; j += G * VEC) {
    float av[VEC];
    float w[kUpRowsPerGroup][VEC];
    load_rows_or_zero<T, VEC, kUpRowsPerGroup>(wrow, row_ok, j, w);
    load_shared_floats<VEC>(abuf + j, av);
    fma_rows<VEC, kUpRowsPerGroup, 1>(acc, 0, w, av);
  }
  // reduce within each aligned group of G lanes (xor offsets below G stay inside the group)
#pragma unroll
  for (int k = 0; k < kUpRowsPerGroup; ++k) {
    for (int o = G >> 1; o > 0; o >>= 1) acc[k] += __shfl_xor_sync(kFullMask, acc[k], o);
  }
  if (gl != 0) return;
#pragma unroll
  for (int k = 0; k < kUpRowsPerGroup; ++k) {
    const int h = hrow[k];
    if (h >= H) continue;
    const int64_t ah = adapter * H + h;
    const float u = acc[k] + (bu != nullptr ? Cvt<T>::to_float(bu[ah]) : 0.0f);
    const float y = Cvt<T>::to_float(residual[row_base + h]) + scaling[ah] * u;
    if (y32 != nullptr) {
      y32[row_base + h] = y;
    } else {
      out[row_base + h] = Cvt<T>::from_float(y);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

template <typename T>
void run_forward(const at::Tensor& x, const at::Tensor& index, const at::Tensor& down_weight,
                 const at::Tensor& down_bias, const at::Tensor& up_weight, const at::Tensor& up_bias,
                 const at::Tensor& scaling, const at::Tensor& residual,
                 const at::Tensor& ln_weight, const at::Tensor& ln_bias, float eps, int act,
                 float slope, AdapterDecodeOutputs& result) {
  const int ntok = static_cast<int>(x.size(0));
  const int H = static_cast<int>(x.size(1));
  const int N = static_cast<int>(down_weight.size(0));
  const int r = static_cast<int>(down_weight.size(1));
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto f32 = x.options().dtype(at::kFloat);

  const AdapterDecodePointers<T> p = adapter_decode_pointers<T>(
      x, down_weight, down_bias, up_weight, up_bias, scaling, residual, result);
  const int64_t* ip = index.data_ptr<int64_t>();
  constexpr int V = vec16<T>();

  // ---- kernel 1 (+1b): z and a = act(z), fp32 [T, r]
  const bool down_vec = H % V == 0 && aligned16(p.x) && aligned16(p.down_weight);
  const int row_blocks = (r + kRowsPerBlock - 1) / kRowsPerBlock;
  const int target_blocks = 2 * prop->multiProcessorCount;
  const int s_want = std::max(1, (target_blocks + row_blocks * ntok - 1) / (row_blocks * ntok));
  int KS = (H + s_want - 1) / s_want;
  KS = std::max(kSliceQuantum, (KS + kSliceQuantum - 1) / kSliceQuantum * kSliceQuantum);
  const int S = (H + KS - 1) / KS;
  at::Tensor a = at::empty({ntok, r}, f32);
  at::Tensor zpart;
  if (S > 1) zpart = at::empty({S, ntok, r}, f32);
  float* ap = a.data_ptr<float>();
  float* zpp = S > 1 ? zpart.data_ptr<float>() : nullptr;
  const dim3 grid1(row_blocks, ntok, S);
  with_vec_width<V>(down_vec, [&](auto vec) {
    down_kernel<T, decltype(vec)::value><<<grid1, kThreads, 0, stream>>>(
        p.x, ip, p.down_weight, p.down_bias, zpp, p.z, ap, ntok, N, H, r, KS, act, slope);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (S > 1) {
    const int n = ntok * r;
    finalize_kernel<T><<<(n + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        zpp, ip, p.down_bias, p.z, ap, ntok, N, r, S, act, slope);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // ---- kernel 2: y (fp32 scratch with LayerNorm, else out)
  const UpProjectionTiling up = up_projection_tiling<V>(r, p.up_weight);
  const size_t smem2 = static_cast<size_t>(r) * sizeof(float);  // <= 4 KB
  float* y32p = result.y32_or_null();
  const dim3 grid2((H + up.rows_per_block - 1) / up.rows_per_block, ntok);
  with_vec_width<V>(up.vectorised, [&](auto vec) {
    up_kernel<T, decltype(vec)::value><<<grid2, kThreads, smem2, stream>>>(
        ap, ip, p.up_weight, p.up_bias, p.scaling, p.residual, p.out, y32p, N, H, r, up.group);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  launch_layernorm_rows<T>(stream, ln_weight, ln_bias, eps, result);  // kernel 3, with LayerNorm
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_adapter_decode_forward(
    const at::Tensor& x, const at::Tensor& adapter_index, const at::Tensor& down_weight,
    const at::Tensor& down_bias, const at::Tensor& up_weight, const at::Tensor& up_bias,
    const at::Tensor& scaling, const at::Tensor& residual, const at::Tensor& ln_weight,
    const at::Tensor& ln_bias, double eps, int64_t activation, double negative_slope) {
  const int64_t r = check_adapter_args(kOpName, "rows", /*stacked_dims=*/1, x, down_weight,
                                       down_bias, up_weight, up_bias, scaling, residual, ln_weight,
                                       ln_bias, eps, activation);
  const int64_t ntok = x.size(0);
  const int64_t H = x.size(1);
  const int64_t N = down_weight.size(0);
  PEFOPS_CHECK(N >= 1 && N <= std::numeric_limits<int32_t>::max() &&
                   N * r * H <= std::numeric_limits<int64_t>::max() / 2,
               "down_weight has shape ", shape_str(down_weight),
               ", expected [N, r, H] with 1 <= N <= 2^31 - 1 adapters");
  CHECK_DEFINED(adapter_index);
  CHECK_DTYPE(adapter_index, at::kLong, "int64");
  CHECK_SHAPE(adapter_index, {ntok});
  CHECK_CONTIGUOUS(adapter_index);
  CHECK_SAME_DEVICE(adapter_index, x);

  return run_adapter_decode(kOpName, x, r, ln_weight, [&](auto type, AdapterDecodeOutputs& result) {
    run_forward<typename decltype(type)::type>(
        x, adapter_index, down_weight, down_bias, up_weight, up_bias, scaling, residual, ln_weight,
        ln_bias, static_cast<float>(eps), static_cast<int>(activation),
        static_cast<float>(negative_slope), result);
  });
}

}  // namespace pefops
