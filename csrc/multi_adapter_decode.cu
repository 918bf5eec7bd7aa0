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
//   3. layernorm_kernel (only with LayerNorm): one block per row, two-pass mean / variance in fp32.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>

#include "common.cuh"
#include "ops.h"

namespace pefops {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxTokens = 16;
constexpr int kDownRowsPerWarp = 4;
constexpr int kDownRowsPerBlock = kWarps * kDownRowsPerWarp;  // 32
constexpr int kSliceQuantum = 256;  // 32 lanes x one 16-byte vector of a 2-byte type
constexpr int kUpRowsPerGroup = 4;
constexpr int kUpMinGroup = 4;
constexpr int kLnThreads = 512;

__device__ __forceinline__ float activation_fn(float z, int act, float slope) {
  switch (act) {
    case kRelu:  // keeps NaN, like torch.relu
      return z < 0.0f ? 0.0f : z;
    case kGelu:  // erf
      return 0.5f * z * (1.0f + erff(z * 0.70710678118654752440f));
    case kGeluTanh: {  // tanh approximation
      const float inner = 0.79788456080286535588f * (z + 0.044715f * z * z * z);
      return 0.5f * z * (1.0f + tanhf(inner));
    }
    case kSilu:
      return z / (1.0f + expf(-z));
    case kTanh:
      return tanhf(z);
    case kLeakyRelu:
      return z > 0.0f ? z : z * slope;
    default:
      return z;
  }
}

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
  const int j0 = blockIdx.x * kDownRowsPerBlock + warp * kDownRowsPerWarp;
  if (j0 >= r) return;  // whole warp idle; no barrier follows
  const int k0 = s * KS;
  const int klen = min(KS, H - k0);  // > 0: S = ceil(H / KS)

  float acc[kDownRowsPerWarp];
#pragma unroll
  for (int k = 0; k < kDownRowsPerWarp; ++k) acc[k] = 0.0f;
  if (valid) {
    const T* xrow = x + static_cast<int64_t>(t) * H + k0;
    const T* wrow[kDownRowsPerWarp];
    bool row_ok[kDownRowsPerWarp];
#pragma unroll
    for (int k = 0; k < kDownRowsPerWarp; ++k) {
      row_ok[k] = j0 + k < r;  // warp-uniform
      wrow[k] = wd + (adapter * r + (row_ok[k] ? j0 + k : j0)) * static_cast<int64_t>(H) + k0;
    }
#pragma unroll 2
    for (int c = lane * VEC; c < klen; c += 32 * VEC) {
      float xv[VEC];
      float w[kDownRowsPerWarp][VEC];
      load_global_f32<T, VEC>(xrow + c, xv);
#pragma unroll
      for (int k = 0; k < kDownRowsPerWarp; ++k) {
        if (row_ok[k]) {
          load_global_f32<T, VEC>(wrow[k] + c, w[k]);
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v) w[k][v] = 0.0f;
        }
      }
#pragma unroll
      for (int k = 0; k < kDownRowsPerWarp; ++k) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[k] = fmaf(w[k][v], xv[v], acc[k]);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kDownRowsPerWarp; ++k) acc[k] = warp_sum(acc[k]);
  if (lane != 0) return;
  const float nan = nan_f();
#pragma unroll
  for (int k = 0; k < kDownRowsPerWarp; ++k) {
    const int j = j0 + k;
    if (j >= r) continue;
    const int64_t o = static_cast<int64_t>(t) * r + j;
    if (S == 1) {
      const float zz = valid ? acc[k] + (bd != nullptr ? Cvt<T>::to_float(bd[adapter * r + j]) : 0.0f) : nan;
      z_out[o] = zz;
      a_out[o] = activation_fn(zz, act, slope);
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
  a_out[idx] = activation_fn(acc, act, slope);
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
  const T* wrow[kUpRowsPerGroup];
#pragma unroll
  for (int k = 0; k < kUpRowsPerGroup; ++k) {
    hrow[k] = h0 + (warp * kUpRowsPerGroup + k) * gpw + gi;
    wrow[k] = wu + (adapter * H + (hrow[k] < H ? hrow[k] : 0)) * static_cast<int64_t>(r);
  }
  float acc[kUpRowsPerGroup];
#pragma unroll
  for (int k = 0; k < kUpRowsPerGroup; ++k) acc[k] = 0.0f;

#pragma unroll 2
  for (int j = gl * VEC; j < r; j += G * VEC) {
    float av[VEC];
    float w[kUpRowsPerGroup][VEC];
#pragma unroll
    for (int k = 0; k < kUpRowsPerGroup; ++k) {
      if (hrow[k] < H) {
        load_global_f32<T, VEC>(wrow[k] + j, w[k]);
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) w[k][v] = 0.0f;
      }
    }
    load_shared_floats<VEC>(abuf + j, av);
#pragma unroll
    for (int k = 0; k < kUpRowsPerGroup; ++k) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[k] = fmaf(w[k][v], av[v], acc[k]);
    }
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
// Kernel 3: LayerNorm over each fp32 row of y, two passes (mean, then centred sum of squares).
template <typename T>
__global__ void __launch_bounds__(kLnThreads) layernorm_kernel(
    const float* __restrict__ y32,  // [T, H]
    const T* __restrict__ ln_w,     // [H]
    const T* __restrict__ ln_b,     // [H] or nullptr
    T* __restrict__ out,            // [T, H]
    float* __restrict__ mean_out,   // [T]
    float* __restrict__ rstd_out,   // [T]
    int H, float eps) {
  __shared__ float scratch[33];
  const int t = blockIdx.x;
  const float* row = y32 + static_cast<int64_t>(t) * H;
  float sum = 0.0f;
  for (int h = threadIdx.x; h < H; h += blockDim.x) sum += row[h];
  const float mean = block_sum(sum, scratch) / static_cast<float>(H);
  float sq = 0.0f;
  for (int h = threadIdx.x; h < H; h += blockDim.x) {
    const float d = row[h] - mean;
    sq = fmaf(d, d, sq);
  }
  const float rstd = 1.0f / sqrtf(block_sum(sq, scratch) / static_cast<float>(H) + eps);
  if (threadIdx.x == 0) {
    mean_out[t] = mean;
    rstd_out[t] = rstd;
  }
  T* orow = out + static_cast<int64_t>(t) * H;
  for (int h = threadIdx.x; h < H; h += blockDim.x) {
    const float b = ln_b != nullptr ? Cvt<T>::to_float(ln_b[h]) : 0.0f;
    orow[h] = Cvt<T>::from_float((row[h] - mean) * rstd * Cvt<T>::to_float(ln_w[h]) + b);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

constexpr const char* kOpName = "multi_adapter_decode_forward";

bool is_aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

int next_pow2(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

std::string shape_of(const at::Tensor& t) { return c10::str(t.sizes()); }

void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& x,
                  std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.defined(), kOpName, ": ", name, " is undefined");
  TORCH_CHECK(t.device() == x.device(), kOpName, ": ", name, " is on ", t.device(),
              " but x is on ", x.device(), "; all tensors must be on the same CUDA device");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), kOpName, ": ", name, " has dtype ",
              t.scalar_type(), " but x has dtype ", x.scalar_type(),
              "; x, the weights, biases, residual and LayerNorm parameters must share one dtype");
  TORCH_CHECK(t.sizes().equals(shape), kOpName, ": ", name, " has shape ", shape_of(t),
              ", expected ", c10::IntArrayRef(shape));
  TORCH_CHECK(t.is_contiguous(), kOpName, ": ", name, " must be contiguous (call .contiguous())");
}

// An optional tensor: numel() == 0 means absent.
bool check_optional(const at::Tensor& t, const char* name, const at::Tensor& x,
                    std::initializer_list<int64_t> shape) {
  if (!t.defined() || t.numel() == 0) return false;
  check_tensor(t, name, x, shape);
  return true;
}

template <typename T>
const T* data_or_null(const at::Tensor& t, bool present) {
  return present ? reinterpret_cast<const T*>(t.data_ptr()) : nullptr;
}

template <typename AT>
void run_forward(const at::Tensor& x, const at::Tensor& index, const at::Tensor& down_weight,
                 const at::Tensor& down_bias, bool has_bd, const at::Tensor& up_weight,
                 const at::Tensor& up_bias, bool has_bu, const at::Tensor& scaling,
                 const at::Tensor& residual, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                 bool has_ln, bool has_ln_bias, float eps, int act, float slope, at::Tensor& out,
                 at::Tensor& z, at::Tensor& mean, at::Tensor& rstd) {
  using T = typename CudaType<AT>::type;
  const int ntok = static_cast<int>(x.size(0));
  const int H = static_cast<int>(x.size(1));
  const int N = static_cast<int>(down_weight.size(0));
  const int r = static_cast<int>(down_weight.size(1));
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto f32 = x.options().dtype(at::kFloat);

  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const int64_t* ip = index.data_ptr<int64_t>();
  const T* wdp = reinterpret_cast<const T*>(down_weight.data_ptr());
  const T* wup = reinterpret_cast<const T*>(up_weight.data_ptr());
  const T* resp = reinterpret_cast<const T*>(residual.data_ptr());
  const T* bdp = data_or_null<T>(down_bias, has_bd);
  const T* bup = data_or_null<T>(up_bias, has_bu);
  T* outp = reinterpret_cast<T*>(out.data_ptr());
  constexpr int V = vec16<T>();

  // ---- kernel 1 (+1b): z and a = act(z), fp32 [T, r]
  const bool down_vec = H % V == 0 && is_aligned16(xp) && is_aligned16(wdp);
  const int row_blocks = (r + kDownRowsPerBlock - 1) / kDownRowsPerBlock;
  const int target_blocks = 2 * prop->multiProcessorCount;
  const int s_want = std::max(1, (target_blocks + row_blocks * ntok - 1) / (row_blocks * ntok));
  int KS = (H + s_want - 1) / s_want;
  KS = std::max(kSliceQuantum, (KS + kSliceQuantum - 1) / kSliceQuantum * kSliceQuantum);
  const int S = (H + KS - 1) / KS;
  at::Tensor a = at::empty({ntok, r}, f32);
  at::Tensor zpart;
  if (S > 1) zpart = at::empty({S, ntok, r}, f32);
  float* zp = z.data_ptr<float>();
  float* ap = a.data_ptr<float>();
  float* zpp = S > 1 ? zpart.data_ptr<float>() : nullptr;
  const dim3 grid1(row_blocks, ntok, S);
  if (down_vec) {
    down_kernel<T, V><<<grid1, kThreads, 0, stream>>>(xp, ip, wdp, bdp, zpp, zp, ap, ntok, N, H, r,
                                                      KS, act, slope);
  } else {
    down_kernel<T, 1><<<grid1, kThreads, 0, stream>>>(xp, ip, wdp, bdp, zpp, zp, ap, ntok, N, H, r,
                                                      KS, act, slope);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (S > 1) {
    const int n = ntok * r;
    finalize_kernel<T><<<(n + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        zpp, ip, bdp, zp, ap, ntok, N, r, S, act, slope);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // ---- kernel 2: y (fp32 scratch with LayerNorm, else out)
  const bool up_vec = r % V == 0 && is_aligned16(wup);
  const int vec_up = up_vec ? V : 1;
  const int G = std::min(32, std::max(kUpMinGroup, next_pow2((r + vec_up - 1) / vec_up)));
  const int rows_per_block = kWarps * (32 / G) * kUpRowsPerGroup;
  const size_t smem2 = static_cast<size_t>(r) * sizeof(float);  // <= 4 KB
  at::Tensor y32;
  if (has_ln) y32 = at::empty({ntok, H}, f32);
  float* y32p = has_ln ? y32.data_ptr<float>() : nullptr;
  const float* scp = scaling.data_ptr<float>();
  const dim3 grid2((H + rows_per_block - 1) / rows_per_block, ntok);
  if (up_vec) {
    up_kernel<T, V><<<grid2, kThreads, smem2, stream>>>(ap, ip, wup, bup, scp, resp, outp, y32p,
                                                        N, H, r, G);
  } else {
    up_kernel<T, 1><<<grid2, kThreads, smem2, stream>>>(ap, ip, wup, bup, scp, resp, outp, y32p,
                                                        N, H, r, G);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // ---- kernel 3: LayerNorm
  if (has_ln) {
    layernorm_kernel<T><<<ntok, kLnThreads, 0, stream>>>(
        y32p, reinterpret_cast<const T*>(ln_weight.data_ptr()), data_or_null<T>(ln_bias, has_ln_bias),
        outp, mean.data_ptr<float>(), rstd.data_ptr<float>(), H, eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_adapter_decode_forward(
    const at::Tensor& x, const at::Tensor& adapter_index, const at::Tensor& down_weight,
    const at::Tensor& down_bias, const at::Tensor& up_weight, const at::Tensor& up_bias,
    const at::Tensor& scaling, const at::Tensor& residual, const at::Tensor& ln_weight,
    const at::Tensor& ln_bias, double eps, int64_t activation, double negative_slope) {
  TORCH_CHECK(x.defined(), kOpName, ": x is undefined");
  TORCH_CHECK(x.is_cuda(), kOpName, ": x must be a CUDA tensor, got a tensor on ", x.device());
  TORCH_CHECK(x.dim() == 2, kOpName, ": x must be 2-D [T, H], got shape ", shape_of(x));
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, kOpName,
              ": x has dtype ", dt, ", expected float32, float16 or bfloat16");
  TORCH_CHECK(x.is_contiguous(), kOpName, ": x must be contiguous (call .contiguous())");
  const int64_t ntok = x.size(0);
  const int64_t H = x.size(1);
  TORCH_CHECK(ntok <= kMaxTokens, kOpName, ": T = x.size(0) = ", ntok, " rows, expected at most ",
              kMaxTokens, " (this is the decode-shape kernel; use the general path for more)");
  TORCH_CHECK(H >= 1 && H <= std::numeric_limits<int32_t>::max() / kMaxTokens, kOpName,
              ": hidden size H = x.size(1) = ", H, " is out of range");
  TORCH_CHECK(adapter_index.defined() && adapter_index.device() == x.device(), kOpName,
              ": adapter_index must be on x's device ", x.device());
  TORCH_CHECK(adapter_index.scalar_type() == at::kLong, kOpName, ": adapter_index has dtype ",
              adapter_index.scalar_type(), ", expected int64");
  TORCH_CHECK(adapter_index.dim() == 1 && adapter_index.size(0) == ntok &&
                  adapter_index.is_contiguous(),
              kOpName, ": adapter_index must be a contiguous [T] = [", ntok,
              "] tensor, got shape ", shape_of(adapter_index));
  TORCH_CHECK(down_weight.defined() && down_weight.dim() == 3, kOpName,
              ": down_weight must be 3-D [N, r, H], got shape ",
              down_weight.defined() ? shape_of(down_weight) : std::string("undefined"));
  const int64_t N = down_weight.size(0);
  const int64_t r = down_weight.size(1);
  TORCH_CHECK(N >= 1 && N * r * H <= std::numeric_limits<int64_t>::max() / 2, kOpName,
              ": down_weight must hold at least one adapter, got shape ", shape_of(down_weight));
  TORCH_CHECK(N <= std::numeric_limits<int32_t>::max(), kOpName, ": too many adapters (", N, ")");
  TORCH_CHECK(r >= 1 && r <= kMaxRank, kOpName, ": bottleneck size r = down_weight.size(1) = ", r,
              ", expected 1 <= r <= ", kMaxRank);
  check_tensor(down_weight, "down_weight", x, {N, r, H});
  check_tensor(up_weight, "up_weight", x, {N, H, r});
  check_tensor(residual, "residual", x, {ntok, H});
  const bool has_bd = check_optional(down_bias, "down_bias", x, {N, r});
  const bool has_bu = check_optional(up_bias, "up_bias", x, {N, H});

  TORCH_CHECK(scaling.defined(), kOpName, ": scaling is undefined");
  TORCH_CHECK(scaling.device() == x.device(), kOpName, ": scaling is on ", scaling.device(),
              " but x is on ", x.device());
  TORCH_CHECK(scaling.scalar_type() == at::kFloat, kOpName, ": scaling has dtype ",
              scaling.scalar_type(), ", expected float32 (an [N, H] tensor; expand first)");
  TORCH_CHECK(scaling.dim() == 2 && scaling.size(0) == N && scaling.size(1) == H &&
                  scaling.is_contiguous(),
              kOpName, ": scaling must be a contiguous [N, H] = [", N, ", ", H,
              "] tensor, got shape ", shape_of(scaling));

  const bool has_ln = ln_weight.defined() && ln_weight.numel() > 0;
  bool has_ln_bias = false;
  if (has_ln) {
    check_tensor(ln_weight, "ln_weight", x, {H});
    has_ln_bias = check_optional(ln_bias, "ln_bias", x, {H});
  } else {
    TORCH_CHECK(!ln_bias.defined() || ln_bias.numel() == 0, kOpName,
                ": ln_bias is given without ln_weight");
  }
  TORCH_CHECK(activation >= 0 && activation < kNumActivations, kOpName, ": activation code ",
              activation,
              " is unknown, expected 0 identity, 1 relu, 2 gelu, 3 gelu_tanh, 4 silu, 5 tanh, "
              "6 leaky_relu");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, kOpName, ": eps must be finite and >= 0, got ",
              eps);

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor z = at::empty({ntok, r}, f32);
  at::Tensor mean = at::empty({has_ln ? ntok : 0}, f32);
  at::Tensor rstd = at::empty({has_ln ? ntok : 0}, f32);
  if (ntok == 0) return {out, z, mean, rstd};

  const float eps_f = static_cast<float>(eps);
  const float slope_f = static_cast<float>(negative_slope);
  const int act = static_cast<int>(activation);
  switch (dt) {
    case at::kFloat:
      run_forward<float>(x, adapter_index, down_weight, down_bias, has_bd, up_weight, up_bias,
                         has_bu, scaling, residual, ln_weight, ln_bias, has_ln, has_ln_bias, eps_f,
                         act, slope_f, out, z, mean, rstd);
      break;
    case at::kHalf:
      run_forward<at::Half>(x, adapter_index, down_weight, down_bias, has_bd, up_weight, up_bias,
                            has_bu, scaling, residual, ln_weight, ln_bias, has_ln, has_ln_bias,
                            eps_f, act, slope_f, out, z, mean, rstd);
      break;
    case at::kBFloat16:
      run_forward<at::BFloat16>(x, adapter_index, down_weight, down_bias, has_bd, up_weight,
                                up_bias, has_bu, scaling, residual, ln_weight, ln_bias, has_ln,
                                has_ln_bias, eps_f, act, slope_f, out, z, mean, rstd);
      break;
    default:
      TORCH_CHECK(false, kOpName, ": unsupported dtype ", dt);
  }
  return {out, z, mean, rstd};
}

}  // namespace pefops
