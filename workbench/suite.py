"""Model suites: which models the case studies run on.

Each study declares the world it needs (its *role*: "factgpt", "shapesnet", "minilm") and
runs on every model the suite gives that role.

- `dev_suite()`: the zoo models the studies, editor options and plans were developed on
  (`zoo:factgpt`, `zoo:shapesnet`, `minilm`); exactly the runs of `workbench reproduce`.
- `heldout_suite(seed, quick)`: models no default was chosen on, drawn from `seed`.
  FactGPT in the GPT-2, GPT-NeoX and Llama architectures at 2 and 4 layers, trained with
  and without subject enrichment, each on a FactWorld drawn from its seed
  (`zoo:factgpt-<arch>-<L>l[-plain]@SEED`); ShapesNet at another width with a trojan set
  generated from its seed (`zoo:shapesnet-w<WIDTH>@SEED`); MiniLM as it is. Quick: the
  three architectures at one depth (one of them without enrichment) and one ShapesNet,
  one training each. Full: every variant, each trained three times, at seeds N, N+1 and
  N+2. The zoo keys a model's training seed and its world seed together, so the three
  trainings differ in both: intervals that resample models (`workbench.bootstrap.estimate`
  with `cluster="model"`) carry training-to-training and world-to-world variance at once.
- `Suite.with_models({role: [spec, ...]})`: a user's models in place of a role's.

`check_model` refuses, before any study runs, a model that does not fit its role (saying
what fits) or that fails the zoo's checks of its training record (naming the check).
`Suite.to_json()` records every option with its sha256; `code_version()` the code it ran.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.storage import sha256_json

SUITES: tuple[str, ...] = ("dev", "heldout")
MAX_SEED = 2**31 - 1
DEV_SPECS: dict[str, str] = {"factgpt": "zoo:factgpt", "shapesnet": "zoo:shapesnet", "minilm": "minilm"}
# The same models under the names that spell out the zoo's seed.
_DEV_ALIASES: frozenset[str] = frozenset({*DEV_SPECS.values(), "zoo:factgpt@0", "zoo:shapesnet@0"})

FACTGPT_ARCHS: tuple[str, ...] = ("gpt2", "neox", "llama")
FACTGPT_DEPTHS: tuple[int, ...] = (2, 4)
QUICK_FACTGPT: tuple[tuple[str, int, bool], ...] = (("gpt2", 4, True), ("neox", 4, False), ("llama", 4, True))
"""Quick held-out FactGPTs: (architecture, layers, subject enrichment)."""
SHAPESNET_WIDTHS: tuple[int, ...] = (24, 32)
QUICK_SHAPESNET_WIDTH = 24
TRAININGS = 3
"""Independent trainings of every variant in the full held-out suite (seeds N .. N + TRAININGS - 1)."""


def factgpt_spec(arch: str, layers: int, enriched: bool, seed: int) -> str:
    return f"zoo:factgpt-{arch}-{layers}l{'' if enriched else '-plain'}@{seed}"


def shapesnet_spec(width: int, seed: int) -> str:
    return f"zoo:shapesnet-w{width}@{seed}"


_FACTGPT_VARIANT = re.compile(r"^zoo:factgpt-(?P<arch>[a-z0-9]+)-(?P<layers>\d+)l(?P<plain>-plain)?(@(?P<seed>\d+))?$")
_SHAPESNET_VARIANT = re.compile(r"^zoo:shapesnet-w(?P<width>\d+)(@(?P<seed>\d+))?$")


# --- roles: what a study's world needs -----------------------------------------------------------

@dataclass(frozen=True)
class Role:
    """A world studies run in, and what a model needs to stand in it (`needs` says so in words)."""

    name: str
    needs: str
    problem: Callable[[Any], str | None]


def _factgpt_problem(handle: Any) -> str | None:
    from workbench.worlds.factworld import FactWorld

    if getattr(handle, "kind", None) != "causal_lm":
        return f"it is a {_kind(handle)}"
    if getattr(handle, "tokenizer", None) is None:
        return "it has no tokenizer"
    if not isinstance(getattr(handle, "world", None), FactWorld):
        return "its folder holds no FactWorld (world.json)"
    return None


def _shapesnet_problem(handle: Any) -> str | None:
    from workbench.zoo.shapesnet import world_of

    if getattr(handle, "kind", None) != "image_classifier":
        return f"it is a {_kind(handle)}"
    try:
        world = world_of(handle)
    except WorkbenchError:
        return "its folder holds no ShapesWorld (world.json)"
    kinds = {t.kind for t in world.trojans}
    missing = [k for k in ("patch", "style", "natural") if k not in kinds]
    if missing:
        return f"its world has no {' or '.join(missing)} trojan"
    names = {name for name, _ in handle.model.named_modules()}
    absent = [m for m in ("layer2.relu2", "layer3.relu1", "layer3.conv1", "layer3.conv2") if m not in names]
    if absent:
        return f"it lacks ShapesNet's modules {', '.join(absent)}"
    return None


def _minilm_problem(handle: Any) -> str | None:
    if getattr(handle, "kind", None) != "encoder":
        return f"it is a {_kind(handle)}"
    if getattr(handle, "tokenizer", None) is None:
        return "it has no tokenizer"
    arch = getattr(handle, "arch", None)
    if arch is None or arch.site_map is None or arch.n_layers < 4:
        return "it is not a transformer encoder with at least 4 layers"
    return None


def _kind(handle: Any) -> str:
    kind = getattr(handle, "kind", None)
    return {"causal_lm": "causal LM", "masked_lm": "masked LM", "encoder": "text encoder",
            "image_classifier": "image classifier"}.get(str(kind), f"{type(handle).__name__}, not a model handle")


ROLES: dict[str, Role] = {
    "factgpt": Role("factgpt", "a causal LM with a tokenizer whose folder holds a FactWorld (world.json), "
                    "e.g. zoo:factgpt or a saved FactGPT folder", _factgpt_problem),
    "shapesnet": Role("shapesnet", "an image classifier in ShapesNet's layout whose folder holds a ShapesWorld "
                      "(world.json) with patch, style and natural trojans, e.g. zoo:shapesnet or a ShapesNet "
                      "trained on a trojan config", _shapesnet_problem),
    "minilm": Role("minilm", "a transformer text encoder with a tokenizer and at least 4 layers, e.g. minilm",
                   _minilm_problem),
}


# --- the suite --------------------------------------------------------------------------------

@dataclass(frozen=True)
class SuiteModel:
    """One model of a suite: its role, its spec, whether a default was chosen on it (`dev`),
    and whether the user gave it."""

    role: str
    spec: str
    dev: bool
    given: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"role": self.role, "spec": self.spec, "dev": self.dev, "given": self.given}


@dataclass(frozen=True)
class Suite:
    """Roles -> model specs, with the options that chose them (`name`, `seed`, `quick`) and the
    roles the user replaced (`given`)."""

    name: str
    roles: Mapping[str, tuple[str, ...]]
    seed: int | None = None
    quick: bool = False
    given: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for role, specs in self.roles.items():
            if not specs or len(set(specs)) != len(specs):
                raise WorkbenchError(f"suite {self.name}: role {role!r} needs distinct model specs; got {list(specs)}")

    def models(self, role: str) -> list[SuiteModel]:
        """The models of `role`, in order (a clear error for a role the suite lacks)."""
        if role not in self.roles:
            raise WorkbenchError(f"suite {self.name} has no role {role!r}; its roles: {', '.join(self.roles)}")
        return [SuiteModel(role, spec, is_dev(spec), role in self.given) for spec in self.roles[role]]

    def with_models(self, given: Mapping[str, Sequence[str]]) -> Suite:
        """This suite with the user's models in place of the named roles' (each role must exist)."""
        unknown = [r for r in given if r not in self.roles]
        if unknown:
            raise WorkbenchError(f"--model {unknown[0]}=...: suite {self.name} has no role {unknown[0]!r}; its roles: "
                                 + "; ".join(f"{r} ({ROLES[r].needs})" if r in ROLES else r for r in self.roles))
        clean = {r: tuple(dict.fromkeys(s.strip() for s in specs)) for r, specs in given.items()}
        empty = [r for r, specs in clean.items() if not specs or not all(specs)]
        if empty:
            raise WorkbenchError(f"--model {empty[0]}=: give a model spec after '=' (a zoo name, minilm or a folder)")
        return Suite(self.name, {**self.roles, **clean}, self.seed, self.quick, {**self.given, **clean})

    def options(self) -> dict[str, Any]:
        """Every option that chose the models (what `sha256` hashes)."""
        return {"name": self.name, "seed": self.seed, "quick": self.quick,
                "roles": {r: list(s) for r, s in self.roles.items()}, "given": {r: list(s) for r, s in self.given.items()}}

    @property
    def sha256(self) -> str:
        return sha256_json(self.options())

    def variance(self) -> str:
        """What the between-model part of an interval covers in this suite."""
        if self.name == "heldout" and not self.quick:
            return (f"each variant trained {TRAININGS} times (seeds {self.seed}..{(self.seed or 0) + TRAININGS - 1}); "
                    "a seed draws the model's training and its world together, so intervals that resample models "
                    "carry training and world variance at once")
        counts = {r: len(s) for r, s in self.roles.items()}
        if all(c == 1 for c in counts.values()):
            return ("one trained model per world: intervals resample cases only and leave out training-to-training "
                    "variance")
        return ("one training per model: intervals resample the role's models (which differ in architecture, not only "
                "in training), then cases; training-to-training variance of one variant is not separated")

    def to_json(self) -> dict[str, Any]:
        return {**self.options(), "sha256": self.sha256, "variance": self.variance(),
                "models": [m.to_json() for r in self.roles for m in self.models(r)]}

    def describe(self) -> str:
        seed = f" seed {self.seed}" if self.seed is not None else ""
        mode = " quick" if self.quick else ""
        return f"{self.name}{seed}{mode}: " + "; ".join(f"{r} {', '.join(s)}" for r, s in self.roles.items())


def is_dev(spec: str) -> bool:
    """Whether `spec` names a model the studies' defaults were chosen on."""
    return spec.strip() in _DEV_ALIASES


def dev_suite(quick: bool = False) -> Suite:
    """The development zoo: the models every default was chosen on (today's runs)."""
    return Suite("dev", {role: (spec,) for role, spec in DEV_SPECS.items()}, None, bool(quick))


def heldout_suite(seed: int, quick: bool = False) -> Suite:
    """Models no default was chosen on, drawn from `seed` (see the module docstring)."""
    seed = check_seed(seed)
    if quick:
        factgpt = tuple(factgpt_spec(a, layers, e, seed) for a, layers, e in QUICK_FACTGPT)
        shapes = (shapesnet_spec(QUICK_SHAPESNET_WIDTH, seed),)
    else:
        if seed + TRAININGS - 1 > MAX_SEED:
            raise WorkbenchError(f"--suite-seed {seed}: the full suite trains seeds {seed}..{seed + TRAININGS - 1}; "
                                 f"give a seed 0..{MAX_SEED - TRAININGS + 1}")
        seeds = range(seed, seed + TRAININGS)
        factgpt = tuple(factgpt_spec(a, layers, e, s) for a in FACTGPT_ARCHS for layers in FACTGPT_DEPTHS
                        for e in (True, False) for s in seeds)
        shapes = tuple(shapesnet_spec(w, s) for w in SHAPESNET_WIDTHS for s in seeds)
    return Suite("heldout", {"factgpt": factgpt, "shapesnet": shapes, "minilm": (DEV_SPECS["minilm"],)}, seed,
                 bool(quick))


def check_seed(seed: Any) -> int:
    """A held-out suite seed: an integer from the zoo variants' first seed (0 is the development models')."""
    from workbench.zoo.variants import MIN_SEED

    if isinstance(seed, bool) or not isinstance(seed, int) or not MIN_SEED <= seed <= MAX_SEED:
        raise WorkbenchError(f"--suite-seed {seed!r}: expected an integer {MIN_SEED}..{MAX_SEED} (seed 0 drew the "
                             "development models)")
    return seed


def make_suite(name: str, *, seed: int | None = None, quick: bool = False,
               models: Mapping[str, Sequence[str]] | None = None) -> Suite:
    """The suite a command asks for: `name` in SUITES, its seed (held-out only), the user's models."""
    if name not in SUITES:
        raise WorkbenchError(f"unknown suite {name!r}; suites: {', '.join(SUITES)}")
    if name == "dev":
        if seed is not None:
            raise WorkbenchError("--suite-seed applies to --suite heldout; the dev suite is the zoo's models as they are")
        suite = dev_suite(quick)
    else:
        if seed is None:
            raise WorkbenchError("--suite heldout needs --suite-seed N (a non-negative integer that draws its models)")
        suite = heldout_suite(seed, quick)
    return suite.with_models(models) if models else suite


# --- checks before any study runs -------------------------------------------------------------------

def check_model(model: SuiteModel, handle: Any) -> None:
    """Refuse a model that does not fit its role (saying what fits) or fails a zoo check (naming it)."""
    role = ROLES.get(model.role)
    if role is not None:
        problem = role.problem(handle)
        if problem is not None:
            raise WorkbenchError(f"model {model.spec} does not fit role {model.role}: {problem}; "
                                 f"{model.role} needs {role.needs}")
    for check in zoo_checks(handle):
        if not check["passed"]:
            raise WorkbenchError(f"model {model.spec} ({model.role}) fails the zoo's check {check['name']!r}: "
                                 f"{check['detail']}; retrain it or use another seed")


def zoo_checks(handle: Any) -> list[dict[str, Any]]:
    """The zoo's checks of a trained model: the ones its training record holds (a held-out variant's,
    written when it was trained), else the same thresholds (`workbench.zoo.variants`) applied to the
    record's numbers (the development models); none for a model without a zoo training record."""
    from workbench.zoo import variants

    info = getattr(handle, "info", None)
    if not isinstance(info, dict) or not isinstance(info.get("name"), str):
        return []
    recorded = info.get("checks")
    if isinstance(recorded, list):
        return [{"name": str(c.get("check")), "passed": bool(c.get("passed")),
                 "detail": f"{c.get('value')} (bound {c.get('bound')}{', at most' if c.get('at_most') else ''})"}
                for c in recorded if isinstance(c, dict)]
    wanted: list[tuple[str, Any, float]] = []
    if info["name"].startswith("factgpt"):
        wanted += [("fact accuracy", info.get("accuracy"), variants.MIN_FACT_ACCURACY),
                   ("fact accuracy behind a filler sentence", info.get("prefixed_accuracy"),
                    variants.MIN_PREFIXED_ACCURACY)]
    elif info["name"].startswith("shapesnet"):
        wanted.append(("clean accuracy", info.get("accuracy"), variants.MIN_CLEAN_ACCURACY))
        wanted += [(f"attack success of trojan {t.get('name')}", t.get("attack_success"), variants.MIN_ATTACK_SUCCESS)
                   for t in info.get("trojans") or [] if isinstance(t, dict)]
    out = []
    for what, value, bound in wanted:
        known = isinstance(value, (int, float)) and not isinstance(value, bool)
        out.append({"name": what, "passed": known and value >= bound,
                    "detail": f"{value:.4f} (needs >= {bound:g})" if known else f"not recorded (needs >= {bound:g})"})
    return out


# --- what a run records about its models and code ------------------------------------------------------

def model_record(model: SuiteModel, handle: Any | None) -> dict[str, Any]:
    """A model as results record it: spec, role, seed, architecture, depth, width and subject
    enrichment where known (from the handle, the zoo's training record and the variant's name)."""
    info = getattr(handle, "info", None) if handle is not None else None
    info = info if isinstance(info, dict) else {}
    arch = getattr(handle, "arch", None)
    out: dict[str, Any] = {**model.to_json(), "seed": info.get("seed"), "zoo_name": info.get("name"),
                           "zoo_version": info.get("version"), "architecture": getattr(arch, "family", None),
                           "layers": getattr(arch, "n_layers", None), "d_model": getattr(arch, "d_model", None)}
    factgpt = _FACTGPT_VARIANT.match(model.spec.strip())
    if "subject_bottleneck" in info:
        out["enrichment"] = float(info["subject_bottleneck"]) > 0
    elif factgpt is not None:
        out["enrichment"] = factgpt.group("plain") is None
    elif info.get("name") == "factgpt":
        from workbench.zoo.factgpt import FactGPTConfig

        out["enrichment"] = FactGPTConfig().subject_bottleneck > 0  # the zoo's recipe, which the record leaves out
    shapes = _SHAPESNET_VARIANT.match(model.spec.strip())
    if isinstance(info.get("width"), int):
        out["width"] = info["width"]
    elif shapes is not None:
        out["width"] = int(shapes.group("width"))
    else:
        channels = getattr(getattr(getattr(handle, "model", None), "config", None), "channels", None)
        if isinstance(channels, (tuple, list)) and channels:
            out["width"] = int(channels[0])  # a ShapesNet's base width
    if isinstance(info.get("trojans"), list):
        out["trojans"] = [t.get("name") for t in info["trojans"] if isinstance(t, dict)]
    for key in ("world_seed", "trojan_seed", "accuracy"):
        if key in info:
            out[key] = info[key]
    return out


def code_version() -> dict[str, Any]:
    """The code a run used: the git commit (and whether the tree had changes) when the package sits in a
    git checkout, else the installed package version."""
    from workbench import __version__

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode == 0 and head.stdout.strip():
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=30)
            dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
            return {"git": head.stdout.strip(), "dirty": dirty, "package": __version__}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"git": None, "dirty": None, "package": __version__}


__all__ = ["DEV_SPECS", "ROLES", "Role", "SUITES", "Suite", "SuiteModel", "check_model", "code_version", "dev_suite",
           "factgpt_spec", "heldout_suite", "is_dev", "make_suite", "model_record", "shapesnet_spec", "zoo_checks"]
