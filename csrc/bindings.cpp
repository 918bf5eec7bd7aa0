// Python bindings of the pefops CUDA extension (built as pefops._C by setup.py, or just-in-time as
// pefops_csrc by pefops/csrc.py; TORCH_EXTENSION_NAME is set accordingly by torch's build helpers).
// A new op family adds its csrc/<family>.cu, its declarations in ops.h and its m.def lines here.
#include <torch/extension.h>

#include "ops.h"

namespace {

// The two adapter decode ops take the same arguments after their leading ones (x; x, adapter_index).
template <typename Func, typename... Leading>
void def_adapter_decode_op(pybind11::module_& m, const char* name, Func func, const char* doc,
                           Leading... leading) {
  m.def(name, func, doc, leading..., pybind11::arg("down_weight"), pybind11::arg("down_bias"),
        pybind11::arg("up_weight"), pybind11::arg("up_bias"), pybind11::arg("scaling"),
        pybind11::arg("residual"), pybind11::arg("ln_weight"), pybind11::arg("ln_bias"),
        pybind11::arg("eps"), pybind11::arg("activation"), pybind11::arg("negative_slope"));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pefops CUDA kernels (csrc/)";

  def_adapter_decode_op(
      m, "bottleneck_adapter_decode_forward", &pefops::bottleneck_adapter_decode_forward,
      "Fused bottleneck adapter forward for decode shapes (T <= 16 tokens): "
      "out = [LayerNorm](residual + scaling * (act(x @ Wd^T + bd) @ Wu^T + bu)). "
      "Returns (out, z, mean, rstd); z, mean and rstd are float32, mean/rstd empty without "
      "LayerNorm.",
      pybind11::arg("x"));

  m.def("masked_linear_decode_forward", &pefops::masked_linear_decode_forward,
        "Binary-masked linear forward for decode shapes (T <= 16 tokens): "
        "y = x @ (weight * M)^T + bias with M unpacked from packed_mask [N, ceil(K / 8)] uint8 "
        "(little bit order along K); fp32 accumulation, y in x's dtype. bias may be empty.",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("packed_mask"),
        pybind11::arg("bias"));

  def_adapter_decode_op(
      m, "multi_adapter_decode_forward", &pefops::multi_adapter_decode_forward,
      "Mixed-task bottleneck adapters, forward at decode shapes (T <= 16 rows): row t uses "
      "adapter adapter_index[t] of the stacked weights; out = [LayerNorm](residual + scaling[i] * "
      "(act(x @ Wd[i]^T + bd[i]) @ Wu[i]^T + bu[i])). Returns (out, z, mean, rstd); z, mean and "
      "rstd are float32, mean/rstd empty without LayerNorm; rows with an out-of-range index are NaN.",
      pybind11::arg("x"), pybind11::arg("adapter_index"));

  m.def("lsh_counting_sort", &pefops::lsh_counting_sort,
        "Stable counting sort of each row of keys (int64 or int32 [rows, n], CUDA, contiguous) with "
        "values in [0, num_keys): returns (sorted_idx, undo_idx), int64 [rows, n], sorted_idx equal "
        "to torch.argsort(keys, dim=1, stable=True) and undo_idx its inverse permutation "
        "(undo_idx[r, sorted_idx[r, i]] = i); with_undo=False leaves undo_idx empty (not written). "
        "Keys outside [0, num_keys) sort after all valid keys.",
        pybind11::arg("keys"), pybind11::arg("num_keys"), pybind11::arg("with_undo") = true);
}
