"""Staging: a vector step's fields go to the device in one copy of one buffer (none on the CPU), the buffers take
turns so the last step's observations stay valid, and the actions come back. The separate-buffer path is the CUDA
path without pinning (the pinned copy itself runs in tests/test_cuda.py)."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from fastdqn.staging import ALIGN, Staging, layout

CPU = torch.device("cpu")
N = 3
FIELDS = {
    "obs": ((N, 4, 5), torch.uint8),
    "next_obs": ((N, 2), torch.float32),
    "rewards": ((N,), torch.float32),
    "terminated": ((N,), torch.uint8),
    "starts": ((N,), torch.bool),
    "ids": ((N,), torch.int64),
}


def test_layout_packs_the_fields_aligned_without_overlap():
    offsets, total = layout(FIELDS)
    spans = sorted(offsets.values())
    assert all(start % ALIGN == 0 for start, _ in spans)
    assert all(a + size <= b for (a, size), (b, _) in zip(spans, spans[1:]))
    assert spans[-1][0] + spans[-1][1] <= total
    assert [size for size in (offsets[k][1] for k in FIELDS)] == [60, 24, 12, 3, 3, 24]


def fill_step(staging: Staging, k: int) -> dict[str, np.ndarray]:
    host = staging.fill()
    values = {
        "obs": np.full((N, 4, 5), k, np.uint8),
        "next_obs": np.arange(2 * N, dtype=np.float64).reshape(N, 2) + k,
        "rewards": np.array([0.5, -1.0, k]),
        "terminated": np.array([k % 2, 0, 1], bool),
        "starts": np.array([False, k % 3 == 0, True]),
        "ids": np.array([k, -k, 2**40]),
    }
    for name, value in values.items():
        host[name][...] = value
    return values


@pytest.mark.parametrize("separate", [False, True])
def test_fields_arrive_typed_in_one_copy_and_the_last_steps_stay_valid(monkeypatch, separate):
    staging = Staging(CPU, FIELDS, separate=separate)
    copies = collections.Counter()
    real_copy = torch.Tensor.copy_
    monkeypatch.setattr(
        torch.Tensor, "copy_", lambda self, *a, **k: (copies.update(["copy_"]), real_copy(self, *a, **k))[1]
    )
    sent = []
    for k in range(5):
        values = fill_step(staging, k)
        dev = staging.send()
        if sent:  # the previous step's fields are still intact while this step was filled
            assert torch.equal(sent[-1][1]["obs"], torch.from_numpy(sent[-1][0]["obs"]))
        sent.append((values, dev))
        for name, (shape, dtype) in FIELDS.items():
            assert dev[name].dtype == dtype and tuple(dev[name].shape) == shape
            assert np.array_equal(dev[name].numpy(), np.asarray(values[name]).astype(dev[name].numpy().dtype)), name
    assert copies["copy_"] == (5 if separate else 0)  # one copy per vector step, none where host is device
    storages = {dev[name].untyped_storage().data_ptr() for name in FIELDS}
    assert len(storages) == 1  # every field is a view of the one buffer that was copied
    host_storages = {buffer.untyped_storage().data_ptr() for buffer in staging.host}
    assert bool(storages & host_storages) != separate  # separate: copied out of the host buffer, not a view of it
    assert sent[-1][1]["obs"].data_ptr() != sent[-2][1]["obs"].data_ptr()  # the two buffers take turns


def test_actions_come_back_as_numpy():
    staging = Staging(CPU, {"obs": ((2, 4), torch.float32)})
    actions = staging.to_host(torch.tensor([1, 0]))
    assert isinstance(actions, np.ndarray) and actions.tolist() == [1, 0]
