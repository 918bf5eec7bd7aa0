"""DDP and FSDP2 (fully_shard per layer, the frozen base sharded too) with every pefops method, 2
processes over gloo on CPU (#16): after K steps the trainable parameters equal a single-process run over
the whole batch and are identical on both ranks (mixed-task batches included: each rank routes its own
rows). FSDP2 also: a checkpoint saved from the sharded model (every rank calls hf.save_*, rank 0 writes)
loads into an unsharded and a sharded model with equal outputs and equals the same save from an
unsharded model; calls that would change a sharded model's parameters are refused, the model unchanged.
One spawn per mode runs every method (a spawn costs seconds of imports); failures still name the method."""

import functools

import pytest
import torch

pytest.importorskip("transformers")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from tests.hf.training_distributed import WORLD, free_port, single_process, worker  # noqa: E402
from tests.hf.training_models import METHODS  # noqa: E402

pytestmark = pytest.mark.hf


def needs_fsdp2():
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no torch.distributed.fsdp.fully_shard (FSDP2)")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{mode: output directory}, each mode spawned once, on first use."""
    done = {}

    def run(mode):
        if mode not in done:
            directory = tmp_path_factory.mktemp(mode)
            torch.multiprocessing.spawn(worker, args=(mode, METHODS, free_port(), str(directory)), nprocs=WORLD,
                                        join=True)
            done[mode] = directory
        return done[mode]

    return run


@functools.cache
def one_process(method) -> dict:
    """single_process(method), computed once for both modes."""
    return single_process(method)


def per_rank(directory, name):
    return [torch.load(directory / f"{name}-{rank}.pt") for rank in range(WORLD)]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_equals_one_process_over_the_whole_batch(mode, runs):
    if mode == "fsdp":
        needs_fsdp2()
    directory = runs(mode)
    for method in METHODS:
        expected = one_process(method)
        first, second = per_rank(directory, f"{mode}-{method}")
        assert first.keys() == second.keys() == expected.keys(), method
        for name, value in expected.items():
            assert torch.equal(first[name], second[name]), f"{method} {name}: ranks differ"
            torch.testing.assert_close(first[name], value, rtol=1e-5, atol=1e-6, msg=f"{method} {name}")


def test_fsdp_checkpoint_loads_into_unsharded_and_sharded_models(runs):
    needs_fsdp2()
    directory = runs("fsdp")
    for method in METHODS:
        ranks = per_rank(directory, f"checkpoints-{method}")
        for rank, result in enumerate(ranks):
            for loaded in ("unsharded", "resharded"):
                torch.testing.assert_close(result[loaded], result["trained"], rtol=1e-5, atol=1e-6,
                                           msg=f"{method} rank {rank}: {loaded} outputs")
        sharded_files, unsharded_files = ranks[0]["files"]
        assert sharded_files.keys() == unsharded_files.keys(), method
        # the method's own export is there (adapters/, fusions/, masks, side, prefix), not only trainable.safetensors
        assert len(sharded_files) > 2, f"{method}: {sorted(sharded_files)}"
        for name, content in sharded_files.items():
            if isinstance(content, str):
                assert content == unsharded_files[name], f"{method} {name}"
                continue
            assert content.keys() == unsharded_files[name].keys(), f"{method} {name}"
            for key, tensor in content.items():
                assert torch.equal(tensor, unsharded_files[name][key]), f"{method} {name} {key}"


def test_fsdp_refuses_calls_that_change_parameters(runs):
    needs_fsdp2()
    for messages in per_rank(runs("fsdp"), "refusals"):
        assert messages.pop("unchanged"), "a refused call changed the sharded model's parameters"
        for call, message in messages.items():
            assert message is not None, f"{call} ran on a sharded model"
            assert f"{call} cannot run on a sharded (FSDP2" in message and "then fully_shard" in message, message
