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
//   3. layernorm_rows_kernel (decode_common.cuh; only with LayerNorm): one block per token, two-pass mean / variance
//      in fp32 over the fp32 y row, then the affine transform.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <tuple>

#include "common.cuh"
#include "decode_common.cuh"
#include "ops.h"

namespace pefops {
namespace {

using namespace decode;  // kWarps, kThreads, kRowsPerWarp, kRowsPerBlock, kSliceQuantum, helpers

constexpr const char* kOpName = "bottleneck_adapter_decode_forward";

constexpr int kDownSmemBudget = 32 * 1024;  // bytes of staged x per block


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

  const BlockSlice slice = block_slice(H, KS);
  const int S = slice.S, s = slice.s, k0 = slice.k0, klen = slice.klen;

  stage_x_slice<T, VEC, TB>(xs, x, ntok, H, k0, klen, KS);  // rows >= ntok, columns >= klen: 0
  __syncthreads();

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int j0 = blockIdx.x * kRowsPerBlock + warp * kRowsPerWarp;
  if (j0 >= r) return;  // whole warp idle (warp-uniform); no block barrier follows

  const T* wrow[kRowsPerWarp];
  bool row_ok[kRowsPerWarp];
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
    row_ok[k] = j0 + k < r;  // warp-uniform
    wrow[k] = wd + (static_cast<int64_t>(row_ok[k] ? j0 + k : j0) * H + k0);
  }

  float acc[kRowsPerWarp * TB] = {};  // acc[k * TB + t]

#pragma unroll 2
  for (int c = lane * VEC; c < klen; c += 32 * VEC) {
    float w[kRowsPerWarp][VEC];
    load_rows_or_zero<T, VEC, kRowsPerWarp>(wrow, row_ok, c, w);
    fma_staged_tokens<T, VEC, kRowsPerWarp, TB>(acc, w, xs, KS, c);
  }

  warp_reduce_rows<kRowsPerWarp, TB>(acc, lane, [&](int k, int t, float total) {
    const int j = j0 + k;
    if (t < ntok && j < r) {
      const int64_t o = static_cast<int64_t>(t) * r + j;
      if (S == 1) {
        const float zz = total + (bd != nullptr ? Cvt<T>::to_float(bd[j]) : 0.0f);
        z_out[o] = zz;
        a_out[o] = apply_activation(zz, act, slope);
      } else {
        zpart[static_cast<int64_t>(s) * ntok * r + o] = total;
      }
    }
  });
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
    load_rows_or_zero<T, VEC, kUpRowsPerGroup>(wrow, row_ok, j, w);
#pragma unroll
    for (int t = 0; t < TB; ++t) {
      float av[VEC];
      load_shared_floats<VEC>(abuf + t * r + j, av);
      fma_rows<VEC, kUpRowsPerGroup, TB>(acc, t, w, av);
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
// Host side.

// Kernel 2's launch; the first launch of an instantiation that needs more than 48 KB of shared
// memory opts in (once per device) to the most it can ask for.
template <typename T, int VEC, int TB>
void launch_up(dim3 grid, size_t smem, cudaStream_t stream, const float* a, const T* wu,
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

template <typename T>
void run_forward(const at::Tensor& x, const at::Tensor& down_weight, const at::Tensor& down_bias,
                 const at::Tensor& up_weight, const at::Tensor& up_bias, const at::Tensor& scaling,
                 const at::Tensor& residual, const at::Tensor& ln_weight,
                 const at::Tensor& ln_bias, float eps, int act, float slope,
                 AdapterDecodeOutputs& result) {
  const int ntok = static_cast<int>(x.size(0));
  const int H = static_cast<int>(x.size(1));
  const int r = static_cast<int>(down_weight.size(0));
  const int TB = token_bucket(ntok);

  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto f32 = x.options().dtype(at::kFloat);

  const AdapterDecodePointers<T> p = adapter_decode_pointers<T>(
      x, down_weight, down_bias, up_weight, up_bias, scaling, residual, result);

  // ---- kernel 1 (+1b): z and a = act(z), fp32 [T, r]
  constexpr int V = vec16<T>();
  const bool down_vec = H % V == 0 && aligned16(p.x) && aligned16(p.down_weight);
  const int row_blocks = (r + kRowsPerBlock - 1) / kRowsPerBlock;
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
  float* ap = a.data_ptr<float>();
  float* zpp = S > 1 ? zpart.data_ptr<float>() : nullptr;

  const dim3 grid1(row_blocks, S);
  with_vec_width<V>(down_vec, [&](auto vec) {
    with_token_bucket(ntok, [&](auto tb) {
      down_proj_kernel<T, decltype(vec)::value, decltype(tb)::value>
          <<<grid1, kThreads, smem1, stream>>>(p.x, p.down_weight, p.down_bias, zpp, p.z, ap, ntok, H, r, KS, act,
                                               slope);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (S > 1) {
    const int n = ntok * r;
    down_finalize_kernel<T><<<(n + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        zpp, p.down_bias, p.z, ap, ntok, r, S, act, slope);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // ---- kernel 2: y (fp32 scratch with LayerNorm, else out)
  const UpProjectionTiling up = up_projection_tiling<V>(r, p.up_weight);
  const size_t smem2 =
      static_cast<size_t>(TB) * std::max(r, up.rows_per_block) * sizeof(float);
  PEFOPS_CHECK(smem2 <= prop->sharedMemPerBlockOptin, "needs ", smem2,
               " bytes of shared memory per block, the device allows ",
               prop->sharedMemPerBlockOptin);
  float* y32p = result.y32_or_null();
  const dim3 grid2((H + up.rows_per_block - 1) / up.rows_per_block);
  with_vec_width<V>(up.vectorised, [&](auto vec) {
    with_token_bucket(ntok, [&](auto tb) {
      launch_up<T, decltype(vec)::value, decltype(tb)::value>(
          grid2, smem2, stream, ap, p.up_weight, p.up_bias, p.scaling, p.residual, p.out, y32p,
          ntok, H, r, up.group);
    });
  });

  launch_layernorm_rows<T>(stream, ln_weight, ln_bias, eps, result);  // kernel 3, with LayerNorm
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bottleneck_adapter_decode_forward(
    const at::Tensor& x, const at::Tensor& down_weight, const at::Tensor& down_bias,
    const at::Tensor& up_weight, const at::Tensor& up_bias, const at::Tensor& scaling,
    const at::Tensor& residual, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
    double eps, int64_t activation, double negative_slope) {
  const int64_t r = check_adapter_args(kOpName, "tokens", /*stacked_dims=*/0, x, down_weight,
                                       down_bias, up_weight, up_bias, scaling, residual, ln_weight,
                                       ln_bias, eps, activation);
  return run_adapter_decode(kOpName, x, r, ln_weight, [&](auto type, AdapterDecodeOutputs& result) {
    run_forward<typename decltype(type)::type>(
        x, down_weight, down_bias, up_weight, up_bias, scaling, residual, ln_weight, ln_bias,
        static_cast<float>(eps), static_cast<int>(activation), static_cast<float>(negative_slope),
        result);
  });
}

}  // namespace pefops
