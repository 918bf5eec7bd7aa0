// Fused bottleneck adapter, decode shapes (T <= 16 tokens): forward.
//
//   z   = x @ Wd^T + bd                 [T, r]  fp32, pre-activation (returned)
//   a   = act(z)                        [T, r]  fp32
//   u   = a @ Wu^T + bu                 [T, H]
//   y   = residual + scaling * u        [T, H]  (scaling: fp32 [H])
//   out = LayerNorm(y) * ln_w + ln_b    when ln_w is given (then per-row mean / rstd are returned),
//         else y
//
// Everything is accumulated in float32; only `out` is rounded to the input dtype.
//
// Roofline. At decode shapes this op is a pair of GEMVs: the time floor is reading both weight
// matrices once, which these kernels do for all T tokens together (never once per token):
//
//   bytes = 2 * H * r * sizeof(dtype)                       (Wd and Wu, each read exactly once)
//         + T * H * sizeof(dtype) * (reads + writes)       (x, residual (free when it is x) and out)
//         + small terms: biases, scaling (4 H), LN params, z / a (T r fp32), and with LayerNorm
//           an fp32 y scratch of T H * 4 bytes (written once, read back from L2)
//
//   e.g. H = 4096, r = 64,   T = 1, bf16:  1,048,576 + 3 * 8,192 B ~= 1.07 MB -> ~0.25 us at the
//        ~4.3 TB/s an H200 copies at; launch latency (2-4 kernels, ~2 us each unless captured in a
//        CUDA graph) dominates such shapes.
//   e.g. H = 4096, r = 1024, T = 16, bf16: 16.8 MB + 0.4 MB -> ~4.0 us.
//   Compute: 4 * T * H * r flop; at T = 16 in bf16 that is 8 FMA per weight byte, about the fp32
//   FMA rate of an SM at full HBM bandwidth, so T = 16 sits at the compute/bandwidth balance point
//   on CUDA cores (a tensor-core mma path would be the next step there). T <= 8 is memory-bound.
//
// Kernels (all on the current stream):
//   1. down_proj_kernel   grid (ceil(r / 32), S): each block owns 32 rows of Wd (8 warps x 4 rows)
//      and one slice of KS hidden columns; it stages x[:, slice] in shared memory, streams its Wd
//      rows once with 16-byte loads and keeps T x 4 accumulators per lane. With S == 1 it finishes
//      z and a itself, otherwise it writes fp32 partials [S, T, r] (S splits H so that small r still
//      fills the GPU).
//   1b. down_finalize_kernel (only when S > 1): sums the S partials in a fixed order (deterministic),
//      adds bd, writes z and a = act(z).
//   2. up_proj_kernel     grid ceil(H / rows_per_block): a [T, r] staged in shared memory (fp32),
//      each group of G lanes (G = pow2 >= r / VEC, 4..32) owns 4 rows of Wu, streams them once and
//      reduces across the group; the block's results go through shared memory so the epilogue
//      (+bu, *scaling, +residual) reads and writes [T, H] coalesced. Writes out (no LayerNorm) or an
//      fp32 y scratch.
//   3. layernorm_rows_kernel (only with LayerNorm): one block per token, two-pass mean / variance
//      in fp32 over the fp32 y row, then the affine transform.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <atomic>
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

// Down projection: rows of Wd per warp, and per block.
constexpr int kDownRowsPerWarp = 4;
constexpr int kDownRowsPerBlock = kWarps * kDownRowsPerWarp;  // 32
// The hidden slice KS is a multiple of this (32 lanes x one 16-byte vector of a 2-byte type).
constexpr int kSliceQuantum = 256;
constexpr int kDownSmemBudget = 32 * 1024;  // bytes of staged x per block

// Up projection: rows of Wu per lane group; lane-group size bounds.
constexpr int kUpRowsPerGroup = 4;
constexpr int kUpMinGroup = 4;

constexpr int kLnThreads = 512;

__device__ __forceinline__ float apply_activation(float z, int act, float slope) {
  switch (act) {
    case kRelu:
      return z < 0.0f ? 0.0f : z;  // keeps NaN, like torch.relu
    case kGelu:
      return 0.5f * z * (1.0f + erff(z * 0.70710678118654752440f));
    case kGeluTanh: {
      const float k0 = 0.79788456080286535588f;  // sqrt(2 / pi)
      const float inner = k0 * (z + 0.044715f * z * z * z);
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

// ---------------------------------------------------------------------------------------------
// Kernel 1: z partials. Block (bx, s): rows j in [32 bx, 32 bx + 32) of Wd, columns
// [s KS, s KS + klen) of H. Warp w owns rows 32 bx + 4 w + k, k < 4; lane l reads columns
// c = l VEC + i 32 VEC of the slice. TB >= T is the token bucket (1, 2, 4, 8, 16): rows t >= T of the
// staged x are zero, so their accumulators stay zero and are never written.
// Launch bounds: TB < 16 asks for 2 blocks / SM (<= 128 registers; without it ptxas spilled a few
// bytes at 80 registers for TB = 4); TB = 16 needs ~170 registers for its 64 accumulators.
template <typename T, int VEC, int TB>
__global__ void __launch_bounds__(kThreads, TB >= 16 ? 1 : 2) down_proj_kernel(
    const T* __restrict__ x,       // [T, H]
    const T* __restrict__ wd,      // [r, H]
    const T* __restrict__ bd,      // [r] or nullptr (used only when S == 1)
    float* __restrict__ zpart,     // [S, T, r] (used only when S > 1)
    float* __restrict__ z_out,     // [T, r]    (used only when S == 1)
    float* __restrict__ a_out,     // [T, r]    (used only when S == 1)
    int ntok, int H, int r, int KS, int act, float slope) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);  // [TB][KS]

  const int S = gridDim.y;
  const int s = blockIdx.y;
  const int k0 = s * KS;
  const int klen = min(KS, H - k0);  // > 0: the host launches S = ceil(H / KS) slices

  // Stage x[:, k0 : k0 + klen] (rows >= ntok and columns >= klen as zeros). With VEC > 1, H, KS,
  // k0 and c are multiples of VEC, so c < klen means the whole vector lies inside the row.
  const int vecs_per_row = KS / VEC;
#pragma unroll 4
  for (int i = threadIdx.x; i < TB * vecs_per_row; i += kThreads) {
    const int t = i / vecs_per_row;
    const int c = (i - t * vecs_per_row) * VEC;
    const bool valid = t < ntok && c < klen;
    const T* src = x + (static_cast<int64_t>(t) * H + k0 + c);
    copy_or_zero<T, VEC>(xs + t * KS + c, src, valid);
  }
  __syncthreads();

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int j0 = blockIdx.x * kDownRowsPerBlock + warp * kDownRowsPerWarp;
  if (j0 >= r) return;  // whole warp idle (warp-uniform); no block barrier follows

  const T* wrow[kDownRowsPerWarp];
  bool row_ok[kDownRowsPerWarp];
#pragma unroll
  for (int k = 0; k < kDownRowsPerWarp; ++k) {
    row_ok[k] = j0 + k < r;  // warp-uniform
    wrow[k] = wd + (static_cast<int64_t>(row_ok[k] ? j0 + k : j0) * H + k0);
  }

  float acc[kDownRowsPerWarp * TB];  // acc[k * TB + t]
#pragma unroll
  for (int i = 0; i < kDownRowsPerWarp * TB; ++i) acc[i] = 0.0f;

#pragma unroll 2
  for (int c = lane * VEC; c < klen; c += 32 * VEC) {
    float w[kDownRowsPerWarp][VEC];
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
    for (int t = 0; t < TB; ++t) {
      float xv[VEC];
      load_shared_f32<T, VEC>(xs + t * KS + c, xv);
#pragma unroll
      for (int k = 0; k < kDownRowsPerWarp; ++k) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[k * TB + t] = fmaf(w[k][v], xv[v], acc[k * TB + t]);
      }
    }
  }

  constexpr int N = kDownRowsPerWarp * TB;
  const int base = group_reduce_scatter<N>(acc, lane, 32);
  constexpr int kHeld = N >= 32 ? N / 32 : 1;
  if (lane >= N) return;  // not an owner (only happens when N < 32)
#pragma unroll
  for (int i = 0; i < kHeld; ++i) {
    const int idx = base + i;
    const int k = idx / TB;
    const int t = idx % TB;
    const int j = j0 + k;
    if (t < ntok && j < r) {
      const int64_t o = static_cast<int64_t>(t) * r + j;
      if (S == 1) {
        const float zz = acc[i] + (bd != nullptr ? Cvt<T>::to_float(bd[j]) : 0.0f);
        z_out[o] = zz;
        a_out[o] = apply_activation(zz, act, slope);
      } else {
        zpart[static_cast<int64_t>(s) * ntok * r + o] = acc[i];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel 1b: z = sum_s zpart[s] + bd (fixed order), a = act(z). One thread per (t, j).
template <typename T>
__global__ void __launch_bounds__(kThreads) down_finalize_kernel(
    const float* __restrict__ zpart,  // [S, T, r]
    const T* __restrict__ bd,         // [r] or nullptr
    float* __restrict__ z_out,        // [T, r]
    float* __restrict__ a_out,        // [T, r]
    int ntok, int r, int S, int act, float slope) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  const int n = ntok * r;
  if (idx >= n) return;
  float acc = 0.0f;
  for (int p = 0; p < S; ++p) acc += zpart[static_cast<int64_t>(p) * n + idx];
  const int j = idx % r;
  acc += bd != nullptr ? Cvt<T>::to_float(bd[j]) : 0.0f;
  z_out[idx] = acc;
  a_out[idx] = apply_activation(acc, act, slope);
}

// ---------------------------------------------------------------------------------------------
// Kernel 2: u = a @ Wu^T + bu; y = residual + scaling * u. Lane groups of G lanes (G | 32); group gi
// of warp w owns the rows h0 + w * gpw * 4 + k * gpw + gi, k < 4 (gpw = 32 / G groups per warp), so
// rows_per_block = 8 * gpw * 4 (32 .. 256). Lane gl of a group reads columns j = gl VEC + i G VEC.
template <typename T, int VEC, int TB>
__global__ void __launch_bounds__(kThreads, TB >= 16 ? 1 : 2) up_proj_kernel(
    const float* __restrict__ a,        // [T, r] fp32
    const T* __restrict__ wu,           // [H, r]
    const T* __restrict__ bu,           // [H] or nullptr
    const float* __restrict__ scaling,  // [H] fp32
    const T* __restrict__ residual,     // [T, H]
    T* __restrict__ out,                // [T, H] (written when y32 == nullptr)
    float* __restrict__ y32,            // [T, H] fp32 scratch for the LayerNorm kernel, or nullptr
    int ntok, int H, int r, int G) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* abuf = reinterpret_cast<float*>(smem_raw);  // [TB][r], later reused as obuf [TB][rpb]

  const int gpw = 32 / G;
  const int rows_per_block = kWarps * gpw * kUpRowsPerGroup;
  const int h0 = blockIdx.x * rows_per_block;

  // Stage a; token rows >= ntok are zero. a comes from at::empty (256-byte aligned), so with r a
  // multiple of 4 both ntok * r and TB * r are whole float4s.
  if ((r & 3) == 0) {
    const int n4 = TB * r / 4;
    const int valid4 = ntok * r / 4;
#pragma unroll 4
    for (int i = threadIdx.x; i < n4; i += kThreads) {
      reinterpret_cast<float4*>(abuf)[i] =
          i < valid4 ? reinterpret_cast<const float4*>(a)[i] : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  } else {
#pragma unroll 4
    for (int i = threadIdx.x; i < TB * r; i += kThreads) {
      abuf[i] = i < ntok * r ? a[i] : 0.0f;
    }
  }
  __syncthreads();

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int gi = lane / G;
  const int gl = lane % G;

  // Block-local row of slot k of this lane group.
  auto row_local = [&](int k) { return (warp * kUpRowsPerGroup + k) * gpw + gi; };
  bool row_ok[kUpRowsPerGroup];
  const T* wrow[kUpRowsPerGroup];
#pragma unroll
  for (int k = 0; k < kUpRowsPerGroup; ++k) {
    const int h = h0 + row_local(k);
    row_ok[k] = h < H;
    wrow[k] = wu + static_cast<int64_t>(row_ok[k] ? h : 0) * r;
  }

  float acc[kUpRowsPerGroup * TB];  // acc[k * TB + t]
#pragma unroll
  for (int i = 0; i < kUpRowsPerGroup * TB; ++i) acc[i] = 0.0f;

#pragma unroll 2
  for (int j = gl * VEC; j < r; j += G * VEC) {
    float w[kUpRowsPerGroup][VEC];
#pragma unroll
    for (int k = 0; k < kUpRowsPerGroup; ++k) {
      if (row_ok[k]) {
        load_global_f32<T, VEC>(wrow[k] + j, w[k]);
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) w[k][v] = 0.0f;
      }
    }
#pragma unroll
    for (int t = 0; t < TB; ++t) {
      float av[VEC];
      load_shared_floats<VEC>(abuf + t * r + j, av);
#pragma unroll
      for (int k = 0; k < kUpRowsPerGroup; ++k) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[k * TB + t] = fmaf(w[k][v], av[v], acc[k * TB + t]);
      }
    }
  }

  constexpr int N = kUpRowsPerGroup * TB;
  const int base = group_reduce_scatter<N>(acc, gl, G);
  const int held = N >= G ? N / G : 1;

  __syncthreads();  // every warp is done reading abuf; reuse it as obuf [TB][rows_per_block]
  float* obuf = abuf;
  if (gl < N) {  // owners
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (i < held) {
        const int idx = base + i;
        const int k = idx / TB;
        const int t = idx % TB;
        obuf[t * rows_per_block + row_local(k)] = acc[i];
      }
    }
  }
  __syncthreads();

  // Coalesced epilogue over (t, h).
  for (int i = threadIdx.x; i < ntok * rows_per_block; i += kThreads) {
    const int t = i / rows_per_block;
    const int hl = i - t * rows_per_block;
    const int h = h0 + hl;
    if (h >= H) continue;
    const float u = obuf[i] + (bu != nullptr ? Cvt<T>::to_float(bu[h]) : 0.0f);
    const int64_t o = static_cast<int64_t>(t) * H + h;
    const float y = Cvt<T>::to_float(residual[o]) + scaling[h] * u;
    if (y32 != nullptr) {
      y32[o] = y;
    } else {
      out[o] = Cvt<T>::from_float(y);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel 3: LayerNorm over each fp32 row of y. Two passes (mean, then centred sum of squares) so
// there is no cancellation; the row (H * 4 bytes) is re-read from L1/L2.
template <typename T>
__global__ void __launch_bounds__(kLnThreads) layernorm_rows_kernel(
    const float* __restrict__ y32,   // [T, H]
    const T* __restrict__ ln_w,      // [H]
    const T* __restrict__ ln_b,      // [H] or nullptr
    T* __restrict__ out,             // [T, H]
    float* __restrict__ mean_out,    // [T]
    float* __restrict__ rstd_out,    // [T]
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
  const float var = block_sum(sq, scratch) / static_cast<float>(H);
  const float rstd = 1.0f / sqrtf(var + eps);

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

constexpr const char* kOpName = "bottleneck_adapter_decode_forward";

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

int next_pow2(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

int token_bucket(int ntok) {
  if (ntok <= 1) return 1;
  if (ntok <= 2) return 2;
  if (ntok <= 4) return 4;
  if (ntok <= 8) return 8;
  return 16;
}

std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

void check_param(const at::Tensor& t, const char* name, const at::Tensor& x,
                 std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.defined(), kOpName, ": ", name, " is undefined");
  TORCH_CHECK(t.device() == x.device(), kOpName, ": ", name, " is on ", t.device(),
              " but x is on ", x.device(), "; all tensors must be on the same CUDA device");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), kOpName, ": ", name, " has dtype ",
              t.scalar_type(), " but x has dtype ", x.scalar_type(),
              "; x, the weights, biases, residual and LayerNorm parameters must share one dtype");
  TORCH_CHECK(t.sizes().equals(shape), kOpName, ": ", name, " has shape ", shape_str(t),
              ", expected ", c10::IntArrayRef(shape));
  TORCH_CHECK(t.is_contiguous(), kOpName, ": ", name, " must be contiguous (call .contiguous())");
}

// An optional parameter: numel() == 0 means absent.
bool check_optional_param(const at::Tensor& t, const char* name, const at::Tensor& x,
                          int64_t n) {
  if (!t.defined() || t.numel() == 0) return false;
  check_param(t, name, x, {n});
  return true;
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t, bool present) {
  return present ? reinterpret_cast<const T*>(t.data_ptr()) : nullptr;
}

template <typename T, int VEC>
void launch_down(int TB, dim3 grid, size_t smem, cudaStream_t stream, const T* x, const T* wd,
                 const T* bd, float* zpart, float* z, float* a, int ntok, int H, int r, int KS,
                 int act, float slope) {
#define PEFOPS_DOWN_CASE(TBV)                                                                  \
  case TBV:                                                                                    \
    down_proj_kernel<T, VEC, TBV><<<grid, kThreads, smem, stream>>>(x, wd, bd, zpart, z, a,   \
                                                                   ntok, H, r, KS, act,       \
                                                                   slope);                    \
    break;
  switch (TB) {
    PEFOPS_DOWN_CASE(1)
    PEFOPS_DOWN_CASE(2)
    PEFOPS_DOWN_CASE(4)
    PEFOPS_DOWN_CASE(8)
    PEFOPS_DOWN_CASE(16)
    default:
      TORCH_CHECK(false, kOpName, ": internal error, bad token bucket ", TB);
  }
#undef PEFOPS_DOWN_CASE
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC, int TB>
void launch_up_tb(dim3 grid, size_t smem, cudaStream_t stream, const float* a, const T* wu,
                  const T* bu, const float* scaling, const T* residual, T* out, float* y32,
                  int ntok, int H, int r, int G) {
  auto kernel = up_proj_kernel<T, VEC, TB>;
  if (smem > 48 * 1024) {
    // Opt in once per device to the largest size this instantiation can ask for (r = kMaxRank).
    static std::atomic<uint64_t> opted_in{0};
    const int dev = c10::cuda::current_device();
    const uint64_t bit = dev < 64 ? (uint64_t{1} << dev) : 0;
    if (bit == 0 || (opted_in.load(std::memory_order_relaxed) & bit) == 0) {
      const size_t most = static_cast<size_t>(TB) * std::max(kMaxRank, 256) * sizeof(float);
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(std::max(most, smem))));
      opted_in.fetch_or(bit, std::memory_order_relaxed);
    }
  }
  kernel<<<grid, kThreads, smem, stream>>>(a, wu, bu, scaling, residual, out, y32, ntok, H, r, G);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC>
void launch_up(int TB, dim3 grid, size_t smem, cudaStream_t stream, const float* a, const T* wu,
               const T* bu, const float* scaling, const T* residual, T* out, float* y32,
               int ntok, int H, int r, int G) {
  switch (TB) {
    case 1:
      return launch_up_tb<T, VEC, 1>(grid, smem, stream, a, wu, bu, scaling, residual, out, y32,
                                     ntok, H, r, G);
    case 2:
      return launch_up_tb<T, VEC, 2>(grid, smem, stream, a, wu, bu, scaling, residual, out, y32,
                                     ntok, H, r, G);
    case 4:
      return launch_up_tb<T, VEC, 4>(grid, smem, stream, a, wu, bu, scaling, residual, out, y32,
                                     ntok, H, r, G);
    case 8:
      return launch_up_tb<T, VEC, 8>(grid, smem, stream, a, wu, bu, scaling, residual, out, y32,
                                     ntok, H, r, G);
    case 16:
      return launch_up_tb<T, VEC, 16>(grid, smem, stream, a, wu, bu, scaling, residual, out, y32,
                                      ntok, H, r, G);
    default:
      TORCH_CHECK(false, kOpName, ": internal error, bad token bucket ", TB);
  }
}

template <typename AT>
void run_forward(const at::Tensor& x, const at::Tensor& down_weight, const at::Tensor& down_bias,
                 bool has_bd, const at::Tensor& up_weight, const at::Tensor& up_bias, bool has_bu,
                 const at::Tensor& scaling, const at::Tensor& residual,
                 const at::Tensor& ln_weight, const at::Tensor& ln_bias, bool has_ln,
                 bool has_ln_bias, float eps, int act, float slope, at::Tensor& out,
                 at::Tensor& z, at::Tensor& mean, at::Tensor& rstd) {
  using T = typename CudaType<AT>::type;
  const int ntok = static_cast<int>(x.size(0));
  const int H = static_cast<int>(x.size(1));
  const int r = static_cast<int>(down_weight.size(0));
  const int TB = token_bucket(ntok);

  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto f32 = x.options().dtype(at::kFloat);

  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const T* wdp = reinterpret_cast<const T*>(down_weight.data_ptr());
  const T* wup = reinterpret_cast<const T*>(up_weight.data_ptr());
  const T* resp = reinterpret_cast<const T*>(residual.data_ptr());
  const T* bdp = ptr_or_null<T>(down_bias, has_bd);
  const T* bup = ptr_or_null<T>(up_bias, has_bu);
  T* outp = reinterpret_cast<T*>(out.data_ptr());

  // ---- kernel 1 (+1b): z and a = act(z), fp32 [T, r]
  constexpr int V = vec16<T>();
  const bool down_vec = H % V == 0 && aligned16(xp) && aligned16(wdp);
  const int row_blocks = (r + kDownRowsPerBlock - 1) / kDownRowsPerBlock;
  const int target_blocks = 2 * prop->multiProcessorCount;
  const int s_want = std::max(1, (target_blocks + row_blocks - 1) / row_blocks);
  const int ks_max = std::max(
      kSliceQuantum, (kDownSmemBudget / (TB * static_cast<int>(sizeof(T)))) / kSliceQuantum *
                         kSliceQuantum);
  int KS = (H + s_want - 1) / s_want;
  KS = (KS + kSliceQuantum - 1) / kSliceQuantum * kSliceQuantum;
  KS = std::min(std::max(KS, kSliceQuantum), ks_max);
  const int S = (H + KS - 1) / KS;
  const size_t smem1 = static_cast<size_t>(TB) * KS * sizeof(T);

  at::Tensor a = at::empty({ntok, r}, f32);
  at::Tensor zpart;
  if (S > 1) zpart = at::empty({S, ntok, r}, f32);
  float* zp = z.data_ptr<float>();
  float* ap = a.data_ptr<float>();
  float* zpp = S > 1 ? zpart.data_ptr<float>() : nullptr;

  const dim3 grid1(row_blocks, S);
  if (down_vec) {
    launch_down<T, V>(TB, grid1, smem1, stream, xp, wdp, bdp, zpp, zp, ap, ntok, H, r, KS, act,
                      slope);
  } else {
    launch_down<T, 1>(TB, grid1, smem1, stream, xp, wdp, bdp, zpp, zp, ap, ntok, H, r, KS, act,
                      slope);
  }
  if (S > 1) {
    const int n = ntok * r;
    down_finalize_kernel<T><<<(n + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        zpp, bdp, zp, ap, ntok, r, S, act, slope);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // ---- kernel 2: y (fp32 scratch with LayerNorm, else out)
  const bool up_vec = r % V == 0 && aligned16(wup);
  const int vec_up = up_vec ? V : 1;
  const int G = std::min(32, std::max(kUpMinGroup, next_pow2((r + vec_up - 1) / vec_up)));
  const int rows_per_block = kWarps * (32 / G) * kUpRowsPerGroup;
  const size_t smem2 =
      static_cast<size_t>(TB) * std::max(r, rows_per_block) * sizeof(float);
  TORCH_CHECK(smem2 <= prop->sharedMemPerBlockOptin, kOpName, ": needs ", smem2,
              " bytes of shared memory per block, the device allows ",
              prop->sharedMemPerBlockOptin);
  at::Tensor y32;
  if (has_ln) y32 = at::empty({ntok, H}, f32);
  float* y32p = has_ln ? y32.data_ptr<float>() : nullptr;
  const float* scp = scaling.data_ptr<float>();
  const dim3 grid2((H + rows_per_block - 1) / rows_per_block);
  if (up_vec) {
    launch_up<T, V>(TB, grid2, smem2, stream, ap, wup, bup, scp, resp, outp, y32p, ntok, H, r, G);
  } else {
    launch_up<T, 1>(TB, grid2, smem2, stream, ap, wup, bup, scp, resp, outp, y32p, ntok, H, r, G);
  }

  // ---- kernel 3: LayerNorm
  if (has_ln) {
    layernorm_rows_kernel<T><<<ntok, kLnThreads, 0, stream>>>(
        y32p, reinterpret_cast<const T*>(ln_weight.data_ptr()),
        ptr_or_null<T>(ln_bias, has_ln_bias), outp, mean.data_ptr<float>(),
        rstd.data_ptr<float>(), H, eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bottleneck_adapter_decode_forward(
    const at::Tensor& x, const at::Tensor& down_weight, const at::Tensor& down_bias,
    const at::Tensor& up_weight, const at::Tensor& up_bias, const at::Tensor& scaling,
    const at::Tensor& residual, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
    double eps, int64_t activation, double negative_slope) {
  TORCH_CHECK(x.defined(), kOpName, ": x is undefined");
  TORCH_CHECK(x.is_cuda(), kOpName, ": x must be a CUDA tensor, got a tensor on ", x.device());
  TORCH_CHECK(x.dim() == 2, kOpName, ": x must be 2-D [T, H], got shape ", shape_str(x));
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, kOpName,
              ": x has dtype ", dt, ", expected float32, float16 or bfloat16");
  TORCH_CHECK(x.is_contiguous(), kOpName, ": x must be contiguous (call .contiguous())");
  const int64_t ntok = x.size(0);
  const int64_t H = x.size(1);
  TORCH_CHECK(ntok <= kMaxTokens, kOpName, ": T = x.size(0) = ", ntok, " tokens, expected at most ",
              kMaxTokens, " (this is the decode-shape kernel; use the general path for more)");
  TORCH_CHECK(H >= 1 && H <= std::numeric_limits<int32_t>::max() / kMaxTokens, kOpName,
              ": hidden size H = x.size(1) = ", H, " is out of range");
  TORCH_CHECK(down_weight.defined() && down_weight.dim() == 2, kOpName,
              ": down_weight must be 2-D [r, H], got shape ",
              down_weight.defined() ? shape_str(down_weight) : std::string("undefined"));
  const int64_t r = down_weight.size(0);
  TORCH_CHECK(r >= 1 && r <= kMaxRank, kOpName, ": bottleneck size r = down_weight.size(0) = ", r,
              ", expected 1 <= r <= ", kMaxRank);
  check_param(down_weight, "down_weight", x, {r, H});
  check_param(up_weight, "up_weight", x, {H, r});
  check_param(residual, "residual", x, {ntok, H});
  const bool has_bd = check_optional_param(down_bias, "down_bias", x, r);
  const bool has_bu = check_optional_param(up_bias, "up_bias", x, H);

  TORCH_CHECK(scaling.defined(), kOpName, ": scaling is undefined");
  TORCH_CHECK(scaling.device() == x.device(), kOpName, ": scaling is on ", scaling.device(),
              " but x is on ", x.device());
  TORCH_CHECK(scaling.scalar_type() == at::kFloat, kOpName, ": scaling has dtype ",
              scaling.scalar_type(), ", expected float32 (a [H] tensor; expand a scalar first)");
  TORCH_CHECK(scaling.dim() == 1 && scaling.size(0) == H && scaling.is_contiguous(), kOpName,
              ": scaling must be a contiguous [H] = [", H, "] tensor, got shape ",
              shape_str(scaling));

  const bool has_ln = ln_weight.defined() && ln_weight.numel() > 0;
  bool has_ln_bias = false;
  if (has_ln) {
    check_param(ln_weight, "ln_weight", x, {H});
    has_ln_bias = check_optional_param(ln_bias, "ln_bias", x, H);
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
      run_forward<float>(x, down_weight, down_bias, has_bd, up_weight, up_bias, has_bu, scaling,
                         residual, ln_weight, ln_bias, has_ln, has_ln_bias, eps_f, act, slope_f,
                         out, z, mean, rstd);
      break;
    case at::kHalf:
      run_forward<at::Half>(x, down_weight, down_bias, has_bd, up_weight, up_bias, has_bu,
                            scaling, residual, ln_weight, ln_bias, has_ln, has_ln_bias, eps_f,
                            act, slope_f, out, z, mean, rstd);
      break;
    case at::kBFloat16:
      run_forward<at::BFloat16>(x, down_weight, down_bias, has_bd, up_weight, up_bias, has_bu,
                                scaling, residual, ln_weight, ln_bias, has_ln, has_ln_bias, eps_f,
                                act, slope_f, out, z, mean, rstd);
      break;
    default:
      TORCH_CHECK(false, kOpName, ": unsupported dtype ", dt);
  }
  return {out, z, mean, rstd};
}

}  // namespace pefops
