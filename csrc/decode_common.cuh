// What the decode-shape kernels (csrc/*_decode.cu: T <= 16 tokens, GEMV-like) share: their launch
// geometry, the host checks (CHECK_* macros in flash-attention's style), token buckets, the
// activation switch, the weight-row loads of their GEMV loops and the LayerNorm kernel.
//
// The CHECK_* macros prefix every message with the op's name: each .cu file defines
// `constexpr const char* kOpName` before it uses them. A message says what was wrong and what was
// expected. Checks that compare a tensor with x name x as the reference tensor.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.cuh"

namespace pefops {
namespace decode {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxTokens = 16;  // the largest T the decode kernels serve
// Rows of a weight matrix one warp of a GEMV kernel owns (Wd in the adapters' down projections,
// W in the masked GEMV), and one block of 8 warps.
constexpr int kRowsPerWarp = 4;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;  // 32
// A hidden / input slice is a multiple of this (32 lanes x one 16-byte vector of a 2-byte type).
constexpr int kSliceQuantum = 256;
constexpr int kLnThreads = 512;

// ---------------------------------------------------------------------------------------------
// Host side: checks.

inline std::string shape_str(const at::Tensor& t) {
  return t.defined() ? c10::str(t.sizes()) : std::string("undefined");
}

// An optional tensor argument: undefined or empty means absent.
inline bool is_present(const at::Tensor& t) { return t.defined() && t.numel() > 0; }

#define PEFOPS_CHECK(cond, ...) TORCH_CHECK(cond, kOpName, ": ", __VA_ARGS__)

#define CHECK_DEFINED(t) PEFOPS_CHECK((t).defined(), #t " is undefined")

#define CHECK_CONTIGUOUS(t) \
  PEFOPS_CHECK((t).is_contiguous(), #t " must be contiguous (call .contiguous())")

// t is n-D; layout names the dimensions, e.g. CHECK_DIM(up_weight, 2, "[H, r]").
#define CHECK_DIM(t, n, layout)                                                              \
  PEFOPS_CHECK((t).defined() && (t).dim() == (n), #t " must be ", (n), "-D ", layout,          \
               ", got shape ", ::pefops::decode::shape_str(t))

#define CHECK_DTYPE(t, dtype, expected) \
  PEFOPS_CHECK((t).scalar_type() == (dtype), #t " has dtype ", (t).scalar_type(), ", expected " expected)

// The expected sizes as a braced list: CHECK_SHAPE(up_weight, {H, r}).
#define CHECK_SHAPE(t, ...) ::pefops::decode::check_shape(kOpName, t, #t, __VA_ARGS__)

#define CHECK_SAME_DTYPE(t, x) ::pefops::decode::check_same_dtype(kOpName, t, #t, x)

// A parameter in x's dtype with exactly the given sizes, contiguous: CHECK_PARAM(up_bias, x, {H}).
#define CHECK_PARAM(t, x, ...) ::pefops::decode::check_param(kOpName, t, #t, x, __VA_ARGS__)

// x of a decode op: 2-D, float32 / float16 / bfloat16, T = x.size(0) <= kMaxTokens "tokens" or
// "rows" (rows_word), contiguous. Its device is checked last (CHECK_ON_CUDA), after every shape and
// dtype check, so that those messages are the same for CPU tensors (and testable without a GPU).
#define CHECK_DECODE_INPUT(x, layout, rows_word) \
  ::pefops::decode::check_decode_input(kOpName, x, #x, layout, rows_word)

#define CHECK_ON_CUDA(t) \
  PEFOPS_CHECK((t).is_cuda(), #t " must be a CUDA tensor, got a tensor on ", (t).device())

#define CHECK_SAME_DEVICE(t, x)                                                             \
  PEFOPS_CHECK((t).device() == (x).device(), #t " is on ", (t).device(), " but " #x " is on ", \
               (x).device(), "; all tensors must be on the same CUDA device")

#define CHECK_ACTIVATION(code)                                                                   \
  PEFOPS_CHECK((code) >= 0 && (code) < ::pefops::kNumActivations, "activation code ", (code),     \
               " is unknown, expected 0 identity, 1 relu, 2 gelu, 3 gelu_tanh, 4 silu, 5 tanh, " \
               "6 leaky_relu")

#define CHECK_EPS(eps) \
  PEFOPS_CHECK(std::isfinite(eps) && (eps) >= 0.0, #eps " must be finite and >= 0, got ", (eps))

// The functions behind the macros: `kOpName` is the op's name, as in the macros.
inline void check_shape(const char* kOpName, const at::Tensor& t, const char* name,
                        at::IntArrayRef shape) {
  PEFOPS_CHECK(t.sizes().equals(shape), name, " has shape ", shape_str(t), ", expected ", shape);
}

inline void check_same_dtype(const char* kOpName, const at::Tensor& t, const char* name,
                             const at::Tensor& x) {
  PEFOPS_CHECK(t.scalar_type() == x.scalar_type(), name, " has dtype ", t.scalar_type(),
               " but x has dtype ", x.scalar_type(), "; expected x's dtype (one dtype for the "
               "activations, weights, biases and LayerNorm parameters)");
}

inline void check_param(const char* kOpName, const at::Tensor& t, const char* name,
                        const at::Tensor& x, at::IntArrayRef shape) {
  PEFOPS_CHECK(t.defined(), name, " is undefined");
  check_same_dtype(kOpName, t, name, x);
  check_shape(kOpName, t, name, shape);
  PEFOPS_CHECK(t.is_contiguous(), name, " must be contiguous (call .contiguous())");
}

inline void check_decode_input(const char* kOpName, const at::Tensor& x, const char* name,
                               const char* layout, const char* rows_word) {
  PEFOPS_CHECK(x.defined() && x.dim() == 2, name, " must be 2-D ", layout, ", got shape ",
               shape_str(x));
  const auto dt = x.scalar_type();
  PEFOPS_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, name, " has dtype ", dt,
               ", expected float32, float16 or bfloat16");
  PEFOPS_CHECK(x.size(0) <= kMaxTokens, "T = ", name, ".size(0) = ", x.size(0), " ", rows_word,
               ", expected at most ", kMaxTokens,
               " (this is the decode-shape kernel; use the general path for more)");
  PEFOPS_CHECK(x.is_contiguous(), name, " must be contiguous (call .contiguous())");
}

// The argument checks of the two adapter decode ops: bottleneck_adapter_decode_forward (one
// adapter, stacked_dims = 0) and multi_adapter_decode_forward (N stacked adapters, stacked_dims = 1:
// the weights, biases and scaling have a leading [N]). x is [T, H]; down_weight [.., r, H],
// up_weight [.., H, r], residual [T, H], biases [.., r] / [.., H] or empty, scaling fp32 [.., H],
// ln_weight / ln_bias [H] or empty. Devices are checked last. Returns r.
inline int64_t check_adapter_args(const char* kOpName, const char* rows_word, int stacked_dims,
                                  const at::Tensor& x, const at::Tensor& down_weight,
                                  const at::Tensor& down_bias, const at::Tensor& up_weight,
                                  const at::Tensor& up_bias, const at::Tensor& scaling,
                                  const at::Tensor& residual, const at::Tensor& ln_weight,
                                  const at::Tensor& ln_bias, double eps, int64_t activation) {
  CHECK_DECODE_INPUT(x, "[T, H]", rows_word);
  const int64_t ntok = x.size(0);
  const int64_t H = x.size(1);
  constexpr int64_t kMaxHidden = std::numeric_limits<int32_t>::max() / kMaxTokens;
  PEFOPS_CHECK(H >= 1 && H <= kMaxHidden, "hidden size H = x.size(1) = ", H,
               " is out of range, expected 1 <= H <= ", kMaxHidden);
  CHECK_DIM(down_weight, 2 + stacked_dims, stacked_dims == 0 ? "[r, H]" : "[N, r, H]");
  const int64_t r = down_weight.size(stacked_dims);
  PEFOPS_CHECK(r >= 1 && r <= kMaxRank, "bottleneck size r = down_weight.size(", stacked_dims,
               ") = ", r, ", expected 1 <= r <= ", kMaxRank);
  const std::vector<int64_t> lead(down_weight.sizes().begin(),
                                  down_weight.sizes().begin() + stacked_dims);
  auto stacked = [&](std::initializer_list<int64_t> tail) {
    std::vector<int64_t> shape = lead;
    shape.insert(shape.end(), tail);
    return shape;
  };
  CHECK_PARAM(down_weight, x, stacked({r, H}));
  CHECK_PARAM(up_weight, x, stacked({H, r}));
  CHECK_PARAM(residual, x, {ntok, H});
  if (is_present(down_bias)) CHECK_PARAM(down_bias, x, stacked({r}));
  if (is_present(up_bias)) CHECK_PARAM(up_bias, x, stacked({H}));
  CHECK_DEFINED(scaling);
  CHECK_DTYPE(scaling, at::kFloat, "float32 (one scale per hidden unit; expand a scalar first)");
  CHECK_SHAPE(scaling, stacked({H}));
  CHECK_CONTIGUOUS(scaling);
  if (is_present(ln_weight)) {
    CHECK_PARAM(ln_weight, x, {H});
    if (is_present(ln_bias)) CHECK_PARAM(ln_bias, x, {H});
  } else {
    PEFOPS_CHECK(!is_present(ln_bias),
                 "ln_bias is given without ln_weight; expected both (LayerNorm) or neither");
  }
  CHECK_ACTIVATION(activation);
  CHECK_EPS(eps);

  CHECK_ON_CUDA(x);
  CHECK_SAME_DEVICE(down_weight, x);
  CHECK_SAME_DEVICE(up_weight, x);
  CHECK_SAME_DEVICE(residual, x);
  CHECK_SAME_DEVICE(scaling, x);
  if (is_present(down_bias)) CHECK_SAME_DEVICE(down_bias, x);
  if (is_present(up_bias)) CHECK_SAME_DEVICE(up_bias, x);
  if (is_present(ln_weight)) CHECK_SAME_DEVICE(ln_weight, x);
  if (is_present(ln_bias)) CHECK_SAME_DEVICE(ln_bias, x);
  return r;
}

// What the adapter decode ops return: out [T, H] in x's dtype, z [T, r] fp32, and per-row mean /
// rstd fp32 [T] with LayerNorm (empty [0] tensors without); and with LayerNorm the fp32 scratch y32
// [T, H] that the up projection writes and the LayerNorm kernel reads.
struct AdapterDecodeOutputs {
  at::Tensor out, z, mean, rstd, y32;

  AdapterDecodeOutputs(const at::Tensor& x, int64_t r, bool layer_norm) {
    const int64_t ntok = x.size(0);
    const auto f32 = x.options().dtype(at::kFloat);
    out = at::empty_like(x);
    z = at::empty({ntok, r}, f32);
    mean = at::empty({layer_norm ? ntok : 0}, f32);
    rstd = at::empty({layer_norm ? ntok : 0}, f32);
    if (layer_norm) y32 = at::empty({ntok, x.size(1)}, f32);
  }

  // Where the up projection writes y: the fp32 scratch with LayerNorm, else nullptr (then out).
  float* y32_or_null() { return y32.defined() ? y32.data_ptr<float>() : nullptr; }

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> as_tuple() const {
    return {out, z, mean, rstd};
  }
};

// The typed data pointers of an adapter decode call; absent biases are nullptr.
template <typename T>
struct AdapterDecodePointers {
  const T* x;
  const T* down_weight;
  const T* down_bias;
  const T* up_weight;
  const T* up_bias;
  const float* scaling;
  const T* residual;
  T* out;
  float* z;
};

// ---------------------------------------------------------------------------------------------
// Host side: launch helpers.

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline int next_pow2(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The adapters' up projections (y = a Wu^T): a group of G lanes shares one output row's r-long dot
// product, each warp holds 32 / G groups of kUpRowsPerGroup rows. G is the smallest power of two
// that covers r in VEC-wide loads (at least kUpMinGroup, so short ranks still fill a warp's lanes).
constexpr int kUpRowsPerGroup = 4;
constexpr int kUpMinGroup = 4;

struct UpProjectionTiling {
  bool vectorised;     // r and Wu allow VEC-wide loads
  int group;           // G lanes per output row
  int rows_per_block;  // output rows (of H) one block of kWarps warps covers
};

template <int VEC>
inline UpProjectionTiling up_projection_tiling(int r, const void* up_weight) {
  const bool vectorised = r % VEC == 0 && aligned16(up_weight);
  const int vec = vectorised ? VEC : 1;
  const int group = std::min(32, std::max(kUpMinGroup, next_pow2((r + vec - 1) / vec)));
  return {vectorised, group, kWarps * (32 / group) * kUpRowsPerGroup};
}

// The kernels are compiled for token buckets TB = 1, 2, 4, 8, 16 (TB >= T; rows t >= T are zero).
inline int token_bucket(int ntok) {
  if (ntok <= 1) return 1;
  if (ntok <= 2) return 2;
  if (ntok <= 4) return 4;
  if (ntok <= 8) return 8;
  return kMaxTokens;
}

// Calls launch(std::integral_constant<int, TB>{}) with the token bucket TB of ntok tokens, so that
// one generic lambda instantiates a kernel for every bucket.
template <typename Launch>
void with_token_bucket(int ntok, Launch&& launch) {
  switch (token_bucket(ntok)) {
    case 1:
      return launch(std::integral_constant<int, 1>{});
    case 2:
      return launch(std::integral_constant<int, 2>{});
    case 4:
      return launch(std::integral_constant<int, 4>{});
    case 8:
      return launch(std::integral_constant<int, 8>{});
    default:
      return launch(std::integral_constant<int, kMaxTokens>{});
  }
}

// Calls launch(std::integral_constant<int, VEC>{}) with VEC = V (one 16-byte vector of the
// element type) when `vector`, else VEC = 1 (the scalar path).
template <int V, typename Launch>
void with_vec_width(bool vector, Launch&& launch) {
  if (vector) {
    launch(std::integral_constant<int, V>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls launch(TypeTag<T>{}) with T the CUDA scalar type of dtype (float, __half, __nv_bfloat16).
template <typename Launch>
void with_cuda_type(const char* kOpName, at::ScalarType dtype, Launch&& launch) {
  switch (dtype) {
    case at::kFloat:
      return launch(TypeTag<float>{});
    case at::kHalf:
      return launch(TypeTag<__half>{});
    case at::kBFloat16:
      return launch(TypeTag<__nv_bfloat16>{});
    default:
      PEFOPS_CHECK(false, "unsupported dtype ", dtype, ", expected float32, float16 or bfloat16");
  }
}

// The adapter decode entries after their argument checks: x's device, the outputs, nothing to launch
// for T = 0, and launch(TypeTag<T>{}, outputs) with x's CUDA scalar type.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_adapter_decode(
    const char* kOpName, const at::Tensor& x, int64_t r, const at::Tensor& ln_weight, Launch&& launch) {
  const c10::cuda::CUDAGuard guard(x.device());
  AdapterDecodeOutputs result(x, r, is_present(ln_weight));
  if (x.size(0) == 0) return result.as_tuple();
  with_cuda_type(kOpName, x.scalar_type(), [&](auto type) { launch(type, result); });
  return result.as_tuple();
}

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return is_present(t) ? reinterpret_cast<const T*>(t.data_ptr()) : nullptr;
}

template <typename T>
AdapterDecodePointers<T> adapter_decode_pointers(
    const at::Tensor& x, const at::Tensor& down_weight, const at::Tensor& down_bias,
    const at::Tensor& up_weight, const at::Tensor& up_bias, const at::Tensor& scaling,
    const at::Tensor& residual, AdapterDecodeOutputs& result) {
  return {reinterpret_cast<const T*>(x.data_ptr()),
          reinterpret_cast<const T*>(down_weight.data_ptr()),
          data_or_null<T>(down_bias),
          reinterpret_cast<const T*>(up_weight.data_ptr()),
          data_or_null<T>(up_bias),
          scaling.data_ptr<float>(),
          reinterpret_cast<const T*>(residual.data_ptr()),
          reinterpret_cast<T*>(result.out.data_ptr()),
          result.z.data_ptr<float>()};
}

// ---------------------------------------------------------------------------------------------
// Device side and kernel launches. (Internal linkage: every .cu file gets its own copy of the
// kernels, so no host stub is shared across translation units.)
namespace {

__device__ __forceinline__ float apply_activation(float z, int act, float slope) {
  switch (act) {
    case kRelu:
      return z < 0.0f ? 0.0f : z;  // keeps NaN, like torch.relu
    case kGelu:  // exact, erf
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

// VEC elements at column `col` of each of R weight rows, as floats; a row that is not ok (past the
// matrix end: warp- or group-uniform) reads nothing and gives zeros.
template <typename T, int VEC, int R>
__device__ __forceinline__ void load_rows_or_zero(const T* const (&rows)[R], const bool (&row_ok)[R],
                                                  int col, float (&w)[R][VEC]) {
#pragma unroll
  for (int k = 0; k < R; ++k) {
    if (row_ok[k]) {
      load_global_f32<T, VEC>(rows[k] + col, w[k]);
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) w[k][v] = 0.0f;
    }
  }
}

// acc[k * TB + t] += dot(w[k], xv) over the VEC elements, for the R rows of one token t.
template <int VEC, int R, int TB>
__device__ __forceinline__ void fma_rows(float (&acc)[R * TB], int t, const float (&w)[R][VEC],
                                         const float (&xv)[VEC]) {
#pragma unroll
  for (int k = 0; k < R; ++k) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[k * TB + t] = fmaf(w[k][v], xv[v], acc[k * TB + t]);
  }
}

// The columns of a split GEMV that block (., s = blockIdx.y) of S = gridDim.y covers:
// [k0, k0 + klen) with k0 = s KS; klen > 0 because the host launches S = ceil(width / KS) slices.
struct BlockSlice {
  int S, s, k0, klen;
};

__device__ __forceinline__ BlockSlice block_slice(int width, int KS) {
  const int s = blockIdx.y;
  const int k0 = s * KS;
  return {static_cast<int>(gridDim.y), s, k0, min(KS, width - k0)};
}

// Stages columns [k0, k0 + klen) of the ntok rows of x [ntok, width] into xs [TB][KS] in shared
// memory, zeros for rows >= ntok and columns >= klen; the caller synchronises the block. With
// VEC > 1, width, KS, k0 and every staged column are multiples of VEC, so a vector lies inside the
// row or outside it.
template <typename T, int VEC, int TB>
__device__ __forceinline__ void stage_x_slice(T* xs, const T* __restrict__ x, int ntok, int width,
                                              int k0, int klen, int KS) {
  const int vecs_per_row = KS / VEC;
#pragma unroll 4
  for (int i = threadIdx.x; i < TB * vecs_per_row; i += kThreads) {
    const int t = i / vecs_per_row;
    const int c = (i - t * vecs_per_row) * VEC;
    const bool valid = t < ntok && c < klen;
    const T* src = x + (static_cast<int64_t>(t) * width + k0 + c);
    copy_or_zero<T, VEC>(xs + t * KS + c, src, valid);
  }
}

// acc[k * TB + t] += dot(w[k], x[t][col .. col + VEC)) for every token t of the x tile staged in
// shared memory, xs [TB][KS] in x's dtype.
template <typename T, int VEC, int R, int TB>
__device__ __forceinline__ void fma_staged_tokens(float (&acc)[R * TB], const float (&w)[R][VEC],
                                                  const T* xs, int KS, int col) {
#pragma unroll
  for (int t = 0; t < TB; ++t) {
    float xv[VEC];
    load_shared_f32<T, VEC>(xs + t * KS + col, xv);
    fma_rows<VEC, R, TB>(acc, t, w, xv);
  }
}

// Reduces the per-lane accumulators acc[k * TB + t] (R rows x TB tokens) across the warp with the
// shuffle reduce-scatter and calls store(k, t, total) once per (k, t), from the lane that owns it.
// All 32 lanes must call it; acc is clobbered.
template <int R, int TB, typename Store>
__device__ __forceinline__ void warp_reduce_rows(float (&acc)[R * TB], int lane, Store&& store) {
  constexpr int N = R * TB;
  const int base = group_reduce_scatter<N>(acc, lane, 32);
  constexpr int kHeld = N >= 32 ? N / 32 : 1;
  if (lane >= N) return;  // not an owner (only happens when N < 32)
#pragma unroll
  for (int i = 0; i < kHeld; ++i) {
    const int idx = base + i;
    store(idx / TB, idx % TB, acc[i]);
  }
}

// LayerNorm over each fp32 row of y (one block per row). Two passes (mean, then the centred sum of
// squares) so there is no cancellation; the row (H * 4 bytes) is re-read from L1/L2.
template <typename T>
__global__ void __launch_bounds__(kLnThreads) layernorm_rows_kernel(
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

// With LayerNorm (result.y32 defined): normalises the rows of result.y32 into result.out (x's
// dtype) and writes result.mean / result.rstd. Without: nothing to do.
template <typename T>
void launch_layernorm_rows(cudaStream_t stream, const at::Tensor& ln_weight,
                           const at::Tensor& ln_bias, float eps, AdapterDecodeOutputs& result) {
  if (!result.y32.defined()) return;
  const int ntok = static_cast<int>(result.y32.size(0));
  const int H = static_cast<int>(result.y32.size(1));
  layernorm_rows_kernel<T><<<ntok, kLnThreads, 0, stream>>>(
      result.y32.data_ptr<float>(), reinterpret_cast<const T*>(ln_weight.data_ptr()),
      data_or_null<T>(ln_bias), reinterpret_cast<T*>(result.out.data_ptr()),
      result.mean.data_ptr<float>(), result.rstd.data_ptr<float>(), H, eps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace decode
}  // namespace pefops
