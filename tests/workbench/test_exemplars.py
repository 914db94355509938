"""Dataset exemplars: top-k activating inputs, peak-centred receptive-field crops."""

from __future__ import annotations

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.exemplars import crop_at, receptive_field, shapesworld_pool, top_exemplars, unit_activation_maps

SITES = {"cnn_handle": "features.3", "gray_cnn_handle": "conv2"}


def _pool(h, n=40, seed=0):
    pre = h.preprocess
    lo, hi = pre.input_range
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, pre.channels, pre.height, pre.width, generator=g)


@pytest.mark.parametrize("name", ["cnn_handle", "gray_cnn_handle"])
def test_top_exemplars_are_the_highest_peaks(request, name):
    h = request.getfixturevalue(name)
    site = SITES[name]
    pool = _pool(h)
    ex = top_exemplars(h, site, 3, pool, k=5)
    maps = unit_activation_maps(h, site, 3, pool)
    peaks = maps.flatten(1).max(1).values
    expected = torch.argsort(peaks, descending=True)[:5]
    assert ex.indices == expected.tolist()
    assert ex.values == sorted(ex.values, reverse=True)
    torch.testing.assert_close(torch.tensor(ex.values), peaks[expected])
    s = ex.crop_size
    assert ex.crops.shape == (5, h.preprocess.channels, s, s)
    for j in range(5):
        y0, x0, y1, x1 = ex.boxes[j].tolist()
        assert 0 <= y0 < y1 <= h.preprocess.height and 0 <= x0 < x1 <= h.preprocess.width
        torch.testing.assert_close(ex.crops[j], pool[ex.indices[j], :, y0:y1, x0:x1])
        cy, cx = ex.peaks[j].tolist()
        assert y0 <= cy <= y1 and x0 <= cx <= x1  # the peak is inside its crop


def test_direction_units_and_json(cnn_handle):
    pool = _pool(cnn_handle)
    vec = torch.zeros(16)
    vec[3] = 1.0
    a = top_exemplars(cnn_handle, "features.3", vec, pool, k=4, crop_size=6)
    b = top_exemplars(cnn_handle, "features.3", 3, pool, k=4, crop_size=6)
    assert a.indices == b.indices and a.crops.shape[-1] == 6
    assert a.to_json()["unit"] == "direction" and len(b.to_json()["boxes"]) == 4


def test_receptive_field_grows_with_depth(cnn_handle):
    shallow = receptive_field(cnn_handle, "features.0")
    deep = receptive_field(cnn_handle, "features.3")
    assert shallow == 3  # one 3x3 convolution
    assert shallow < deep <= 16


def test_crop_at_stays_inside():
    imgs = torch.rand(2, 1, 10, 12)
    crops, boxes = crop_at(imgs, torch.tensor([[0.0, 0.0], [9.5, 11.5]]), 4)
    assert crops.shape == (2, 1, 4, 4)
    assert boxes.tolist() == [[0, 0, 4, 4], [6, 8, 10, 12]]


def test_bad_inputs(gray_cnn_handle):
    pool = _pool(gray_cnn_handle, n=6)
    with pytest.raises(WorkbenchError, match="k=7"):
        top_exemplars(gray_cnn_handle, "conv2", 0, pool, k=7)
    with pytest.raises(WorkbenchError, match="out of range"):
        top_exemplars(gray_cnn_handle, "conv2", 12, pool, k=2)
    with pytest.raises(WorkbenchError, match="expects values in"):
        top_exemplars(gray_cnn_handle, "conv2", 0, pool + 5, k=2)
    with pytest.raises(WorkbenchError, match="shape"):
        top_exemplars(gray_cnn_handle, "conv2", 0, pool[:, :, :10], k=2)
    with pytest.raises(WorkbenchError, match="crop_size"):
        top_exemplars(gray_cnn_handle, "conv2", 0, pool, k=2, crop_size=50)


def test_shapesnet_exemplars_from_shapesworld():
    import workbench

    h = workbench.load("zoo:shapesnet", device="cpu", progress=False)
    images, sample = shapesworld_pool(h, 64, seed=3)
    assert images.shape == (64, 3, 48, 48) and len(sample) == 64
    ex = top_exemplars(h, "layer3", 7, images, k=6)
    assert len(ex) == 6 and 8 <= ex.crop_size <= 48
