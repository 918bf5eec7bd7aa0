"""A mixed-task forward and backward reads nothing back from the device (issue 15, GPU readiness),
checked on CPU with tests/host_sync.py's guard (reads by pefops' code only): after set_row_tasks and one forward (which may plan the
routing), later forwards and backwards of a batch mixing every method call no host-reading Tensor
method from pefops' code. On a GPU each such read would stall the host on the device once per layer."""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import pefops.hf as hf  # noqa: E402
from tests.host_sync import no_host_sync  # noqa: E402
from tests.hf import test_tasks, test_tasks_prefix, test_tasks_prompt  # noqa: E402
from tests.hf.test_tasks import ATTENTION, TOKENS, read_out  # noqa: E402

pytestmark = pytest.mark.hf
checkpoints = test_tasks.checkpoints
prefix_checkpoints = test_tasks_prefix.prefix_checkpoints
prompt_checkpoints = test_tasks_prompt.prompt_checkpoints


# the one read the design allows: a padded causal prefill's 4-D mask is turned into key padding + causal
# on the host once per mask object (transformers makes one per forward; every layer shares it)
MASK_READ = ("pefops/hf/lsh_attention.py", "_read_mask")


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_mixed_forward_and_backward_read_nothing_back(prompt_checkpoints, model_type, monkeypatch):
    import pefops.hf.lsh_attention as lsh

    reads = []
    read_mask = lsh._read_mask
    monkeypatch.setattr(lsh, "_read_mask", lambda *args: reads.append(1) or read_mask(*args))
    model = test_tasks_prompt.mixed_model(model_type, prompt_checkpoints[model_type])
    test_tasks_prefix.train_only(model, ["houlsby", "prefix", "prompt"])
    hf.set_row_tasks(model, test_tasks_prompt.NAMES, torch.tensor([0, 1, 2, 4, 5]))

    def step():
        hidden = model(input_ids=TOKENS, attention_mask=ATTENTION).last_hidden_state
        width = hidden.shape[1] - TOKENS.shape[1]
        read_out(hidden[:, width:], ATTENTION).backward()

    step()
    reads.clear()
    with no_host_sync(pefops_only=True, allow=(MASK_READ,)):  # transformers' mask building reads values itself
        step()
        step()
    assert len(reads) <= 2  # at most once per forward, never once per layer
