"""cuda-build tier for csrc/lsh_sort.cu: the extension compiles with the counting sort in it (no GPU
needed), and its host-side checks run on CPU tensors with clear messages. The build is the
session's `built_ext` (tests/csrc/conftest.py; memoised in the process, cached on disk)."""


import pytest

torch = pytest.importorskip("torch")

from pefops import csrc  # noqa: E402
from pefops.ops import counting_sort  # noqa: E402


@pytest.mark.cuda_build
def test_extension_exports_the_counting_sort(built_ext):
    assert "lsh_counting_sort" in csrc.REQUIRED_SYMBOLS
    assert callable(built_ext.lsh_counting_sort)
    assert "argsort" in (built_ext.lsh_counting_sort.__doc__ or "")


@pytest.mark.cuda_build
@pytest.mark.parametrize("keys,num_keys,message", [
    (torch.zeros(2, 8), 4, "expected int64 or int32"),
    (torch.zeros(2, 8, dtype=torch.int16), 4, "expected int64 or int32"),
    (torch.zeros(2, 3, 8, dtype=torch.long), 4, "must be 2-D"),
    (torch.zeros(8, 2, dtype=torch.long).t(), 4, "must be contiguous"),
    (torch.zeros(2, 8, dtype=torch.long), 0, "num_keys must be >= 1"),
    (torch.zeros(2, 8, dtype=torch.int32), 4, "must be a CUDA tensor"),
])
def test_host_checks_run_without_a_gpu(built_ext, keys, num_keys, message):
    with pytest.raises(RuntimeError, match=message):
        built_ext.lsh_counting_sort(keys, num_keys)


def test_python_wrapper_reasons_and_errors():
    # no build needed: the wrapper explains why it cannot serve a CPU tensor and rejects bad arguments
    keys = torch.zeros(2, 3, 8, dtype=torch.long)
    assert any("not a CUDA device" in r for r in counting_sort.unavailable_reasons(keys, 4))
    with pytest.raises(RuntimeError, match="not a CUDA device"):
        counting_sort.lsh_counting_sort(keys, 4)
    with pytest.raises(ValueError, match="int64 or int32"):
        counting_sort.lsh_counting_sort(keys.float(), 4)
    with pytest.raises(ValueError, match="num_keys must be a positive int"):
        counting_sort.lsh_counting_sort(keys, 0)
    assert counting_sort.unavailable_reasons(keys, True) == [
        "num_keys must be a positive int (keys lie in [0, num_keys)), got True"]


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_reference_is_stable_argsort_and_inverse(dtype):
    g = torch.Generator().manual_seed(0)
    keys = torch.randint(0, 5, (3, 2, 257), generator=g).to(dtype)  # many ties
    sorted_idx, undo_idx = counting_sort.lsh_counting_sort_ref(keys, 5)
    n = keys.shape[-1]
    # stability written out: sort by key * n + position (unique composite keys)
    composite = keys.long() * n + torch.arange(n)
    assert torch.equal(sorted_idx, composite.argsort(dim=-1))
    assert torch.equal(undo_idx.gather(-1, sorted_idx), torch.arange(n).expand_as(keys))
    assert sorted_idx.dtype == undo_idx.dtype == torch.int64
