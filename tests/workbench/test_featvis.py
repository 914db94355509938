"""Feature visualization engine: objectives, parameterizations, transforms, the optimizer loop."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from workbench.errors import UnknownSiteError, WorkbenchError
from workbench.featvis import (
    Fourier,
    Objective,
    ObjectiveContext,
    Pixels,
    SceneParam,
    activation_sites,
    channel,
    class_log_prob,
    class_logit,
    direction,
    diversity,
    l1,
    l2,
    neuron,
    total_variation,
    visualize,
)
from workbench.featvis import transforms as T
from workbench.featvis.param import INIT_NOISE, Patch, with_init_noise
from workbench.featvis.render import DEAD_START_STEPS
from workbench.handle import Architecture, ImagePreprocess, ModelHandle
from workbench.hooks import run_with_cache

SITES = {"cnn_handle": "features.3", "gray_cnn_handle": "conv2"}


def _handle(request: pytest.FixtureRequest, name: str) -> ModelHandle:
    return request.getfixturevalue(name)


@pytest.fixture(scope="module")
def shapesnet() -> ModelHandle:
    import workbench

    return workbench.load("zoo:shapesnet", device="cpu", progress=False)


def _no_hooks(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# --- the engine on small models of different sizes, channels and ranges -----------------------

@pytest.mark.parametrize("name", ["cnn_handle", "gray_cnn_handle"])
@pytest.mark.parametrize("param", [Fourier(), Pixels(), Pixels(decorrelate=True)])
def test_channel_objective_rises_and_images_stay_in_range(request, name, param):
    h = _handle(request, name)
    pre = h.preprocess
    obj = channel(SITES[name], 2)
    start = visualize(h, obj, param=param, steps=1, lr=1e-9, progress=False, seed=3)
    fv = visualize(h, obj, param=param, steps=60, progress=False, seed=3)
    assert fv.status == "completed" and fv.steps == 60
    assert fv.images.shape == (1, pre.channels, pre.height, pre.width)  # the model's own size, no resize
    lo, hi = pre.input_range
    assert float(fv.images.min()) >= lo and float(fv.images.max()) <= hi
    assert torch.isfinite(fv.images).all()
    assert fv.activation[0] > start.activation[0] + 1e-3
    assert fv.loss_trace[-1] < fv.loss_trace[0]
    pre.check(fv.images)


def test_same_seed_same_images_and_other_seed_differs(cnn_handle):
    obj = channel("features.3", 1) - 0.01 * total_variation()
    a = visualize(cnn_handle, obj, steps=20, progress=False, seed=5)
    b = visualize(cnn_handle, obj, steps=20, progress=False, seed=5)
    c = visualize(cnn_handle, obj, steps=20, progress=False, seed=6)
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)


def test_class_logit_and_neuron_objectives(gray_cnn_handle):
    for obj in (class_logit(2), class_log_prob(2), neuron("conv2", 4), neuron("conv2", 4, x=1, y=2),
                direction("conv2", torch.ones(12))):
        start = visualize(gray_cnn_handle, obj, steps=1, lr=1e-9, progress=False)
        fv = visualize(gray_cnn_handle, obj, steps=40, lr=0.1, progress=False)
        assert fv.activation[0] > start.activation[0], obj


def test_hooks_removed_and_flags_restored(cnn_handle):
    model = cnn_handle.model
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    visualize(cnn_handle, channel("features.3", 0), steps=3, progress=False)
    assert _no_hooks(model)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.training

    def boom(step, images, loss):
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        visualize(cnn_handle, channel("features.3", 0), steps=3, progress=False, callback=boom)
    assert _no_hooks(model)
    assert [p.requires_grad for p in model.parameters()] == flags


# --- composition algebra ----------------------------------------------------------------------

def _ctx(gray_cnn_handle):
    x = torch.rand(3, 1, 20, 28) * 2 - 1
    logits, acts = run_with_cache(gray_cnn_handle, x, ["conv1", "conv2"], detach=False, clone=False)
    return ObjectiveContext(acts=acts, logits=logits, images=x, unit_images=(x + 1) / 2)


def test_objective_algebra(gray_cnn_handle):
    ctx = _ctx(gray_cnn_handle)
    a, b = channel("conv1", 2), class_logit(1)
    va, vb = a(ctx), b(ctx)
    assert va.shape == (3,)
    torch.testing.assert_close((a + b)(ctx), va + vb)
    torch.testing.assert_close((a - b)(ctx), va - vb)
    torch.testing.assert_close((2 * a)(ctx), 2 * va)
    torch.testing.assert_close((a * 0.5)(ctx), 0.5 * va)
    torch.testing.assert_close((a / 4)(ctx), va / 4)
    torch.testing.assert_close((-a)(ctx), -va)
    torch.testing.assert_close(sum([a, b, a])(ctx), 2 * va + vb)
    torch.testing.assert_close((a - a)(ctx), torch.zeros(3))
    combo = a + 3 * b - 0.1 * total_variation() + diversity("conv2")
    assert combo.sites == {"conv1", "conv2"} and combo.needs_logits and combo.min_batch == 2
    assert not a.needs_logits and b.needs_logits
    with pytest.raises(TypeError):
        a + 1.5  # noqa: B018
    with pytest.raises(TypeError):
        a * a  # noqa: B018


def test_penalties_and_batch_restriction(gray_cnn_handle):
    ctx = _ctx(gray_cnn_handle)
    assert (total_variation()(ctx) > 0).all()
    assert (l1()(ctx) >= 0).all() and (l2()(ctx) >= l1()(ctx) - 1e-6).all()  # RMS >= mean |x|
    flat = ObjectiveContext(acts=ctx.acts, logits=ctx.logits, images=ctx.images, unit_images=torch.full((3, 1, 20, 28), 0.5))
    assert float(total_variation()(flat).abs().max()) == 0.0 and float(l1()(flat).abs().max()) == 0.0
    only1 = channel("conv1", 0, batch=1)(ctx)
    assert only1[0] == 0 and only1[2] == 0 and only1[1] == channel("conv1", 0)(ctx)[1]


def test_diversity_spreads_a_batch(cnn_handle):
    obj = channel("features.3", 3)
    with pytest.raises(WorkbenchError, match="batch >= 2"):
        visualize(cnn_handle, obj + diversity("features.3"), batch=1, steps=2, progress=False)
    plain = visualize(cnn_handle, obj, batch=3, steps=40, progress=False)
    diverse = visualize(cnn_handle, obj + 5.0 * diversity("features.3"), batch=3, steps=40, progress=False)

    def spread(imgs):
        f = imgs.flatten(1)
        return float(torch.cdist(f, f).sum())

    assert spread(diverse.images) > spread(plain.images)


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cnn_handle", "gray_cnn_handle"])
def test_unit_out_of_range(request, name):
    h = _handle(request, name)
    with pytest.raises(WorkbenchError, match=r"out of range.*valid: 0\.\."):
        visualize(h, channel(SITES[name], 999), steps=2, progress=False)
    with pytest.raises(WorkbenchError, match="class 7 is out of range"):
        visualize(h, class_logit(7), steps=2, progress=False)
    with pytest.raises(WorkbenchError, match="outside"):
        visualize(h, neuron(SITES[name], 0, x=500, y=0), steps=2, progress=False)
    with pytest.raises(WorkbenchError, match="entries"):
        visualize(h, direction(SITES[name], torch.ones(3)), steps=2, progress=False)


def test_bad_sites_list_valid_ones(gray_cnn_handle):
    with pytest.raises(UnknownSiteError, match=r"conv2 \[1, 12, 10, 14\]"):
        visualize(gray_cnn_handle, channel("conv9", 0), steps=2, progress=False)
    names = [s["name"] for s in activation_sites(gray_cnn_handle)]
    assert names == ["conv1", "relu1", "conv2", "relu2", "pool", "fc"]


def test_not_an_image_model():
    h = ModelHandle(spec="test:lm", model=torch.nn.Linear(4, 4), kind="causal_lm", arch=Architecture("gpt2", 1))
    with pytest.raises(WorkbenchError, match="needs an image model"):
        visualize(h, class_logit(0), steps=2, progress=False)


def test_bad_init_and_settings(gray_cnn_handle):
    obj = channel("conv2", 0)
    with pytest.raises(WorkbenchError, match="expects values in"):
        visualize(gray_cnn_handle, obj, init=torch.full((1, 1, 20, 28), 3.0), steps=2, progress=False)
    with pytest.raises(WorkbenchError, match="shape"):
        visualize(gray_cnn_handle, obj, init=torch.zeros(1, 3, 20, 28), steps=2, progress=False)
    with pytest.raises(WorkbenchError, match="steps"):
        visualize(gray_cnn_handle, obj, steps=0, progress=False)
    with pytest.raises(WorkbenchError, match="lr"):
        visualize(gray_cnn_handle, obj, lr=float("nan"), steps=2, progress=False)
    with pytest.raises(WorkbenchError, match="snapshot"):
        visualize(gray_cnn_handle, obj, steps=5, snapshots=(9,), progress=False)
    with pytest.raises(WorkbenchError, match="RGB"):
        visualize(gray_cnn_handle, obj, param=SceneParam(), steps=2, progress=False)


@pytest.mark.parametrize("param", [Pixels(), Fourier(), Pixels(decorrelate=True)])
def test_init_reproduces_the_start_image(gray_cnn_handle, param):
    init = torch.rand(1, 1, 20, 28) * 1.6 - 0.8  # inside [-1, 1]
    fv = visualize(gray_cnn_handle, channel("conv2", 0), init=init, param=param, steps=1, lr=1e-9,
                   snapshots=(0,), progress=False)
    torch.testing.assert_close(fv.snapshots[0], init, atol=2e-3, rtol=0)


# --- interrupt, divergence, snapshots, saving ---------------------------------------------------

def test_ctrl_c_keeps_the_current_image(cnn_handle):
    def interrupt(step, images, loss):
        if step == 7:
            raise KeyboardInterrupt

    fv = visualize(cnn_handle, channel("features.3", 2), steps=50, callback=interrupt, progress=False)
    assert fv.status == "interrupted" and fv.interrupted and fv.steps == 7
    assert len(fv.loss_trace) == 7
    assert torch.isfinite(fv.images).all() and float(fv.images.std()) > 1e-3
    assert "interrupted" in fv.message
    assert _no_hooks(cnn_handle.model)


def test_nan_is_detected_and_the_last_good_image_kept(cnn_handle):
    calls = {"n": 0}
    base = channel("features.3", 2)

    def fn(ctx):
        calls["n"] += 1
        v = base(ctx)
        return v * float("nan") if calls["n"] > 5 else v

    obj = Objective(fn, name="nan-after-5", sites=base.sites, checks=base.checks)
    fv = visualize(cnn_handle, obj, steps=30, progress=False)
    assert fv.status == "diverged" and fv.diverged
    assert "nan" in fv.message.lower()
    assert torch.isfinite(fv.images).all() and float(fv.images.std()) > 0
    assert all(math.isfinite(v) for v in fv.loss_trace) and len(fv.loss_trace) == 5


def test_snapshots_and_saving(tmp_path: Path, gray_cnn_handle):
    fv = visualize(gray_cnn_handle, channel("conv2", 1), steps=12, snapshots=(0, 4, 12), progress=False)
    assert sorted(fv.snapshots) == [0, 4, 12]
    start = fv.snapshots[0]  # grey plus the start noise (input range [-1, 1])
    assert abs(float(start.mean())) < 0.05 and 0.02 < float(start.std()) < 0.3
    torch.testing.assert_close(fv.snapshots[12], fv.images)
    out = fv.save(tmp_path / "fv")
    for name in ("grid.png", "snapshots.png", "images.safetensors", "featvis.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- transforms and parameterizations --------------------------------------------------------

def test_fused_transforms_equal_the_separate_chain():
    x = torch.rand(2, 3, 30, 26)
    sep = T.compose(T.pad(3), T.jitter(2), T.affine(T.LUCID_SCALES, T.LUCID_ANGLES), T.jitter(2), T.fit(30, 26))
    fused = T.robust(3, 2, T.LUCID_SCALES, T.LUCID_ANGLES, 2, 30, 26)
    for seed in range(4):
        a = sep(x, torch.Generator().manual_seed(seed))
        b = fused(x, torch.Generator().manual_seed(seed))
        assert a.shape == b.shape == x.shape
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_transform_shapes_and_determinism():
    x = torch.rand(1, 1, 20, 28)
    g = torch.Generator
    assert T.pad(2)(x, g().manual_seed(0)).shape[-2:] == (24, 32)
    assert T.jitter(3)(x, g().manual_seed(0)).shape[-2:] == (17, 25)
    assert T.default_transforms(20, 28)(x, g().manual_seed(0)).shape == x.shape
    assert T.translate(4, 4)(x, g().manual_seed(0)).shape == x.shape
    assert T.lucid_transforms()(torch.rand(1, 3, 64, 64), g().manual_seed(0)).shape[-1] != 64
    t = T.default_transforms(20, 28)
    torch.testing.assert_close(t(x, g().manual_seed(1)), t(x, g().manual_seed(1)))
    with pytest.raises(WorkbenchError):
        T.jitter(40)(x, g().manual_seed(0))


def test_patch_param_only_changes_the_patch(cnn_handle):
    param = Patch(Fourier(), 6, 6)
    fv = visualize(cnn_handle, channel("features.3", 1), param=param, steps=15, progress=False)
    img = fv.images[0]
    outside = img.clone()
    outside[:, 5:11, 5:11] = 0.5
    assert torch.allclose(outside, torch.full_like(outside, 0.5))
    assert param.patch_of(fv.images).shape == (1, 3, 6, 6)


# --- ShapesNet ---------------------------------------------------------------------------

def test_shapesnet_channel_and_early_stop(shapesnet):
    seen = {}
    base = channel("layer2", 3)

    def fn(ctx):
        seen["logits"] = ctx.logits
        return base(ctx)

    obj = Objective(fn, name="spy", sites=base.sites, checks=base.checks)
    fv = visualize(shapesnet, obj, steps=25, progress=False)
    assert seen["logits"] is None  # the forward pass stopped at layer2
    assert fv.status == "completed" and fv.images.shape == (1, 3, 48, 48)
    assert fv.loss_trace[-1] < fv.loss_trace[0]


def test_shapesnet_scene_parameterization_is_interpretable(shapesnet):
    from workbench.worlds.scene import PALETTE, SHAPES, TEXTURES

    obj = class_logit(3)
    start = visualize(shapesnet, obj, param=SceneParam(), steps=1, lr=1e-9, batch=2, progress=False)
    fv = visualize(shapesnet, obj, param=SceneParam(shapes=("crescent", "heart", "tee")), steps=40, lr=0.1,
                   batch=2, progress=False)
    assert sum(fv.activation) > sum(start.activation)
    assert fv.scene is not None and len(fv.scene) == 2
    for d in fv.scene:
        assert d["objects"][0]["shape"] in ("crescent", "heart", "tee")
        assert d["objects"][0]["color"] in PALETTE and d["background"]["texture"] in TEXTURES
    assert fv.snapped_images is not None and fv.snapped_images.shape == fv.images.shape
    assert all(s in SHAPES for d in fv.scene for s in d["objects"][0]["shape_weights"])


# --- units that are dead on grey ---------------------------------------------------------

class EdgeNet(torch.nn.Module):
    """1x12x12 images in [0, 1]. Channel 0 of `conv` is a Laplacian with bias -1: exactly zero
    on any constant image (and on grey plus lucid's 0.01 start noise), firing on texture.
    Channel 1 has zero weights and bias -1: it never fires."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3)
        self.relu = torch.nn.ReLU()
        self.fc = torch.nn.Linear(2, 2)
        with torch.no_grad():
            kernel = -torch.ones(3, 3)
            kernel[1, 1] = 8.0
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = kernel
            self.conv.bias.copy_(torch.tensor([-1.0, -1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).mean((2, 3)))


@pytest.fixture
def edge_handle() -> ModelHandle:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = EdgeNet().eval()
    pre = ImagePreprocess(height=12, width=12, channels=1, mean=(0.0,), std=(1.0,), class_names=("a", "b"))
    return ModelHandle(spec="test:edge-net", model=model, kind="image_classifier",
                       arch=Architecture(family="cnn", n_layers=1), preprocess=pre)


def _blank(fv) -> bool:
    return fv.activation[0] <= 0 or float(fv.unit_images.std()) < 1e-2


def test_unit_dead_on_grey_gets_a_visualization_by_default(edge_handle):
    grey = torch.full((1, 1, 12, 12), 0.5)
    _, acts = run_with_cache(edge_handle, grey, ["relu"])
    assert float(acts["relu"][0, 0].abs().max()) == 0.0  # dead on grey
    fv = visualize(edge_handle, channel("relu", 0), steps=40, progress=False)
    assert fv.status == "completed" and not _blank(fv)
    assert fv.init_noise == INIT_NOISE and fv.to_json()["restarts"] == fv.restarts
    # lucid's start (0.01 noise on grey) with grey padding gives no gradient at all
    lucid_start = visualize(edge_handle, channel("relu", 0), param=Fourier(sd=0.01), steps=40, progress=False,
                            transforms=T.robust(1, 1, T.LUCID_SCALES, T.LUCID_ANGLES, 1, 12, 12), restarts=0)
    assert lucid_start.status == "failed" and _blank(lucid_start)


def test_dead_start_restarts_from_more_noise_and_is_seeded(edge_handle):
    kw = dict(param=Fourier(sd=0.01), transforms=T.identity(), steps=30, progress=False)
    a = visualize(edge_handle, channel("relu", 0), seed=4, **kw)
    assert a.status == "completed" and a.restarts >= 1 and not _blank(a)
    assert a.init_noise is not None and a.init_noise > INIT_NOISE
    assert len(a.loss_trace) == 30 and a.steps == 30  # the kept run has the full budget
    assert any("restarted" in w for w in a.warnings)
    b = visualize(edge_handle, channel("relu", 0), seed=4, **kw)
    assert torch.equal(a.images, b.images) and a.restarts == b.restarts
    c = visualize(edge_handle, channel("relu", 0), seed=5, **kw)
    assert not torch.equal(a.images, c.images)


def test_dead_start_from_init_images_restarts_with_noise_on_them(edge_handle):
    grey = torch.full((1, 1, 12, 12), 0.5)
    fv = visualize(edge_handle, channel("relu", 0), init=grey, transforms=T.identity(), steps=20, progress=False)
    assert fv.status == "completed" and fv.restarts >= 1 and not _blank(fv)


def test_unit_that_never_fires_fails_instead_of_completing(edge_handle):
    fv = visualize(edge_handle, channel("relu", 1), steps=40, restarts=2, progress=False)
    assert fv.status == "failed" and fv.failed and fv.status != "completed"
    assert fv.restarts == 2 and fv.steps < 40
    assert "no start gave" in fv.message and "\n" not in fv.message
    assert fv.to_json()["status"] == "failed"
    with pytest.raises(WorkbenchError, match="restarts"):
        visualize(edge_handle, channel("relu", 1), steps=2, restarts=-1, progress=False)


def test_dead_item_in_a_batch_restarts_the_batch(edge_handle):
    fv = visualize(edge_handle, channel("relu", 0), param=Fourier(sd=0.01), transforms=T.identity(), batch=3,
                   steps=DEAD_START_STEPS + 4, progress=False, seed=1)
    assert fv.status == "completed" and fv.restarts >= 1
    assert all(a > 0 for a in fv.activation)


@pytest.mark.parametrize("param", [Fourier(), Pixels(), Patch(Pixels(), 6, 6)])
def test_init_noise_reaches_the_parameterization(edge_handle, param):
    small = visualize(edge_handle, channel("relu", 0), param=param, init_noise=0.05, steps=1, lr=1e-9,
                      snapshots=(0,), restarts=0, progress=False)
    large = visualize(edge_handle, channel("relu", 0), param=param, init_noise=1.0, steps=1, lr=1e-9,
                      snapshots=(0,), restarts=0, progress=False)
    assert small.init_noise == 0.05 and large.init_noise == 1.0
    assert float(large.snapshots[0].std()) > 5 * float(small.snapshots[0].std())
    assert with_init_noise(param, 0.7) != param


def test_bad_init_noise(edge_handle):
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(WorkbenchError, match="init noise"):
            visualize(edge_handle, channel("relu", 0), init_noise=bad, steps=2, progress=False)
    with pytest.raises(WorkbenchError, match="no start noise"):
        with_init_noise(SceneParam(), 0.5)


def test_noise_padding():
    g = torch.Generator
    grey = torch.full((2, 3, 20, 20), 0.5)
    padded = T.pad(3, mode="noise")(grey, g().manual_seed(0))
    assert padded.shape == (2, 3, 26, 26)
    assert torch.equal(padded[..., 3:23, 3:23], grey)
    border = padded[..., :3, :]
    assert float(border.min()) >= 0 and float(border.max()) <= 1 and float(border.std()) > 0.1
    fused = T.robust(3, 2, T.LUCID_SCALES, T.LUCID_ANGLES, 2, 20, 20, value="noise")
    a, b = fused(grey, g().manual_seed(1)), fused(grey, g().manual_seed(1))
    torch.testing.assert_close(a, b)
    const = T.robust(3, 2, T.LUCID_SCALES, T.LUCID_ANGLES, 2, 20, 20)(grey, g().manual_seed(1))
    assert float(const.std()) < 1e-6  # grey padding of a grey image: flat
    assert float(a.std()) > 0.01 and torch.allclose(a[..., 8:12, 8:12], grey[..., 8:12, 8:12])
    assert float(T.default_transforms(20, 20)(grey, g().manual_seed(0)).std()) > 0.01
    with pytest.raises(WorkbenchError, match="pad mode"):
        T.pad(2, mode="wrap")
    with pytest.raises(WorkbenchError, match="noise"):
        T.robust(3, 2, T.LUCID_SCALES, T.LUCID_ANGLES, 2, 20, 20, value="black")  # type: ignore[arg-type]


def test_shapesnet_units_dead_on_grey_get_visualizations(shapesnet):
    grey = torch.full((1, 3, 48, 48), 0.5)
    _, acts = run_with_cache(shapesnet, grey, ["layer2"])
    dead = (acts["layer2"][0].flatten(1).amax(1) == 0).nonzero().flatten().tolist()
    assert dead, "no layer2 channel of this ShapesNet is dead on grey"
    for c in dead[:2]:
        fv = visualize(shapesnet, channel("layer2", c), steps=48, progress=False)
        assert fv.status == "completed" and not _blank(fv), (c, fv.message)
