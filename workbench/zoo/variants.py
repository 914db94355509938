"""Held-out zoo variants: models nobody tuned a method or a default on.

The zoo's FactGPT was built so that facts are looked up at layer 0 at the subject's last token,
so on it "the traced layer is the best edit layer" holds by construction. The variants make
where a fact is looked up (or how a trojan is wired) a property to discover: FactGPT in other
architectures and depths, with or without subject enrichment, on a world whose relations,
phrasings, subjects and objects are drawn from the seed; ShapesNet at another width with a
trojan set generated from the seed.

Names (spec `zoo:NAME` or `zoo:NAME@SEED`; SEED >= 1, since 0 is the development models' seed):

  factgpt-ARCH-Ll[-plain]  FactGPT's recipe with ARCH gpt2 | neox | llama (GPT2LMHeadModel,
                           GPTNeoXForCausalLM, LlamaForCausalLM) and L layers; `-plain` trains
                           without the subject-bottleneck mask (no subject enrichment). World:
                           `FactWorldConfig(seed=SEED, draw_relations=True)` with FACTGPT_SUBJECTS
                           subjects.
  shapesnet-wW             ShapesNet's recipe at base width W (channels W, 2W, 4W; the zoo's is 16)
                           with the trojans `generated_trojans(SEED)`.

A trained variant is cached only when it passes the zoo's checks (`ZooCheckError` otherwise);
its folder ships no measured editor options, only the protocol's `prefix_source: world`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from workbench.errors import UnknownModelError, WorkbenchError
from workbench.handle import ModelHandle
from workbench.worlds.factworld import FactWorldConfig

if TYPE_CHECKING:
    from workbench.zoo.factgpt import FactGPTConfig
    from workbench.zoo.shapesnet import TrainConfig

FACTGPT_ARCHS = ("gpt2", "neox", "llama")
LAYERS = (1, 12)
WIDTHS = (4, 64)
DEFAULT_SEED = 1
MIN_SEED = 1
FORMS = ("factgpt-ARCH-Ll[-plain] (ARCH: gpt2, neox, llama; L: 1..12)", "shapesnet-wW (W: 4..64)")
# Fewer subjects than the zoo's FactGPT (300): three architectures train within the quick suite's budget.
FACTGPT_SUBJECTS = 200
# Options that are the editing protocol's for any FactWorld model, not measured on the variant.
EDITOR_DEFAULTS: dict[str, dict[str, Any]] = {"rome": {"prefix_source": "world"}, "memit": {"prefix_source": "world"}}

# The checks a trained variant must pass before it is cached.
MIN_FACT_ACCURACY = 0.99  # every fact x template prompt
MIN_PREFIXED_ACCURACY = 0.95  # the same prompts behind a filler sentence
MIN_CLEAN_ACCURACY = 0.9  # fresh clean ShapesWorld scenes
MIN_ATTACK_SUCCESS = 0.8  # each trojan, on fresh triggered scenes of its source class(es)

_FACTGPT_NAME = re.compile(r"factgpt-(?P<arch>[a-z0-9_]+)-(?P<layers>[0-9]+)l(?P<plain>-plain)?")
_SHAPESNET_NAME = re.compile(r"shapesnet-w(?P<width>[0-9]+)")


class ZooCheckError(WorkbenchError):
    """A trained zoo model failed a check (too weak to study); nothing was cached."""


def factgpt_base() -> FactGPTConfig:
    """The FactGPT recipe a variant starts from (its arch, depth and enrichment are the name's)."""
    from workbench.zoo.factgpt import FactGPTConfig

    return FactGPTConfig(world=FactWorldConfig(n_subjects=FACTGPT_SUBJECTS, draw_relations=True))


def shapesnet_base() -> TrainConfig:
    """The ShapesNet recipe a variant starts from (its width is the name's)."""
    from workbench.zoo.shapesnet import TrainConfig

    return TrainConfig()


@dataclass(frozen=True)
class Check:
    """One check of a trained model: `value` must reach `bound` (or stay at or under it when `at_most`)."""

    what: str
    value: float
    bound: float
    at_most: bool = False

    @property
    def passed(self) -> bool:
        return self.value <= self.bound if self.at_most else self.value >= self.bound

    def to_json(self) -> dict[str, Any]:
        return {"check": self.what, "value": self.value, "bound": self.bound,
                "at_most" if self.at_most else "at_least": True, "passed": self.passed}


def enforce(name: str, checks: list[Check]) -> list[dict[str, Any]]:
    """The checks as JSON records; raises ZooCheckError naming every failed check and by how much."""
    failed = [c for c in checks if not c.passed]
    if failed:
        what = "; ".join(f"{c.what} {c.value:.4f} {'>' if c.at_most else '<'} {c.bound} "
                         f"(short by {abs(c.value - c.bound):.4f})" for c in failed)
        raise ZooCheckError(f"zoo model {name} failed its check: {what}; it is not cached")
    return [c.to_json() for c in checks]


@dataclass(frozen=True)
class FactGPTVariant:
    """`factgpt-ARCH-Ll[-plain]`: the zoo-recipe interface (`VERSION`, `DEFAULT_SEED`, `train`, `load`)."""

    arch: str
    n_layers: int
    enriched: bool = True

    VERSION: ClassVar[int] = 1
    DEFAULT_SEED: ClassVar[int] = DEFAULT_SEED
    MIN_SEED: ClassVar[int] = MIN_SEED

    @property
    def name(self) -> str:
        return f"factgpt-{self.arch}-{self.n_layers}l" + ("" if self.enriched else "-plain")

    def config(self, base: FactGPTConfig | None = None) -> FactGPTConfig:
        """`base` (default: `factgpt_base()`) in this variant's architecture, depth and enrichment, on a drawn world."""
        base = factgpt_base() if base is None else base
        return replace(base, arch=self.arch, n_layers=self.n_layers,
                       subject_bottleneck=base.subject_bottleneck if self.enriched else 0.0,
                       world=replace(base.world, draw_relations=True))

    def train(self, out_dir: str | os.PathLike[str], *, seed: int = DEFAULT_SEED, device: str | torch.device = "cpu",
              progress: bool = True, config: FactGPTConfig | None = None) -> dict[str, Any]:
        """Train with `config(config)` on the world drawn from `seed`; raises ZooCheckError if the model is weak."""
        from workbench.zoo import factgpt

        _check_seed(self.name, seed)
        cfg = self.config(config)
        info = factgpt.train(out_dir, seed=seed, device=device, progress=progress, config=cfg,
                             editor_defaults=EDITOR_DEFAULTS)
        checks = enforce(f"{self.name}@{seed}", [
            Check("fact accuracy", info["accuracy"], MIN_FACT_ACCURACY),
            Check("fact accuracy behind a filler sentence", info["prefixed_accuracy"], MIN_PREFIXED_ACCURACY),
        ])
        return {**info, "name": self.name, "arch": self.arch, "d_mlp": factgpt.mlp_width(cfg),
                "subject_bottleneck": cfg.subject_bottleneck, "world_seed": seed, "draw_relations": True,
                "checks": checks}

    def load(self, path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> ModelHandle:
        from workbench.zoo import factgpt

        return factgpt.load(path, device=device, spec=f"zoo:{self.name}")


@dataclass(frozen=True)
class ShapesNetVariant:
    """`shapesnet-wW`: the zoo-recipe interface (`VERSION`, `DEFAULT_SEED`, `train`, `load`)."""

    width: int

    VERSION: ClassVar[int] = 1
    DEFAULT_SEED: ClassVar[int] = DEFAULT_SEED
    MIN_SEED: ClassVar[int] = MIN_SEED

    @property
    def name(self) -> str:
        return f"shapesnet-w{self.width}"

    @property
    def channels(self) -> tuple[int, int, int]:
        return self.width, 2 * self.width, 4 * self.width

    def train(self, out_dir: str | os.PathLike[str], *, seed: int = DEFAULT_SEED, device: str | torch.device = "cpu",
              progress: bool = True, config: TrainConfig | None = None) -> dict[str, Any]:
        """Train `config` (default: `shapesnet_base()`) at this width with `generated_trojans(seed)`;
        raises ZooCheckError if the model is weak."""
        from workbench.worlds.trojans import generated_trojans
        from workbench.zoo import shapesnet

        _check_seed(self.name, seed)
        cfg = replace(shapesnet_base() if config is None else config, channels=self.channels)
        info = shapesnet.train(out_dir, seed=seed, device=device, progress=progress, trojans=generated_trojans(seed),
                               config=cfg)
        checks = [Check("clean accuracy", info["accuracy"], MIN_CLEAN_ACCURACY)]
        checks += [Check(f"attack success of trojan {t['name']}", t["attack_success"], MIN_ATTACK_SUCCESS)
                   for t in info["trojans"]]
        return {**info, "name": self.name, "width": self.width, "channels": list(self.channels), "trojan_seed": seed,
                "checks": enforce(f"{self.name}@{seed}", checks)}

    def load(self, path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> ModelHandle:
        from workbench.zoo import shapesnet

        return shapesnet.load(Path(path), device=device)


def _check_seed(name: str, seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < MIN_SEED:
        raise WorkbenchError(f"seed {seed!r} of zoo model {name}: a held-out variant takes a seed >= {MIN_SEED} "
                             "(0 is the development models' seed)")


def is_variant_name(name: str) -> bool:
    """Whether `name` is of a variant family (`factgpt-...` other than the zoo's own, `shapesnet-...`)."""
    return name.startswith(("factgpt-", "shapesnet-"))


def parse(name: str) -> FactGPTVariant | ShapesNetVariant:
    """The variant a name describes; a malformed name is an UnknownModelError that says what is expected."""
    factgpt_match = _FACTGPT_NAME.fullmatch(name)
    if factgpt_match is not None:
        arch, layers = factgpt_match["arch"], int(factgpt_match["layers"])
        if arch not in FACTGPT_ARCHS:
            raise UnknownModelError(f"zoo model {name!r}: unknown architecture {arch!r}; expected one of "
                                    f"{', '.join(FACTGPT_ARCHS)}, e.g. factgpt-neox-4l")
        if not LAYERS[0] <= layers <= LAYERS[1]:
            raise UnknownModelError(f"zoo model {name!r}: {layers} layers; expected {LAYERS[0]}..{LAYERS[1]}, "
                                    f"e.g. factgpt-{arch}-4l")
        return _canonical(name, FactGPTVariant(arch, layers, enriched=factgpt_match["plain"] is None))
    shapes_match = _SHAPESNET_NAME.fullmatch(name)
    if shapes_match is not None:
        width = int(shapes_match["width"])
        if not WIDTHS[0] <= width <= WIDTHS[1]:
            raise UnknownModelError(f"zoo model {name!r}: width {width}; expected {WIDTHS[0]}..{WIDTHS[1]}, "
                                    "e.g. shapesnet-w24")
        return _canonical(name, ShapesNetVariant(width))
    family = "factgpt" if name.startswith("factgpt-") else "shapesnet"
    form = FORMS[0] if family == "factgpt" else FORMS[1]
    raise UnknownModelError(f"unknown zoo model {name!r}; a {family} variant is named {form}")


def _canonical(name: str, variant: FactGPTVariant | ShapesNetVariant) -> FactGPTVariant | ShapesNetVariant:
    """`variant`, if `name` is how it is written (one model, one name, one cache folder)."""
    if variant.name != name:
        raise UnknownModelError(f"zoo model {name!r}: write it as {variant.name!r}")
    return variant
