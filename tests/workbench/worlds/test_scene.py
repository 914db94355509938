"""ShapesWorld scenes: vocabulary, signed distances, the differentiable renderer, exact masks, layout."""

from __future__ import annotations

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.worlds.scene import (
    CLASS_SHAPES,
    CONTINUOUS_FIELDS,
    PATCH_PATTERNS,
    ROLE_MAIN,
    SHAPES,
    TEXTURES,
    empty_scene,
    patch_pattern_fields,
    pixel_grid,
    render,
    shape_sdf,
    small_positions,
    uniform,
)
from workbench.worlds.shapesworld import Sample, ShapesWorld


def _sample(seed: int, n: int = 16) -> Sample:
    """Scenes with every kind of content (textures, main objects, distractors, context objects)."""
    return ShapesWorld().sample(n, generator=torch.Generator().manual_seed(seed))


def test_at_least_eight_classes_and_textures():
    assert len(CLASS_SHAPES) >= 8 and len(set(CLASS_SHAPES)) == len(CLASS_SHAPES)
    assert len(TEXTURES) >= 5


@pytest.mark.parametrize("name", SHAPES)
def test_every_shape_sdf_is_negative_at_centre_positive_far(name):
    pts = torch.tensor([[0.0, 0.05], [3.0, 3.0]])
    d = shape_sdf(name, pts)
    # ring and crescent are hollow/offset at the origin; test a point inside them instead
    inside = {"ring": [0.72, 0.0], "crescent": [-0.6, 0.2], "heart": [0.0, 0.2], "semicircle": [0.0, 0.0], "bowtie": [-0.5, 0.0], "lshape": [-0.45, 0.0]}
    if name in inside:
        d = shape_sdf(name, torch.tensor([inside[name], [3.0, 3.0]]))
    assert float(d[0]) < 0 < float(d[1])


def test_shapes_render_differently():
    n = len(CLASS_SHAPES)
    scene = empty_scene(n).add_object(shape=torch.zeros(len(SHAPES)), center=torch.zeros(2), size=0.6, color="yellow")
    scene = scene.replace(shape_weights=torch.nn.functional.one_hot(torch.arange(n), len(SHAPES)).float()[:, None])
    img = render(scene, height=40).images.flatten(1)
    dist = torch.cdist(img, img)
    off = dist + torch.eye(n) * 1e9
    assert float(off.min()) > 1.0  # every pair of class shapes differs by many pixels


def test_gradient_flows_to_every_continuous_parameter():
    s = _sample(1, 4)
    # a patch and non-trivial texture mixture so every field matters
    scene = s.scene.replace(patch_opacity=torch.full((4,), 0.8), patch_colors=torch.rand(4, 2, 3, generator=torch.Generator().manual_seed(0)),
                            patch_center=torch.full((4, 2), 0.1))
    scene = scene.requires_grad_()
    img = render(scene, height=32).images
    weights = torch.rand(img.shape, generator=torch.Generator().manual_seed(1))
    (img * weights).sum().backward()
    for name in CONTINUOUS_FIELDS:
        grad = getattr(scene, name).grad
        assert grad is not None, name
        assert torch.isfinite(grad).all(), name
        assert float(grad.abs().sum()) > 0, name


def test_gradient_moves_object_toward_target():
    """Optimizing position through the renderer lowers the loss (gradients are useful, not just non-zero)."""
    base = empty_scene(1).add_object(shape="circle", center=torch.tensor([[-0.3, 0.0]]), size=0.3, color="red")
    target = render(base.replace(center=torch.tensor([[[0.0, 0.0]]])), height=32).images
    scene = base.requires_grad_(["center"])
    opt = torch.optim.Adam([scene.center], lr=0.05)
    first = None
    for _ in range(40):
        loss = ((render(scene, height=32).images - target) ** 2).mean()
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.2 * first
    assert abs(float(scene.center.detach()[0, 0, 0])) < 0.1


def test_shape_mixture_weights_get_gradients_for_all_shapes():
    scene = empty_scene(2).add_object(shape=torch.full((len(SHAPES),), 1.0 / len(SHAPES)), center=torch.zeros(2), size=0.5, color="blue")
    scene = scene.requires_grad_(["shape_weights"])
    render(scene, height=32).images.mean().backward()
    assert (scene.shape_weights.grad[:, 0].abs() > 0).all()


def test_masks_match_rendered_objects():
    s = _sample(5, 16)
    r = render(s.scene, height=48, masks=True)
    for i in range(16):
        for k in range(s.scene.n_slots):
            m = r.object_masks[i, k] > 0.99
            if int(m.sum()) == 0:
                continue
            colour = s.scene.color[i, k].view(3, 1)
            err = (r.images[i][:, m] - colour).abs().max()
            assert float(err) < 0.02
    # masks partition the image: objects + patch + background sum to 1
    total = r.object_masks.sum(1) + r.patch_mask + r.background_mask
    assert torch.allclose(total, torch.ones_like(total), atol=1e-4)
    # the main object is visible in every image
    main = (s.scene.role == ROLE_MAIN).float()[..., None, None]
    assert ((r.object_masks * main).sum((1, 2, 3)) > 10).all()


def test_requires_grad_rejects_integer_fields():
    s = _sample(0, 2)
    with pytest.raises(WorkbenchError, match="role"):
        s.scene.requires_grad_(["role"])



def test_patch_pattern_fields_are_one_map_per_pattern_in_unit_range():
    grid = pixel_grid(12, 12)
    u, v = grid[..., 0][None], grid[..., 1][None]
    fields = patch_pattern_fields(u, v)
    assert fields.shape == (1, len(PATCH_PATTERNS), 12, 12)
    assert float(fields.min()) >= 0.0 and float(fields.max()) <= 1.0
    flat = fields[0].flatten(1)
    assert float(torch.cdist(flat, flat).add(torch.eye(len(PATCH_PATTERNS)) * 1e9).min()) > 0.5  # all differ


def test_patch_is_drawn_over_objects_with_its_pattern():
    scene = empty_scene(1).add_object(shape="square", center=torch.zeros(1, 2), size=0.9, color="red")
    scene = scene.replace(patch_center=torch.zeros(1, 2), patch_size=torch.tensor([0.5]),
                          patch_pattern=torch.tensor([PATCH_PATTERNS.index("gradient")]),
                          patch_colors=torch.tensor([[[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]]), patch_opacity=torch.ones(1))
    r = render(scene, height=32, masks=True)
    inside = r.patch_mask[0] > 0.99
    assert int(inside.sum()) > 40 and float(r.object_masks[0, 0][inside].max()) < 0.01  # the patch hides the object
    assert float(r.images[0, 0][inside].max()) < 0.05  # no red left under the patch


def test_uniform_draws_stay_in_range_and_follow_the_generator():
    a = uniform(torch.Generator().manual_seed(0), 1000, -0.5, 2.0, 2)
    b = uniform(torch.Generator().manual_seed(0), 1000, -0.5, 2.0, 2)
    assert a.shape == (1000, 2) and torch.equal(a, b)
    assert float(a.min()) >= -0.5 and float(a.max()) < 2.0


def test_small_positions_stay_in_the_frame_off_the_main_object():
    g = torch.Generator().manual_seed(0)
    center = (torch.rand(500, 2, generator=g) * 2 - 1) * 0.3
    size = 0.42 + 0.2 * torch.rand(500, generator=g)
    pos = small_positions(center, size, generator=torch.Generator().manual_seed(1))
    assert pos.shape == (500, 2) and float(pos.abs().max()) <= 0.82
    away = (pos - center).norm(dim=1) > size  # outside the main object's radius, unless the frame reflected it back
    assert float(away.float().mean()) > 0.8
    again = small_positions(center, size, generator=torch.Generator().manual_seed(1))
    assert torch.equal(pos, again)
