"""Feature visualization (lucid-grade) for any image model.

    from workbench.featvis import visualize, channel, total_variation
    fv = visualize(h, channel("layer2", 5) - 0.05 * total_variation(), steps=256, snapshots=(16, 64))
    fv.save("out/")          # grid.png, snapshots.png, images.safetensors, featvis.json

Modules: `objectives` (what to maximize, composable), `param` (pixels, Fourier with
decorrelated colour, ShapesWorld scene parameters), `transforms` (robustness), `render`
(the engine). Importing this package does not import `transformers`.
"""

from workbench.featvis import param, render, transforms
from workbench.featvis.objectives import (
    Objective,
    ObjectiveContext,
    as_objective,
    channel,
    class_log_prob,
    class_logit,
    direction,
    diversity,
    l1,
    l2,
    neuron,
    total_variation,
)
from workbench.featvis.param import (
    Fourier,
    Patch,
    Pixels,
    SceneParam,
    describe_scene,
    parse_param,
    render_scene,
    with_init_noise,
)
from workbench.featvis.render import FeatureVisualization, activation_sites, save_image_grid, site_shapes, visualize

__all__ = [
    "FeatureVisualization", "Fourier", "Objective", "ObjectiveContext", "Patch", "Pixels", "SceneParam",
    "activation_sites", "as_objective", "channel", "class_log_prob", "class_logit", "describe_scene", "direction", "diversity",
    "l1", "l2", "neuron", "param", "parse_param", "render", "render_scene", "save_image_grid", "site_shapes", "total_variation", "transforms",
    "visualize", "with_init_noise",
]
