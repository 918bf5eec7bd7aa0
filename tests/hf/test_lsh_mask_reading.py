"""pefops_lsh reads transformers' 4-D mask once per mask object (host reads), not once per layer;
a new mask or an in-place change to it is read again."""

import pytest
import torch

from pefops.hf.lsh_attention import key_padding_from_mask
from tests.host_sync import HostSync, no_host_sync

pytestmark = pytest.mark.hf


def _padding_mask(batch=2, length=8, padded=3):
    keep = torch.ones(batch, length, dtype=torch.bool)
    keep[1, length - padded:] = False
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return (keep[:, None, None, :] & causal).expand(batch, 1, length, length).clone()


def test_second_layer_reads_nothing():
    mask = _padding_mask()
    first = key_padding_from_mask(mask, 2, 8, 8, True)
    with no_host_sync():  # every later layer of the same forward: no host read
        for _ in range(3):
            again = key_padding_from_mask(mask, 2, 8, 8, True)
    assert again[1] is True and torch.equal(again[0], first[0])
    with no_host_sync(), pytest.raises(HostSync):  # a new mask object is read (and validated)
        key_padding_from_mask(_padding_mask(), 2, 8, 8, True)


def test_in_place_change_is_read_again():
    mask = _padding_mask(padded=3)
    keep, _ = key_padding_from_mask(mask, 2, 8, 8, True)
    assert int((~keep).sum()) == 3
    mask[1, :, :, 4] = False  # one more padded key, same object: its _version moved
    keep, _ = key_padding_from_mask(mask, 2, 8, 8, True)
    assert int((~keep).sum()) == 4
    mask.fill_(True)  # nothing padded, no causal structure
    assert key_padding_from_mask(mask, 2, 8, 8, True) == (None, False)
