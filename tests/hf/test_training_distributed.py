"""DDP and FSDP2 (fully_shard per layer, the frozen base sharded too) with every pefops method, 2
processes over gloo on CPU (#16): after K steps the trainable
parameters equal a single-process run over the whole batch and are identical on both ranks
(mixed-task batches included: each rank routes its own rows)."""

import pytest
import torch

pytest.importorskip("transformers")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from tests.hf.training_distributed import WORLD, free_port, single_process, worker  # noqa: E402
from tests.hf.training_models import METHODS  # noqa: E402

pytestmark = pytest.mark.hf


def run_workers(mode, methods, tmp_path):
    torch.multiprocessing.spawn(worker, args=(mode, methods, free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    return {method: [torch.load(tmp_path / f"{mode}-{method}-{rank}.pt") for rank in range(WORLD)]
            for method in methods}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_equals_one_process_over_the_whole_batch(mode, tmp_path):
    if mode == "fsdp":
        pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 fully_shard needs torch >= 2.6")
        from torch.distributed import fsdp

        if not hasattr(fsdp, "fully_shard"):
            pytest.skip("this torch has no torch.distributed.fsdp.fully_shard (FSDP2)")
    results = run_workers(mode, METHODS, tmp_path)
    for method in METHODS:
        expected = single_process(method)
        first, second = results[method]
        assert first.keys() == second.keys() == expected.keys(), method
        for name, value in expected.items():
            assert torch.equal(first[name], second[name]), f"{method} {name}: ranks differ"
            torch.testing.assert_close(first[name], value, rtol=1e-5, atol=1e-6, msg=f"{method} {name}")
