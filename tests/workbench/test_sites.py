"""Site maps: canonical names resolve to real modules with the right meaning, on every family."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import D_MODEL, FAMILIES, build_tiny
from workbench.errors import UnknownSiteError, WorkbenchError
from workbench.hooks import capture, describe_site
from workbench.models import dummy_input, run_model
from workbench.sites import SITE_MAPS, Site, as_out_in, list_sites, resolve_site, site_map_for

EXPECTED_TEMPLATES = {
    "hook_embed", "blocks.{L}.hook_resid_pre", "blocks.{L}.hook_resid_post", "blocks.{L}.attn.hook_out",
    "blocks.{L}.mlp.hook_pre", "blocks.{L}.mlp.hook_post", "blocks.{L}.mlp.hook_out",
}


def _canonical(handle) -> list[Site]:
    return [s for s in list_sites(handle) if s.canonical]


def test_every_canonical_site_resolves_to_an_existing_module(tiny_lm) -> None:
    model = tiny_lm.model
    sites = _canonical(tiny_lm)
    modules = dict(model.named_modules())
    for site in sites:
        assert site.module_path in modules, site
        assert resolve_site(tiny_lm, site.name) == site
    names = {s.name for s in sites}
    for layer in range(tiny_lm.arch.n_layers):
        for template in EXPECTED_TEMPLATES:
            assert template.format(L=layer) in names
    # every template of the family's map (minus conditional ones) is present at every layer
    active = SITE_MAPS[tiny_lm.arch.family].active_sites(model)
    expected = sum(tiny_lm.arch.n_layers if "{L}" in t else 1 for t in active)
    assert len(sites) == expected


def test_resid_pre_matches_hf_hidden_states(tiny_lm) -> None:
    """blocks.L.hook_resid_pre is exactly what transformers reports as hidden_states[L]."""
    inputs = dummy_input(tiny_lm, batch_size=2)
    names = [f"blocks.{L}.hook_resid_pre" for L in range(tiny_lm.arch.n_layers)]
    with torch.no_grad(), capture(tiny_lm, names) as acts:
        out = run_model(tiny_lm.model, {**inputs, "output_hidden_states": True})
    for layer, name in enumerate(names):
        assert torch.equal(acts[name], out.hidden_states[layer])


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_pre_ln_residual_decomposes_into_attn_and_mlp(load_tiny, family: str) -> None:
    """resid_post = resid_pre + attn.hook_out + mlp.hook_out, and resid_mid sits between."""
    h = load_tiny(family)
    L = 1
    names = [f"blocks.{L}.hook_resid_pre", f"blocks.{L}.attn.hook_out", f"blocks.{L}.mlp.hook_out",
             f"blocks.{L}.hook_resid_post"]
    has_mid = f"blocks.{L}.hook_resid_mid" in {s.name for s in list_sites(h)}
    names += [f"blocks.{L}.hook_resid_mid"] if has_mid else []
    with torch.no_grad(), capture(h, names) as a:
        run_model(h.model, dummy_input(h))
    pre, attn, mlp, post = (a[n] for n in names[:4])
    torch.testing.assert_close(pre + attn + mlp, post, atol=1e-5, rtol=1e-5)
    if has_mid:
        torch.testing.assert_close(pre + attn, a[names[4]], atol=1e-5, rtol=1e-5)
    assert has_mid == (family != "gpt_neox")  # NeoX defaults to a parallel residual


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "bert"])
def test_mlp_post_is_nonlinearity_of_mlp_pre(load_tiny, family: str) -> None:
    h = load_tiny(family)
    pre_site = resolve_site(h, "blocks.0.mlp.hook_pre")
    act_fn = h.model.get_submodule(pre_site.module_path)
    with torch.no_grad(), capture(h, ["blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_post"]) as a:
        run_model(h.model, dummy_input(h))
    torch.testing.assert_close(act_fn(a["blocks.0.mlp.hook_pre"]), a["blocks.0.mlp.hook_post"])
    assert a["blocks.0.mlp.hook_post"].shape[-1] == h.arch.d_mlp


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_roles_have_declared_layout(load_tiny, family: str) -> None:
    """mlp_in maps d_model -> d_mlp and mlp_out d_mlp -> d_model once viewed as (out, in)."""
    h = load_tiny(family)
    sm = h.arch.site_map
    d, m = h.arch.d_model, h.arch.d_mlp
    for layer in range(h.arch.n_layers):
        w_in, lay_in = sm.weight(h.model, "mlp_in", layer)
        w_out, lay_out = sm.weight(h.model, "mlp_out", layer)
        assert as_out_in(w_in, lay_in).shape == (m, d)
        assert as_out_in(w_out, lay_out).shape == (d, m)
        w_attn, lay_attn = sm.weight(h.model, "attn_out", layer)
        assert as_out_in(w_attn, lay_attn).shape == (d, d)
    emb, _ = sm.weight(h.model, "embedding")
    unemb, _ = sm.weight(h.model, "unembedding")
    assert emb.shape == unemb.shape == (h.arch.vocab_size, d)
    assert h.model.get_submodule(sm.module_path(h.model, sm.layers, None)) is not None
    with pytest.raises(WorkbenchError, match="0..1"):
        sm.weight_name(h.model, "mlp_out", 7)
    with pytest.raises(WorkbenchError, match="roles"):
        sm.weight_name(h.model, "nope", 0)


def test_base_model_without_head_strips_prefix() -> None:
    """A bare GPT2Model (no `transformer.` prefix) gets the same canonical sites."""
    lm, _ = build_tiny("gpt2")
    base = lm.transformer
    lm_names = [s.name for s in list_sites(lm) if s.canonical]
    base_sites = [s for s in list_sites(base) if s.canonical]
    assert [s.name for s in base_sites] == lm_names
    assert resolve_site(base, "blocks.1.mlp.hook_post").module_path == "h.1.mlp.c_proj"
    assert SITE_MAPS["gpt2"].weight_name(base, "mlp_out", 1) == "h.1.mlp.c_proj.weight"
    with pytest.raises(WorkbenchError, match="outside the base model"):
        SITE_MAPS["gpt2"].weight_name(base, "unembedding")


def test_neox_serial_residual_has_resid_mid() -> None:
    import transformers as tf

    cfg = tf.GPTNeoXConfig(num_hidden_layers=1, hidden_size=D_MODEL, num_attention_heads=4, intermediate_size=64,
                           vocab_size=50, use_parallel_residual=False)
    model = tf.GPTNeoXForCausalLM(cfg).eval()
    assert resolve_site(model, "blocks.0.hook_resid_mid").module_path == "gpt_neox.layers.0.post_attention_layernorm"


@pytest.mark.parametrize("alias", ["mistral", "qwen2"])
def test_llama_layout_aliases(alias: str) -> None:
    import transformers as tf

    cfg = tf.AutoConfig.for_model(alias, num_hidden_layers=1, hidden_size=D_MODEL, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64, vocab_size=50)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    assert site_map_for(model).family == alias
    sites = {s.name: s for s in list_sites(model) if s.canonical}
    assert sites["blocks.0.mlp.hook_post"].module_path == "model.layers.0.mlp.down_proj"
    assert len(sites) == 1 + 7 + 1  # embed, 7 per block, final norm


def test_module_names_and_input_side(tiny_lm) -> None:
    modules = [n for n, _ in tiny_lm.model.named_modules() if n]
    sites = list_sites(tiny_lm)
    assert [s.module_path for s in sites if not s.canonical] == modules
    name = modules[-1]
    assert resolve_site(tiny_lm, name) == Site(name, name, "output", None, False)
    assert resolve_site(tiny_lm, name + ":input").side == "input"
    layered = next(s for s in sites if not s.canonical and s.layer == 1)
    assert ".1." in layered.module_path + "."


@pytest.mark.parametrize("bad, hint", [
    ("blocks.7.hook_resid_post", "L = 0..1"),
    ("blocks.0.hook_resid_pots", "Did you mean: blocks.0.hook_resid_post"),
    ("not_a_site", "named_modules()"),
    ("blocks.0.hook_resid_post:sideways", "blocks.{L}.hook_resid_post"),
])
def test_unknown_site_lists_valid_names(tiny_lm, bad: str, hint: str) -> None:
    with pytest.raises(UnknownSiteError) as err:
        resolve_site(tiny_lm, bad)
    msg = str(err.value)
    assert hint in msg
    assert "blocks.{L}.mlp.hook_post" in msg and "append ':input'" in msg


def test_unknown_site_message_stays_short_for_big_models() -> None:
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(3000)])
    assert resolve_site(model, "7").module_path == "7"
    with pytest.raises(UnknownSiteError) as err:
        resolve_site(model, "3000")
    msg = str(err.value)
    assert "more)" in msg and len(msg) < 1500


def test_cnn_module_sites(small_cnn, cnn_handle) -> None:
    sites = list_sites(small_cnn)
    assert all(not s.canonical for s in sites)
    assert {s.name for s in sites} >= {"features", "features.3", "pool", "head"}
    assert describe_site(cnn_handle, "features.3")["shape"] == [1, 16, 8, 8]
    assert describe_site(cnn_handle, "head:input")["shape"] == [1, 16]
    with pytest.raises(UnknownSiteError) as err:
        resolve_site(cnn_handle, "blocks.0.hook_resid_post")
    msg = str(err.value)
    assert "Supported families: bert, gpt2, gpt_neox" in msg and "SITE_MAPS" in msg and "features.3" in msg


def test_describe_site_reports_shape(tiny_lm) -> None:
    info = describe_site(tiny_lm, "blocks.1.mlp.hook_post")
    seq = dummy_input(tiny_lm)["input_ids"].shape[1]
    assert info["shape"] == [1, seq, tiny_lm.arch.d_mlp]
    assert info["side"] == "input" and info["layer"] == 1 and info["canonical"]
    assert describe_site(tiny_lm, "blocks.0.hook_resid_post")["shape"] == [1, seq, D_MODEL]
    with pytest.raises(UnknownSiteError):
        describe_site(tiny_lm, "blocks.9.hook_resid_post")
