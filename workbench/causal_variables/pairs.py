"""Interchange-intervention pairs drawn from the worlds, with the answer an exact alignment must give.

A pair is a base input and a source input. Intervening on a variable means running the base
with that variable's representation taken from the source; the counterfactual label is what
the model answers on the base with the variable set to the source's value, which the worlds
know exactly:

- FactGPT `subject`: base "The capital of A is", source any prompt about subject B (often of
  another relation); the counterfactual is B's capital. `relation`: base asks relation R of A,
  source asks relation R' of B; the counterfactual is A's R'. Only prompts the model answers
  right are used, the counterfactual prompt included, so truth and behaviour agree.
- ShapesNet `shape` / `colour`: base and source are independent scenes (another place, size,
  background); the counterfactual scene is the base with its main object's shape (or colour)
  set to the source's, and its label is the model's own class on that rendered scene (the
  colour matters only through the spurious red-square rule, which the model learned).

Every pair kept changes the answer (counterfactual label != base output), so leaving the
base alone scores 0 and the interchange accuracy measures moved answers only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle

Kind = Literal["tokens", "tensors"]
Position = Literal["subject", "last"]

FACT_VARIABLES = ("subject", "relation")
SCENE_VARIABLES = ("shape", "colour")
DEFAULT_POSITION: dict[str, Position] = {"subject": "subject", "relation": "last"}


@dataclass(frozen=True)
class InterchangePairs:
    """Base and source inputs for one variable, the positions to intervene at, and the labels.

    `base`/`source` are token-id lists (kind "tokens") or input tensors (kind "tensors"); positions
    are per-pair token indices (tokens only). `base_values`/`source_values` are the variable's
    values (subject, relation, shape or colour index, naming `value_names`) that probes and
    difference-in-means are fitted on. `groups` keeps pairs that share a base together when
    splitting train from held-out pairs.
    """

    variable: str
    kind: Kind
    base: Any
    source: Any
    base_labels: torch.Tensor
    counterfactual_labels: torch.Tensor
    base_values: torch.Tensor
    source_values: torch.Tensor
    groups: torch.Tensor
    value_names: tuple[str, ...]
    base_positions: torch.Tensor | None = None
    source_positions: torch.Tensor | None = None
    label_names: dict[int, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.base_labels)
        sizes = {len(self.base), len(self.source), len(self.counterfactual_labels), len(self.base_values),
                 len(self.source_values), len(self.groups)}
        if sizes != {n}:
            raise WorkbenchError(f"interchange pairs of mismatched sizes {sorted(sizes)}; every field needs one entry per pair")
        if self.kind == "tokens" and (self.base_positions is None or self.source_positions is None):
            raise WorkbenchError("token pairs need base_positions and source_positions (the token to intervene at)")

    def __len__(self) -> int:
        return len(self.base_labels)

    def index(self, rows: torch.Tensor) -> InterchangePairs:
        """The pairs at `rows` (a long tensor), in that order."""
        rows = rows.long()
        pick = (lambda x: [x[i] for i in rows.tolist()]) if self.kind == "tokens" else (lambda x: x[rows])
        opt = (lambda t: None if t is None else t[rows])
        return replace(self, base=pick(self.base), source=pick(self.source), base_labels=self.base_labels[rows],
                       counterfactual_labels=self.counterfactual_labels[rows], base_values=self.base_values[rows],
                       source_values=self.source_values[rows], groups=self.groups[rows],
                       base_positions=opt(self.base_positions), source_positions=opt(self.source_positions))

    def split(self, held_out: float, *, seed: int) -> tuple[InterchangePairs, InterchangePairs]:
        """(train, held-out): whole groups go to one side, drawn with `seed`."""
        train, test = self.split_rows(held_out, seed=seed)
        return self.index(train), self.index(test)

    def split_rows(self, held_out: float, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices of `split`'s (train, held-out) sides."""
        if not 0.0 < held_out < 1.0:
            raise WorkbenchError(f"held-out share {held_out}: give a share in (0, 1), e.g. 0.3")
        groups = torch.unique(self.groups)
        g = torch.Generator().manual_seed(seed)
        order = groups[torch.randperm(len(groups), generator=g)]
        n_test = max(1, round(held_out * len(groups)))
        if n_test >= len(groups):
            raise WorkbenchError(f"{len(groups)} groups of pairs are too few to hold {held_out:.0%} out; draw more pairs")
        test = torch.isin(self.groups, order[:n_test])
        return torch.nonzero(~test).flatten(), torch.nonzero(test).flatten()


def variables_of(handle: ModelHandle) -> tuple[str, ...]:
    """The variables this model's world defines (none for a model without a world)."""
    from workbench.worlds.factworld import FactWorld

    if isinstance(handle.world, FactWorld) and handle.kind == "causal_lm":
        return FACT_VARIABLES
    if handle.kind == "image_classifier" and isinstance(handle.info.get("world"), dict):
        return SCENE_VARIABLES
    return ()


def check_variable(handle: ModelHandle, variable: str) -> None:
    """Refuse a variable the model's world lacks, naming the ones it has."""
    have = variables_of(handle)
    if variable in have:
        return
    if not have:
        raise WorkbenchError(f"{handle.spec} has no world with known variables; causal variables need zoo:factgpt "
                             f"({', '.join(FACT_VARIABLES)}) or zoo:shapesnet ({', '.join(SCENE_VARIABLES)}) or a "
                             "variant of them")
    raise WorkbenchError(f"variable {variable!r} is not in {handle.spec}'s world; choose {' or '.join(have)}")


def world_pairs(handle: ModelHandle, variable: str, *, n: int = 1000, seed: int = 0,
                position: Position | None = None) -> InterchangePairs:
    """`fact_pairs` or `scene_pairs`, whichever the model's world gives `variable`."""
    check_variable(handle, variable)
    if variable in FACT_VARIABLES:
        return fact_pairs(handle, variable, n=n, seed=seed, position=position)
    if position is not None:
        raise WorkbenchError(f"position {position!r} is for token models; a scene variable is read from the whole map")
    return scene_pairs(handle, variable, n=n, seed=seed)


# --- FactGPT ----------------------------------------------------------------------------------------------------


def _subject_last(tokenizer: Any, text: str, subject: str, offset: int) -> int:
    """Index (in `encode_prompt` ids) of the last token overlapping `subject` in `text`."""
    start = text.index(subject)
    end = start + len(subject)
    spans = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    last = max(i for i, (a, _b) in enumerate(spans) if a < end)
    return last + offset


@torch.no_grad()
def _answers(handle: ModelHandle, seqs: list[list[int]], *, batch_size: int = 512) -> torch.Tensor:
    """Argmax next token after each sequence (right padded)."""
    from workbench.tokens import pad_batch, pad_id

    out = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        ids, mask = pad_batch(chunk, pad_id(handle.tokenizer), handle.device)
        logits = handle.model(input_ids=ids, attention_mask=mask).logits
        last = torch.tensor([len(s) - 1 for s in chunk], device=ids.device)
        out.append(logits[torch.arange(len(chunk), device=ids.device), last].argmax(-1).cpu())
    return torch.cat(out)


def fact_pairs(handle: ModelHandle, variable: str, *, n: int = 1000, seed: int = 0,
               position: Position | None = None) -> InterchangePairs:
    """`n` FactGPT pairs for `subject` or `relation`, intervened at the subject's last token or the last token."""
    from workbench.tokens import encode_prompt, prompt_offset
    from workbench.zoo.factgpt import object_token_ids

    check_variable(handle, variable)
    if variable not in FACT_VARIABLES:
        raise WorkbenchError(f"variable {variable!r} is not a FactWorld variable; choose {' or '.join(FACT_VARIABLES)}")
    position = DEFAULT_POSITION[variable] if position is None else position
    if position not in ("subject", "last"):
        raise WorkbenchError(f"position {position!r}: choose subject (the subject's last token) or last")
    if n < 2:
        raise WorkbenchError(f"n={n}: draw at least 2 pairs")
    world, tok = handle.world, handle.tokenizer
    targets = object_token_ids(tok, world)
    rels = [r.relation_id for r in world.relations]
    subjects = list(world.subjects)
    n_templates = {r.relation_id: len(r.templates) for r in world.relations}
    keys = [(s, r, t) for s in subjects for r in rels for t in range(n_templates[r])]
    texts = {k: world.relation(k[1]).templates[k[2]].format(k[0]) for k in keys}
    ids = {k: encode_prompt(tok, texts[k]) for k in keys}
    pred = _answers(handle, [ids[k] for k in keys])
    correct = {k: int(p) == targets[world.object_of(*k[:2])] for k, p in zip(keys, pred)}
    good = [k for k in keys if correct[k]]
    if not good:
        raise WorkbenchError(f"{handle.spec} answers none of its world's facts; causal variables need a trained FactGPT")
    offset = prompt_offset(tok, texts[keys[0]])

    def pos(k: tuple[str, str, int]) -> int:
        return _subject_last(tok, texts[k], k[0], offset) if position == "subject" else len(ids[k]) - 1

    rng = random.Random(f"fact-pairs:{variable}:{seed}")
    chosen: list[tuple[tuple[str, str, int], tuple[str, str, int], str]] = []
    tries = 0
    while len(chosen) < n and tries < 200 * n:
        tries += 1
        b = rng.choice(good)
        s_b, r_b, t_b = b
        if variable == "subject":
            s_s = rng.choice(subjects)
            r_s = rng.choice(rels)
            src = (s_s, r_s, rng.randrange(n_templates[r_s]))
            cf_key = (s_s, r_b, t_b)
            cf = world.object_of(s_s, r_b)
        else:
            r_s = rng.choice([r for r in rels if r != r_b]) if len(rels) > 1 else r_b
            s_s = rng.choice(subjects)
            src = (s_s, r_s, rng.randrange(n_templates[r_s]))
            cf_key = (s_b, r_s, src[2])
            cf = world.object_of(s_b, r_s)
        if s_s == s_b or (variable == "relation" and r_s == r_b):
            continue
        if cf == world.object_of(s_b, r_b) or not correct[src] or not correct[cf_key]:
            continue
        chosen.append((b, src, cf))
    if len(chosen) < n:
        raise WorkbenchError(f"found only {len(chosen)} of {n} {variable} pairs the model answers right; ask for fewer")
    value_names = tuple(subjects) if variable == "subject" else tuple(rels)
    value = (lambda k: subjects.index(k[0])) if variable == "subject" else (lambda k: rels.index(k[1]))
    label_names = {targets[o]: o for o in world.objects}
    return InterchangePairs(
        variable=variable, kind="tokens",
        base=[ids[b] for b, _s, _c in chosen], source=[ids[s] for _b, s, _c in chosen],
        base_positions=torch.tensor([pos(b) for b, _s, _c in chosen]),
        source_positions=torch.tensor([pos(s) for _b, s, _c in chosen]),
        base_labels=torch.tensor([targets[world.object_of(*b[:2])] for b, _s, _c in chosen]),
        counterfactual_labels=torch.tensor([targets[c] for _b, _s, c in chosen]),
        base_values=torch.tensor([value(b) for b, _s, _c in chosen]),
        source_values=torch.tensor([value(s) for _b, s, _c in chosen]),
        groups=torch.tensor([subjects.index(b[0]) for b, _s, _c in chosen]),
        value_names=value_names, label_names=label_names,
        meta={"world": "factworld", "position": position, "seed": seed,
              "prompts_answered": round(len(good) / len(keys), 4),
              "examples": [{"base": texts[b], "source": texts[s], "counterfactual": c} for b, s, c in chosen[:3]]},
    )


# --- ShapesNet --------------------------------------------------------------------------------------------------


def scene_pairs(handle: ModelHandle, variable: str, *, n: int = 1000, seed: int = 0,
                max_draws: int = 40) -> InterchangePairs:
    """`n` ShapesNet pairs for `shape` or `colour` whose counterfactual scene changes the model's answer."""
    from workbench.classifier import predict
    from workbench.worlds.scene import PALETTE
    from workbench.zoo.shapesnet import world_of

    check_variable(handle, variable)
    if variable not in SCENE_VARIABLES:
        raise WorkbenchError(f"variable {variable!r} is not a ShapesWorld variable; choose {' or '.join(SCENE_VARIABLES)}")
    if n < 2:
        raise WorkbenchError(f"n={n}: draw at least 2 pairs")
    world = world_of(handle)
    g = torch.Generator().manual_seed(seed)
    # Colours drawn uniformly, so red (the spurious colour) meets every shape; shapes in the natural distribution.
    color_mode = "uniform" if variable == "colour" else "natural"
    chunk = max(64, 2 * n)
    kept: dict[str, list[torch.Tensor]] = {k: [] for k in ("base", "source", "base_pred", "cf_pred", "bv", "sv", "truth")}
    total = 0
    for _ in range(max_draws):
        base = world.sample(chunk, generator=g, color_mode=color_mode)
        source = world.sample(chunk, generator=g, color_mode=color_mode)
        if variable == "shape":
            weights = base.scene.shape_weights.clone()
            weights[:, 0] = source.scene.shape_weights[:, 0]
            cf_scene = base.scene.replace(shape_weights=weights)
            bv, sv = base.labels, source.labels
        else:
            color = base.scene.color.clone()
            color[:, 0] = source.scene.color[:, 0]
            cf_scene = base.scene.replace(color=color)
            bv, sv = base.colors, source.colors
        images_b, images_s = world.render(base.scene), world.render(source.scene)
        images_cf = world.render(cf_scene)
        pred_b, _ = predict(handle, images_b)
        pred_s, _ = predict(handle, images_s)
        pred_cf, _ = predict(handle, images_cf)
        pred_b, pred_s, pred_cf = pred_b.cpu(), pred_s.cpu(), pred_cf.cpu()
        keep = (pred_cf != pred_b) & (bv != sv)
        if variable == "shape":
            keep &= (pred_b == base.labels) & (pred_s == source.labels)
        rows = torch.nonzero(keep).flatten()
        kept["base"].append(images_b[rows])
        kept["source"].append(images_s[rows])
        kept["base_pred"].append(pred_b[rows])
        kept["cf_pred"].append(pred_cf[rows])
        kept["bv"].append(bv[rows])
        kept["sv"].append(sv[rows])
        kept["truth"].append((sv if variable == "shape" else base.labels)[rows])
        total += len(rows)
        if total >= n:
            break
    if total < n:
        raise WorkbenchError(f"found only {total} of {n} {variable} pairs that change {handle.spec}'s answer; ask for fewer")
    cat = {k: torch.cat(v)[:n] for k, v in kept.items()}
    names = tuple(world.classes) if variable == "shape" else tuple(PALETTE)
    return InterchangePairs(
        variable=variable, kind="tensors", base=cat["base"], source=cat["source"],
        base_labels=cat["base_pred"], counterfactual_labels=cat["cf_pred"],
        base_values=cat["bv"], source_values=cat["sv"], groups=torch.arange(n),
        value_names=names, label_names=dict(enumerate(world.classes)),
        meta={"world": "shapesworld", "position": "pooled", "seed": seed, "color_mode": color_mode,
              # how often the model's counterfactual answer is the world's label for that scene
              "counterfactual_is_world_label": round(float((cat["cf_pred"] == cat["truth"]).float().mean()), 4)},
    )


__all__ = [
    "DEFAULT_POSITION",
    "FACT_VARIABLES",
    "SCENE_VARIABLES",
    "InterchangePairs",
    "check_variable",
    "fact_pairs",
    "scene_pairs",
    "variables_of",
    "world_pairs",
]
