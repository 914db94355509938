"""Latent ablation as a weight edit: the folded projection equals its run-time twin, removes the latents'
directions from the site, reverts bit-exactly, and refuses what cannot be folded."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from editors import LatentAblation, get
from editors.folding import NotFoldableError
from editors.latent_edit import LatentRequest, latent_projection, projection_hook, random_latents
from workbench.dictionaries.sae import DictionaryConfig, SparseDictionary
from workbench.errors import WorkbenchError
from workbench.fingerprint import model_fingerprint
from workbench.hooks import capture


def _dictionary(handle: Any, site: str, d_in: int, *, seed: int = 0) -> SparseDictionary:
    config = DictionaryConfig(kind="topk", d_in=d_in, d_sae=48, k=4, hook_name=site,
                              metadata={"model_fingerprint": model_fingerprint(handle.model)})
    return SparseDictionary(config, seed=seed)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _check(handle: Any, site: str, d: SparseDictionary, inputs: Any, run: Any) -> None:
    before = _state(handle.model)
    delta = LatentAblation().fit(handle, LatentRequest(d, (3, 7, 11)))
    assert all(torch.equal(v, before[k]) for k, v in handle.model.state_dict().items())  # fitting changes nothing
    with projection_hook(handle, d, (3, 7, 11)), capture(handle, [site]) as hooked:
        want = run(inputs)
    with delta.applied(handle.model), capture(handle, [site]) as edited:
        got = run(inputs)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert torch.allclose(edited[site], hooked[site], atol=1e-5, rtol=1e-4)
    q = latent_projection(d, (3, 7, 11)).proj_left.float()
    act = edited[site].movedim(1, -1) if edited[site].ndim == 4 else edited[site]
    assert (act @ q).abs().max() < 1e-4 * max(1.0, float(act.abs().max()))  # nothing left along the directions
    with capture(handle, [site]) as plain:
        run(inputs)
    plain_act = plain[site].movedim(1, -1) if plain[site].ndim == 4 else plain[site]
    assert (plain_act @ q).abs().max() > 1e-3  # ... where the unedited model had something
    assert all(torch.equal(v, before[k]) for k, v in handle.model.state_dict().items())  # bit-exact revert
    assert delta.extra["rank"] == 3 and delta.request["latents"] == [3, 7, 11]


def test_a_projection_folded_into_a_transformer_projection_equals_the_hook(load_tiny) -> None:
    h = load_tiny("gpt2")
    site = "blocks.0.mlp.hook_out"
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    _check(h, site, _dictionary(h, site, 32), ids, lambda x: h.model(input_ids=x).logits)


def test_a_projection_folded_into_a_conv_equals_the_hook(cnn_handle) -> None:
    site = "features.3"  # the second Conv2d's output
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    _check(cnn_handle, site, _dictionary(cnn_handle, site, 16), x, cnn_handle.model)


def test_refusals_say_what_is_wrong(load_tiny, tiny_model_dirs) -> None:
    h = load_tiny("gpt2")
    resid = _dictionary(h, "blocks.0.hook_resid_post", 32)
    with pytest.raises(NotFoldableError, match="residual stream"):
        LatentAblation().fit(h, LatentRequest(resid, (1,)))
    d = _dictionary(h, "blocks.0.mlp.hook_out", 32)
    for latents, message in (((48,), "out of range"), ((2, 2), "repeat"), ((), "at least one")):
        with pytest.raises(WorkbenchError, match=message):
            LatentAblation().fit(h, LatentRequest(d, latents))
    other = load_tiny("llama")
    with pytest.raises(WorkbenchError, match="fingerprint"):
        LatentAblation().fit(other, LatentRequest(d, (1,)))
    assert get("sae-ablate") is LatentAblation


def test_random_latents_are_seeded_distinct_and_avoid_the_chosen() -> None:
    d = SparseDictionary(DictionaryConfig(kind="relu", d_in=8, d_sae=20), seed=0)
    a = random_latents(d, 5, exclude=[1, 2, 3], seed=4)
    assert a == random_latents(d, 5, exclude=[1, 2, 3], seed=4) and a != random_latents(d, 5, exclude=[1, 2, 3], seed=5)
    assert len(set(a)) == 5 and not set(a) & {1, 2, 3}
    with pytest.raises(WorkbenchError, match="available"):
        random_latents(d, 19, exclude=[1, 2])


def test_steering_along_a_latent_is_its_run_time_twin_and_raises_the_latent(load_tiny) -> None:
    from editors import LatentSteering
    from editors.steering import steering_hook

    h = load_tiny("gpt2")
    site = "blocks.0.mlp.hook_out"
    d = _dictionary(h, site, 32)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    before = _state(h.model)
    pre = []
    for strength in (-2.0, -1.0, 0.0, 1.0, 2.0):
        delta = LatentSteering(strength=strength).fit(h, LatentRequest(d, (7,)))
        vector = strength * d.decoder_directions()[7]
        with steering_hook(h, site, vector), capture(h, [site]) as hooked:
            want = h.model(input_ids=ids).logits
        with delta.applied(h.model), capture(h, [site]) as edited:
            got = h.model(input_ids=ids).logits
        assert torch.allclose(got, want, atol=1e-5) and torch.allclose(edited[site], hooked[site], atol=1e-5)
        with torch.no_grad():
            pre.append(float(d.pre_activations(edited[site])[..., 7].mean()))
    assert all(b > a for a, b in zip(pre, pre[1:]))  # the latent's pre-activation rises with the strength
    assert all(torch.equal(v, before[k]) for k, v in h.model.state_dict().items())
    with pytest.raises(NotFoldableError, match="no bias"):
        LatentSteering().fit(load_tiny("llama"), LatentRequest(_dictionary(load_tiny("llama"), site, 32), (1,)))
    with pytest.raises(WorkbenchError, match="finite"):
        LatentSteering(strength=float("nan"))


def test_steering_hook_adds_along_a_conv_maps_channels(cnn_handle) -> None:
    from editors.steering import steering_hook

    vector = torch.arange(16, dtype=torch.float32)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with capture(cnn_handle, ["features.3"]) as plain:
        cnn_handle.model(x)
    with steering_hook(cnn_handle, "features.3", vector), capture(cnn_handle, ["features.3"]) as steered:
        cnn_handle.model(x)
    diff = steered["features.3"] - plain["features.3"]
    assert torch.allclose(diff, vector.view(1, -1, 1, 1).expand_as(diff))


def test_mean_value_keeps_the_clean_mean_and_folds_into_the_batchnorm_after_a_bias_free_conv(resnet_handle) -> None:
    h = resnet_handle
    site = "layer2.conv1"  # a bias-free Conv2d read only by its BatchNorm
    conv = h.model.get_submodule(site)
    assert conv.bias is None
    d = _dictionary(h, site, conv.out_channels)
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(8, 3, 16, 16, generator=g)
    with capture(h, [site]) as acts:
        h.model(clean)
    mean = acts[site].double().mean(dim=(0, 2, 3))
    latents = (3, 7)
    before = _state(h.model)
    delta = LatentAblation(value="mean").fit(h, LatentRequest(d, latents, mean=mean))
    assert sorted(delta.names) == sorted([f"{site}.weight", "layer2.bn1.bias"])  # the constant went into beta
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with projection_hook(h, d, latents, mean), torch.no_grad():
        want = h.model(x)
    with delta.applied(h.model), torch.no_grad():
        got = h.model(x)
    assert LatentAblation().fit(h, LatentRequest(d, latents)).names == [f"{site}.weight"]  # zero: no constant
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    with projection_hook(h, d, latents, mean), capture(h, [site]) as kept:
        h.model(clean)
    q = latent_projection(d, latents).proj_left
    along = kept[site].double().movedim(1, -1) @ q
    torch.testing.assert_close(along.mean(dim=(0, 1, 2)), mean @ q)  # the clean mean along the directions stays
    assert along.std(dim=(0, 1, 2)).max() < 1e-5  # ... and nothing else along them
    assert all(torch.equal(v, before[k]) for k, v in h.model.state_dict().items())
    with pytest.raises(WorkbenchError, match="clean mean"):
        LatentAblation(value="mean").fit(h, LatentRequest(d, latents))
    with pytest.raises(WorkbenchError, match="values expected"):
        LatentAblation(value="mean").fit(h, LatentRequest(d, latents, mean=mean[:-1]))
