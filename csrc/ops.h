// Host entry points of the pefops CUDA extension. Each op family implements its functions in its own
// csrc/<family>.cu and declares them here; csrc/bindings.cpp registers them with Python.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace pefops {

// csrc/bottleneck_adapter_decode.cu. Decode shapes (T = x.size(0) <= 16).
// Returns (out [T, H] in x's dtype, z [T, r] fp32 pre-activation, mean [T] fp32, rstd [T] fp32);
// mean / rstd are empty [0] tensors when ln_weight is empty. down_bias, up_bias and ln_bias may be
// empty tensors (no bias). activation: a code of the Activation enum in common.cuh (leaky relu takes
// negative_slope).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bottleneck_adapter_decode_forward(
    const at::Tensor& x, const at::Tensor& down_weight, const at::Tensor& down_bias,
    const at::Tensor& up_weight, const at::Tensor& up_bias, const at::Tensor& scaling,
    const at::Tensor& residual, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
    double eps, int64_t activation, double negative_slope);

// csrc/masked_linear_decode.cu. Decode shapes (T = x.size(0) <= 16 tokens).
// y [T, N] in x's dtype = x @ (weight ⊙ M)^T + bias, accumulated in fp32, for x [T, K],
// weight [N, K] and packed_mask [N, ceil(K / 8)] uint8 (bit j of byte b is M[n, 8 b + j], the
// numpy.packbits(axis=1, bitorder="little") layout). bias [N] or an empty tensor (no bias).
// x, weight and bias share one dtype (float32, float16, bfloat16); all contiguous, one device.
at::Tensor masked_linear_decode_forward(const at::Tensor& x, const at::Tensor& weight,
                                        const at::Tensor& packed_mask, const at::Tensor& bias);

// csrc/multi_adapter_decode.cu. Mixed-task batches at decode shapes (T = x.size(0) <= 16 rows):
// row t uses adapter i = adapter_index[t] (int64 [T]) of N stacked adapters, down_weight [N, r, H],
// down_bias [N, r], up_weight [N, H, r], up_bias [N, H], scaling fp32 [N, H];
// out_t = [LayerNorm](residual_t + scaling[i] * (act(x_t @ Wd[i]^T + bd[i]) @ Wu[i]^T + bu[i])).
// Returns (out [T, H] in x's dtype, z [T, r] fp32, mean [T] fp32, rstd [T] fp32), mean / rstd empty
// without LayerNorm (ln_weight empty). Biases and ln_bias may be empty. A row whose index is outside
// [0, N) reads no weights and comes back NaN. Activation codes as above.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_adapter_decode_forward(
    const at::Tensor& x, const at::Tensor& adapter_index, const at::Tensor& down_weight,
    const at::Tensor& down_bias, const at::Tensor& up_weight, const at::Tensor& up_bias,
    const at::Tensor& scaling, const at::Tensor& residual, const at::Tensor& ln_weight,
    const at::Tensor& ln_bias, double eps, int64_t activation, double negative_slope);

// csrc/lsh_sort.cu. Stable counting sort of each row of keys (int64 or int32 [rows, n], contiguous,
// CUDA) whose values lie in [0, num_keys) (LSH offset buckets; num_keys up to what one block's shared
// memory holds as int32 counters, ~56k keys on sm_90). Returns (sorted_idx, undo_idx), both int64
// [rows, n]: sorted_idx = torch.argsort(keys, dim=1, stable=True) and
// undo_idx[r, sorted_idx[r, i]] = i (with_undo; otherwise undo_idx is empty and never written).
// Keys outside [0, num_keys) are sorted after all valid keys.
std::tuple<at::Tensor, at::Tensor> lsh_counting_sort(const at::Tensor& keys, int64_t num_keys,
                                                     bool with_undo);

}  // namespace pefops
