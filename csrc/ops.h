// Host entry points of the pefops CUDA extension. Each op family implements its functions in its own
// csrc/<family>.cu and declares them here; csrc/bindings.cpp registers them with Python.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace pefops {

// csrc/bottleneck_adapter_decode.cu. Decode shapes (T = x.size(0) <= 16).
// Returns (out [T, H] in x's dtype, z [T, r] fp32 pre-activation, mean [T] fp32, rstd [T] fp32);
// mean / rstd are empty [0] tensors when ln_weight is empty. down_bias, up_bias and ln_bias may be
// empty tensors (no bias). activation: 0 identity, 1 relu, 2 gelu (erf), 3 gelu tanh approximation,
// 4 silu, 5 tanh, 6 leaky_relu(negative_slope).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bottleneck_adapter_decode_forward(
    const at::Tensor& x, const at::Tensor& down_weight, const at::Tensor& down_bias,
    const at::Tensor& up_weight, const at::Tensor& up_bias, const at::Tensor& scaling,
    const at::Tensor& residual, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
    double eps, int64_t activation, double negative_slope);

}  // namespace pefops
