// Binary-masked linear layer (mask-tuning), decode shapes (T <= 16 tokens): forward.
//
//   y = x @ (W ⊙ M)^T + b        x [T, K], W [N, K], b [N] (optional), y [T, N] in x's dtype
//
// M is a 1-bit mask packed along K: packed_mask [N, KB] uint8 with KB = ceil(K / 8); bit j of byte
// b of row n is M[n, 8 b + j] (numpy.packbits(axis=1, bitorder="little")). Bits past K are never
// read. A masked weight is *selected* away (w = bit ? w : 0), not multiplied by 0, so it
// contributes exactly +0 even when it holds inf or NaN. Everything is accumulated in float32; only y is rounded
// to the input dtype.
//
// Roofline. At decode shapes this is a GEMV: the time floor is streaming W and its mask bits once,
// for all T tokens together (never once per token):
//
//   bytes = N K sizeof(dtype) + N ceil(K / 8)          (W and the packed mask, each read once)
//         + T K sizeof(dtype) + T N sizeof(dtype)      (x in, y out)
//         + N sizeof(dtype) with a bias; with S > 1 K-slices also 2 S T N * 4 bytes of fp32
//           partials (written, then read back from L2 by the finalize kernel)
//
//   floors at the ~4.3 TB/s an H200 copies at (bf16; fp32 doubles the W term):
//     N = 4096,  K = 4096,  T = 1:   33.55 MB + 2.10 MB + 16 kB   = 35.67 MB ->  8.3 us
//     N = 4096,  K = 4096,  T = 16:  33.55 MB + 2.10 MB + 262 kB  = 35.91 MB ->  8.4 us
//     N = 11008, K = 4096,  T = 1:   90.18 MB + 5.64 MB + 30 kB   = 95.84 MB -> 22.3 us
//     N = 4096,  K = 11008, T = 1:   90.18 MB + 5.64 MB + 30 kB   = 95.84 MB -> 22.3 us
//     N = 4096,  K = 4096,  T = 1, fp32: 67.11 MB + 2.10 MB        = 69.24 MB -> 16.1 us
//   The mask costs 1 / (8 sizeof(dtype)) of W's traffic: +6.25 % in bf16 / fp16, +3.1 % in fp32.
//   Compute: 2 T N K flop plus ~2 integer/select ops per weight for the mask; at T = 16 in bf16
//   that is 8 FMA per weight byte, about the fp32 FMA rate of an SM at full HBM bandwidth, so
//   T = 16 sits at the compute/bandwidth balance point on CUDA cores (a tensor-core mma path would
//   be the next step there); T <= 8 is memory-bound.
//
// Kernels (all on the current stream):
//   1. masked_gemv_kernel   grid (ceil(N / 32), S): each block owns 32 rows of W (8 warps x 4 rows)
//      and one slice of KS input columns. Before staging x[:, slice] in shared memory every warp
//      already issues its first loads of W and of the mask bytes (so the staging round trip
//      overlaps the weight stream); after that the loop keeps one step of loads in flight ahead of
//      the FMAs. Lane l reads columns c = l VEC + i 32 VEC of the slice: 16-byte vectors of W
//      (VEC = 16 / sizeof(dtype)) when x and W are 16-byte aligned and K % VEC == 0, else single
//      elements, plus the mask byte that holds those columns' bits (VEC <= 8, and c is a multiple
//      of VEC, so the VEC bits sit in one byte). T x 4 fp32 accumulators per lane, reduced across
//      the warp with a shuffle reduce-scatter. With S == 1 the block adds the bias and writes y,
//      otherwise it writes fp32 partials [S, T, N].
//   2. masked_finalize_kernel (only when S > 1): sums the S partials in a fixed order
//      (deterministic), adds the bias, writes y.
//   S is chosen by a small wave model (choose_split): the fewest, longest slices whose blocks fill
//   the resident block slots of the GPU with the least quantisation loss in the last wave.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common.cuh"
#include "decode_common.cuh"
#include "ops.h"

namespace pefops {
namespace {

using namespace decode;  // kWarps, kThreads, kRowsPerWarp, kRowsPerBlock, kSliceQuantum, helpers

constexpr const char* kOpName = "masked_linear_decode_forward";

constexpr int kSmemBudget = 48 * 1024;  // bytes of staged x per block (no opt-in needed)
// Wave model of choose_split, in units of "columns of one 32-row block": the fixed cost of a block
// (start, staging round trip, reduction) and of the extra finalize launch when S > 1.
constexpr int kBlockOverheadCols = 128;
constexpr int kSplitPenaltyCols = 256;
constexpr int kMaxGridY = 65535;

// Per token bucket: vectors per lane and row per loop step (U: the loads kept in flight are
// 2 U x 4 rows x 16 bytes per lane) and the blocks per SM that __launch_bounds__ asks for (a
// register cap: 2 blocks -> <= 128 registers, 1 -> <= 255). TB = 16 keeps 64 accumulators and
// runs one block per SM, so it keeps twice the loads in flight per warp; TB = 4 and 8 keep one
// vector per row in flight to stay clear of 128 registers (TB = 4 with U = 2 sat at 128 and spilled
// in fp16).
template <int TB>
struct TileConfig {
  static constexpr int kVecsPerLane = (TB <= 2 || TB >= 16) ? 2 : 1;
  static constexpr int kMinBlocks = TB >= 16 ? 1 : 2;
};

// The raw (unconverted) form of VEC elements of T as loaded from global memory.
template <typename T, int VEC>
using RawVec = std::conditional_t<VEC == 1, T, uint4>;

template <typename T, int VEC>
__device__ __forceinline__ RawVec<T, VEC> load_raw(const T* __restrict__ p) {
  if constexpr (VEC == 1) {
    return p[0];
  } else {
    return __ldg(reinterpret_cast<const uint4*>(p));
  }
}

template <typename T, int VEC>
__device__ __forceinline__ RawVec<T, VEC> zero_raw() {
  if constexpr (VEC == 1) {
    return Cvt<T>::from_float(0.0f);
  } else {
    return make_uint4(0u, 0u, 0u, 0u);
  }
}

// VEC floats of a raw vector; element v is kept when bit v of `bits` is set, else it is +0.0.
template <typename T, int VEC>
__device__ __forceinline__ void unpack_masked(const RawVec<T, VEC>& raw, uint32_t bits,
                                              float (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = Cvt<T>::to_float(raw);
  } else {
    unpack16<T>(raw, out);
  }
#pragma unroll
  for (int v = 0; v < VEC; ++v) out[v] = ((bits >> v) & 1u) != 0u ? out[v] : 0.0f;
}

// ---------------------------------------------------------------------------------------------
// Kernel 1: y (S == 1) or partials (S > 1). Block (bx, s): rows n in [32 bx, 32 bx + 32) of W,
// columns [s KS, s KS + klen) of K. Warp w owns rows 32 bx + 4 w + k, k < 4. TB >= T is the token
// bucket (1, 2, 4, 8, 16): rows t >= T of the staged x are zero, so their accumulators stay zero
// and are never written. Rows n >= N (last block) load nothing and get an all-zero mask.
template <typename T, int VEC, int TB>
__global__ void __launch_bounds__(kThreads, TileConfig<TB>::kMinBlocks) masked_gemv_kernel(
    const T* __restrict__ x,              // [T, K]
    const T* __restrict__ w,              // [N, K]
    const uint8_t* __restrict__ mask,     // [N, KB] packed bits, KB = ceil(K / 8)
    const T* __restrict__ bias,           // [N] or nullptr (used only when S == 1)
    T* __restrict__ y,                    // [T, N]    (written only when S == 1)
    float* __restrict__ ypart,            // [S, T, N] (written only when S > 1)
    int ntok, int N, int K, int KB, int KS) {
  constexpr int R = kRowsPerWarp;
  constexpr int U = TileConfig<TB>::kVecsPerLane;
  constexpr int kStep = 32 * VEC;  // columns one warp covers per vector slot
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);  // [TB][KS]

  const BlockSlice slice = block_slice(K, KS);
  const int S = slice.S, s = slice.s, k0 = slice.k0, klen = slice.klen;

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int n0 = blockIdx.x * kRowsPerBlock + warp * R;
  const bool warp_active = n0 < N;  // warp-uniform

  const T* wrow[R];
  const uint8_t* mrow[R];
  bool row_ok[R];
#pragma unroll
  for (int k = 0; k < R; ++k) {
    row_ok[k] = n0 + k < N;  // warp-uniform
    const int64_t n = row_ok[k] ? n0 + k : (warp_active ? n0 : 0);
    wrow[k] = w + (n * K + k0);
    mrow[k] = mask + n * KB;
  }

  // Loads of one loop step: U vectors per row, columns c + u * kStep, and their mask bits (the
  // byte holding global column k0 + cc, shifted so that bit v belongs to element v).
  RawVec<T, VEC> wn[R][U];
  uint32_t mn[R][U];
  auto fetch = [&](int c) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int cc = c + u * kStep;
#pragma unroll
      for (int k = 0; k < R; ++k) {
        const bool valid = row_ok[k] && cc < klen;
        const int gc = k0 + cc;
        wn[k][u] = valid ? load_raw<T, VEC>(wrow[k] + cc) : zero_raw<T, VEC>();
        mn[k][u] = valid ? static_cast<uint32_t>(__ldg(mrow[k] + (gc >> 3))) >> (gc & 7) : 0u;
      }
    }
  };

  int c = lane * VEC;
  if (warp_active) fetch(c);  // in flight while x is staged

  stage_x_slice<T, VEC, TB>(xs, x, ntok, K, k0, klen, KS);  // rows >= ntok, columns >= klen: 0
  __syncthreads();
  if (!warp_active) return;  // whole warp idle; no block barrier follows

  float acc[R * TB];  // acc[k * TB + t]
#pragma unroll
  for (int i = 0; i < R * TB; ++i) acc[i] = 0.0f;

  // Not unrolled: unrolling by 2 (so that wn / wc swap roles instead of being copied) cost 2-15
  // registers (with U = 2 everywhere: bf16 TB = 1 115 -> 120, TB = 16 190 -> 196, and fp16
  // TB = 4 spilled 24 bytes at the 128-register cap).
#pragma unroll 1
  for (; c < klen; c += U * kStep) {
    RawVec<T, VEC> wc[R][U];
    uint32_t mc[R][U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int k = 0; k < R; ++k) {
        wc[k][u] = wn[k][u];
        mc[k][u] = mn[k][u];
      }
    }
    if (c + U * kStep < klen) fetch(c + U * kStep);  // the next step's loads, ahead of the FMAs

#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int cc = c + u * kStep;
      if (cc < klen) {
        float wf[R][VEC];
#pragma unroll
        for (int k = 0; k < R; ++k) unpack_masked<T, VEC>(wc[k][u], mc[k][u], wf[k]);
        fma_staged_tokens<T, VEC, R, TB>(acc, wf, xs, KS, cc);
      }
    }
  }

  warp_reduce_rows<R, TB>(acc, lane, [&](int k, int t, float total) {
    const int n = n0 + k;
    if (t < ntok && n < N) {
      if (S == 1) {
        const float b = bias != nullptr ? Cvt<T>::to_float(bias[n]) : 0.0f;
        y[static_cast<int64_t>(t) * N + n] = Cvt<T>::from_float(total + b);
      } else {
        ypart[(static_cast<int64_t>(s) * ntok + t) * N + n] = total;
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Kernel 2: y = sum_s ypart[s] + b (fixed order). One thread per (t, n).
template <typename T>
__global__ void __launch_bounds__(kThreads) masked_finalize_kernel(
    const float* __restrict__ ypart,  // [S, T, N]
    const T* __restrict__ bias,       // [N] or nullptr
    T* __restrict__ y,                // [T, N]
    int ntok, int N, int S) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t total = static_cast<int64_t>(ntok) * N;
  if (idx >= total) return;
  float acc = 0.0f;
  for (int p = 0; p < S; ++p) acc += ypart[p * total + idx];
  const int n = static_cast<int>(idx % N);
  acc += bias != nullptr ? Cvt<T>::to_float(bias[n]) : 0.0f;
  y[idx] = Cvt<T>::from_float(acc);
}

// ---------------------------------------------------------------------------------------------
// Host side.

// K-slice width KS (a multiple of kSliceQuantum, TB KS itemsize <= kSmemBudget) and the number of
// slices S = ceil(K / KS). Wave model: the B = ceil(N / 32) S blocks run in ceil(B / slots) waves
// of `slots` resident blocks, each wave as long as one block's slice plus a fixed block cost; a
// split adds a finalize launch. The cheapest KS wins, the widest one on ties (fewest partials).
struct Split {
  int S;
  int KS;
};

Split choose_split(int64_t N, int64_t K, int TB, int itemsize, int64_t slots) {
  const int64_t row_blocks = ceil_div(N, kRowsPerBlock);
  const int64_t ks_budget =
      std::max<int64_t>(kSliceQuantum, (kSmemBudget / (TB * itemsize)) / kSliceQuantum *
                                           kSliceQuantum);
  const int64_t ks_top = std::min(ks_budget, ceil_div(K, kSliceQuantum) * kSliceQuantum);
  slots = std::max<int64_t>(slots, 1);
  Split best{static_cast<int>(ceil_div(K, ks_top)), static_cast<int>(ks_top)};
  int64_t best_cost = std::numeric_limits<int64_t>::max();
  for (int64_t ks = ks_top; ks >= kSliceQuantum; ks -= kSliceQuantum) {
    const int64_t S = ceil_div(K, ks);
    if (S > kMaxGridY) break;
    const int64_t waves = ceil_div(row_blocks * S, slots);
    const int64_t cost = waves * (ks + kBlockOverheadCols) + (S > 1 ? kSplitPenaltyCols : 0);
    if (cost < best_cost) {
      best_cost = cost;
      best = Split{static_cast<int>(S), static_cast<int>(ks)};
    }
  }
  return best;
}

template <typename T, int VEC, int TB>
void launch_tb(const Split& split, int64_t N, int64_t K, int ntok, cudaStream_t stream,
               const T* x, const T* w, const uint8_t* mask, const T* bias, T* y, float* ypart) {
  const size_t smem = static_cast<size_t>(TB) * split.KS * sizeof(T);
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kRowsPerBlock)), split.S);
  masked_gemv_kernel<T, VEC, TB><<<grid, kThreads, smem, stream>>>(
      x, w, mask, bias, y, ypart, ntok, static_cast<int>(N), static_cast<int>(K),
      static_cast<int>(ceil_div(K, 8)), split.KS);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Resident blocks per SM of one instantiation at its largest shared-memory size (asked once per
// device and instantiation; a cheap host computation after the first call).
template <typename T, int VEC, int TB>
int64_t resident_slots(const cudaDeviceProp* prop) {
  static std::atomic<int> cached[64];
  const int dev = c10::cuda::current_device();
  if (dev < 64) {
    const int hit = cached[dev].load(std::memory_order_relaxed);
    if (hit > 0) return static_cast<int64_t>(hit) * prop->multiProcessorCount;
  }
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, masked_gemv_kernel<T, VEC, TB>, kThreads, static_cast<size_t>(kSmemBudget)));
  per_sm = std::max(per_sm, 1);
  if (dev < 64) cached[dev].store(per_sm, std::memory_order_relaxed);
  return static_cast<int64_t>(per_sm) * prop->multiProcessorCount;
}

template <typename T, int VEC, int TB>
void run_tb(int64_t N, int64_t K, int ntok, const T* x, const T* w, const uint8_t* mask,
            const T* bias, T* y, const at::TensorOptions& f32) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Split split =
      choose_split(N, K, TB, static_cast<int>(sizeof(T)), resident_slots<T, VEC, TB>(prop));
  TORCH_CHECK(split.S <= kMaxGridY, kOpName, ": in_features K = ", K,
              " needs more than 65535 K-slices of this kernel");
  at::Tensor ypart;
  float* ypp = nullptr;
  if (split.S > 1) {
    ypart = at::empty({split.S, ntok, N}, f32);
    ypp = ypart.data_ptr<float>();
  }
  launch_tb<T, VEC, TB>(split, N, K, ntok, stream, x, w, mask, bias, y, ypp);
  if (split.S > 1) {
    const int64_t total = static_cast<int64_t>(ntok) * N;
    masked_finalize_kernel<T><<<static_cast<unsigned>(ceil_div(total, kThreads)), kThreads, 0,
                                stream>>>(ypp, bias, y, ntok, static_cast<int>(N), split.S);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void run_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& packed_mask,
                 const at::Tensor& bias, at::Tensor& y) {
  const int ntok = static_cast<int>(x.size(0));
  const int64_t K = x.size(1);
  const int64_t N = weight.size(0);
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const T* wp = reinterpret_cast<const T*>(weight.data_ptr());
  const uint8_t* mp = packed_mask.data_ptr<uint8_t>();
  const T* bp = data_or_null<T>(bias);
  T* yp = reinterpret_cast<T*>(y.data_ptr());
  const auto f32 = x.options().dtype(at::kFloat);

  constexpr int V = vec16<T>();
  with_vec_width<V>(K % V == 0 && aligned16(xp) && aligned16(wp), [&](auto vec) {
    with_token_bucket(ntok, [&](auto tb) {
      run_tb<T, decltype(vec)::value, decltype(tb)::value>(N, K, ntok, xp, wp, mp, bp, yp, f32);
    });
  });
}

}  // namespace

at::Tensor masked_linear_decode_forward(const at::Tensor& x, const at::Tensor& weight,
                                        const at::Tensor& packed_mask, const at::Tensor& bias) {
  // Layout, dtype and shape checks come first and devices last, so that the messages about
  // shapes and dtypes are the same for CPU tensors (and testable without a GPU).
  CHECK_DECODE_INPUT(x, "[T, K]", "tokens");
  const int64_t ntok = x.size(0);
  const int64_t K = x.size(1);
  constexpr int64_t kMaxK = std::numeric_limits<int32_t>::max() - kSliceQuantum;
  PEFOPS_CHECK(K <= kMaxK, "in_features K = x.size(1) = ", K, " is out of range, expected K <= ",
               kMaxK);

  CHECK_DIM(weight, 2, "[N, K] = [out_features, in_features]");
  const int64_t N = weight.size(0);
  CHECK_SAME_DTYPE(weight, x);
  PEFOPS_CHECK(weight.size(1) == K, "weight has shape ", shape_str(weight),
               ", expected [N, K] with K = x.size(1) = ", K);
  constexpr int64_t kMaxN = std::numeric_limits<int32_t>::max() / kMaxTokens;
  PEFOPS_CHECK(N <= kMaxN, "out_features N = weight.size(0) = ", N,
               " is out of range, expected N <= ", kMaxN);
  CHECK_CONTIGUOUS(weight);

  const int64_t KB = ceil_div(K, 8);
  CHECK_DEFINED(packed_mask);
  CHECK_DTYPE(packed_mask, at::kByte,
              "uint8 (bits packed along K, little bit order: "
              "numpy.packbits(m, axis=1, bitorder=\"little\"))");
  PEFOPS_CHECK(packed_mask.dim() == 2 && packed_mask.size(0) == N && packed_mask.size(1) == KB,
               "packed_mask has shape ", shape_str(packed_mask), ", expected [N, ceil(K / 8)] = [",
               N, ", ", KB, "] for weight of shape ", shape_str(weight));
  CHECK_CONTIGUOUS(packed_mask);

  const bool has_bias = is_present(bias);
  if (has_bias) {
    CHECK_SAME_DTYPE(bias, x);
    PEFOPS_CHECK(bias.dim() == 1 && bias.size(0) == N, "bias has shape ", shape_str(bias),
                 ", expected [N] = [", N, "] (or an empty tensor for no bias)");
    CHECK_CONTIGUOUS(bias);
  }

  CHECK_ON_CUDA(x);
  CHECK_SAME_DEVICE(weight, x);
  CHECK_SAME_DEVICE(packed_mask, x);
  if (has_bias) CHECK_SAME_DEVICE(bias, x);

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({ntok, N}, x.options());
  if (ntok == 0 || N == 0) return y;
  if (K == 0) {  // empty dot products
    if (has_bias) {
      y.copy_(bias.unsqueeze(0).expand({ntok, N}));
    } else {
      y.zero_();
    }
    return y;
  }

  with_cuda_type(kOpName, x.scalar_type(), [&](auto type) {
    run_forward<typename decltype(type)::type>(x, weight, packed_mask, bias, y);
  });
  return y;
}

}  // namespace pefops
