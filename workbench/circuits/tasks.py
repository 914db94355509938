"""What a circuit explains: clean inputs, counterfactual (corrupted) inputs and a metric.

A circuit is found and scored on pairs that differ in one thing: the same prompt with
another subject (FactGPT fact recall: metric = logit of the true object minus the logit of
the other subject's object), the same scene with and without a trojan's trigger (ShapesNet:
metric = the target class's logit), or pairs a user writes in a JSON file. Patching moves
the model from the clean to the corrupted behaviour, so the metric's drop is what a
component carries. Pairs must have the same number of tokens: patching is position by position.

    [{"clean": "The capital of Vel Oran is", "corrupted": "The capital of Tal Mira is",
      "answer": " Quenn", "corrupted_answer": " Filis"}, ...]     (or {"pairs": [...]})
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workbench.errors import CorruptFileError, WorkbenchError
from workbench.handle import ModelHandle
from workbench.tokens import encode_prompt, pad_batch, pad_id

PAIR_KEYS = ("clean", "corrupted", "answer", "corrupted_answer")


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model's output: a tensor, or a transformers output's `.logits`."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise WorkbenchError(f"model returned a {type(output).__name__} without logits; circuits need logits")


@dataclass(frozen=True)
class LogitDifference:
    """Mean over examples of logit(answer) - logit(corrupted answer) at each example's last token."""

    positions: torch.Tensor
    answer: torch.Tensor
    wrong: torch.Tensor

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(logits.shape[0], device=logits.device)
        last = logits[rows, self.positions.to(logits.device)]
        return (last[rows, self.answer.to(logits.device)] - last[rows, self.wrong.to(logits.device)]).mean()


@dataclass(frozen=True)
class ClassLogit:
    """Mean logit of one class (a trojan's target) over the images."""

    target: int

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, self.target].mean()


@dataclass(frozen=True)
class CircuitTask:
    """Clean and corrupted model inputs, aligned example by example, and the metric on logits.

    Inputs are what `workbench.models.run_model` takes: a keyword dict (`input_ids`,
    `attention_mask`, or `inputs_embeds`) for language models, an image tensor for classifiers.
    """

    name: str
    clean: Any
    corrupted: Any
    metric: Any  # logits -> scalar tensor
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Number of example pairs."""
        if isinstance(self.clean, dict):
            return int(next(iter(self.clean.values())).shape[0])
        return int(self.clean.shape[0])


# --- FactGPT fact recall -----------------------------------------------------------------

def facts_task(handle: ModelHandle, *, n: int = 32, seed: int = 0, relation: str | None = None) -> CircuitTask:
    """`n` fact prompts of the model's FactWorld, each beside the same prompt with another subject
    (same template and token count, a different true object)."""
    world = handle.world
    if handle.kind != "causal_lm" or world is None or not hasattr(world, "prompts"):
        what = "an image classifier" if handle.kind == "image_classifier" else f"a {handle.kind} model without a FactWorld"
        raise WorkbenchError(f"the facts task needs a language model trained on a FactWorld (zoo:factgpt); "
                             f"{handle.spec!r} is {what}: use trojan:NAME for a ShapesNet, or a JSON file of pairs")
    if n < 1:
        raise WorkbenchError(f"facts task with n={n}: give at least one example")
    tok = handle.tokenizer
    prompts = [p for p in world.prompts() if relation is None or p.relation_id == relation]
    if not prompts:
        raise WorkbenchError(f"no fact prompts for relation {relation!r}; relations: "
                             f"{', '.join(r.relation_id for r in world.relations)}")
    rng = random.Random(seed)
    order = rng.sample(range(len(prompts)), len(prompts))
    pairs: list[dict[str, str]] = []
    for i in order:
        p = prompts[i]
        template = world.relation(p.relation_id).templates[p.template_index]
        clean_ids = encode_prompt(tok, p.text)
        others = [s for s in world.subjects if world.object_of(s, p.relation_id) != p.target]
        rng.shuffle(others)
        for other in others[:20]:
            text = template.format(other)
            if len(encode_prompt(tok, text)) == len(clean_ids):
                pairs.append({"clean": p.text, "corrupted": text, "answer": " " + p.target,
                              "corrupted_answer": " " + world.object_of(other, p.relation_id),
                              "subject": p.subject, "corrupted_subject": other})
                break
        if len(pairs) == n:
            break
    if not pairs:
        raise WorkbenchError("no fact prompt has a counterfactual subject of the same token length")
    task = pairs_task(handle, pairs, name="facts")
    return CircuitTask(task.name, task.clean, task.corrupted, task.metric,
                       {**task.info, "seed": seed, "relation": relation})


# --- pairs of prompts --------------------------------------------------------------------

def _single_token(tok: Any, text: str, where: str) -> int:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise WorkbenchError(f"{where} {text!r} is {len(ids)} tokens; an answer must be one token (often with a "
                             "leading space, e.g. ' Paris')")
    return int(ids[0])


def pairs_task(handle: ModelHandle, pairs: list[dict[str, str]], *, name: str) -> CircuitTask:
    """A task from prompt pairs (`clean`, `corrupted`, `answer`, `corrupted_answer`)."""
    if handle.kind != "causal_lm" or handle.tokenizer is None:
        raise WorkbenchError(f"prompt pairs need a causal language model with a tokenizer; {handle.spec!r} is a "
                             f"{handle.kind} model (use trojan:NAME for a ShapesNet)")
    if not pairs:
        raise WorkbenchError(f"task {name!r} has no counterfactual pairs; give at least one "
                             '{"clean", "corrupted", "answer", "corrupted_answer"} pair')
    tok = handle.tokenizer
    clean, corrupt, answer, wrong = [], [], [], []
    for i, pair in enumerate(pairs):
        where = f"pair {i}"
        if not isinstance(pair, dict) or any(not isinstance(pair.get(k), str) for k in PAIR_KEYS):
            raise WorkbenchError(f"{where} of task {name!r}: expected an object with string fields "
                                 f"{', '.join(PAIR_KEYS)}")
        a, b = encode_prompt(tok, pair["clean"]), encode_prompt(tok, pair["corrupted"])
        if len(a) != len(b) or not a:
            raise WorkbenchError(f"{where}: the clean prompt is {len(a)} tokens and the corrupted one {len(b)}; "
                                 "patching is position by position, so give prompts of the same token length")
        clean.append(a)
        corrupt.append(b)
        answer.append(_single_token(tok, pair["answer"], f"{where} answer"))
        wrong.append(_single_token(tok, pair["corrupted_answer"], f"{where} corrupted_answer"))
    pad = pad_id(tok)
    device = handle.device
    ids, mask = pad_batch(clean, pad, device)
    cids, cmask = pad_batch(corrupt, pad, device)
    metric = LogitDifference(torch.tensor([len(s) - 1 for s in clean], device=device),
                             torch.tensor(answer, device=device), torch.tensor(wrong, device=device))
    examples = [{k: p[k] for k in PAIR_KEYS} for p in pairs[:5]]
    return CircuitTask(name, {"input_ids": ids, "attention_mask": mask}, {"input_ids": cids, "attention_mask": cmask},
                       metric, {"n": len(pairs), "metric": "logit difference (answer - corrupted answer)",
                                "examples": examples})


def read_pairs(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Prompt pairs from a JSON file: a list of pair objects, or {"pairs": [...]}."""
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkbenchError(f"cannot read the pairs file {file} ({exc}); give a JSON file of prompt pairs") from None
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"{file} is not valid JSON ({exc.msg}, line {exc.lineno}); expected a list of "
                               '{"clean", "corrupted", "answer", "corrupted_answer"} objects') from None
    if isinstance(data, dict):
        data = data.get("pairs")
    if not isinstance(data, list):
        raise WorkbenchError(f"{file}: expected a JSON list of pairs or an object with a 'pairs' list")
    return data


def file_task(handle: ModelHandle, path: str | os.PathLike[str]) -> CircuitTask:
    """A task from a user's JSON file of prompt pairs (an empty file is refused)."""
    pairs = read_pairs(path)
    if not pairs:
        raise WorkbenchError(f"{path} holds no counterfactual pairs; give at least one "
                             '{"clean", "corrupted", "answer", "corrupted_answer"} object')
    task = pairs_task(handle, pairs, name=Path(path).name)
    return CircuitTask(task.name, task.clean, task.corrupted, task.metric, {**task.info, "file": str(path)})


# --- ShapesNet trojans -------------------------------------------------------------------

def trojan_task(handle: ModelHandle, trojan: str, *, n: int = 32, seed: int = 0) -> CircuitTask:
    """`n` scenes with the trojan's trigger (clean: the behaviour to explain) beside the same scenes
    without it (corrupted); metric = the target class's logit."""
    from workbench.worlds.shapesworld import ShapesWorld

    manifest = handle.info.get("world")
    if handle.kind != "image_classifier" or not isinstance(manifest, dict):
        raise WorkbenchError(f"trojan tasks need an image classifier trained on ShapesWorld with trojans "
                             f"(zoo:shapesnet); {handle.spec!r} is a {handle.kind} model: use facts or a JSON file "
                             "of prompt pairs for a language model")
    world = ShapesWorld.from_manifest(manifest)
    names = world.trojans.names
    if trojan not in names:
        raise WorkbenchError(f"unknown trojan {trojan!r}; this model's trojans: {', '.join(names)}")
    if n < 1:
        raise WorkbenchError(f"trojan task with n={n}: give at least one scene")
    index = names.index(trojan)
    t = world.trojans[index]
    target = world.class_index(t.target)
    pool = [c for c in range(len(world.classes)) if c != target] if t.source is None else [world.class_index(t.source)]
    g = torch.Generator().manual_seed(seed)
    scenes = world.sample(n, generator=g, classes=pool)
    triggered = world.implant(scenes, index, generator=g)
    device = handle.device
    clean = world.render(triggered).to(device)
    corrupted = world.render(scenes).to(device)
    return CircuitTask(f"trojan:{trojan}", clean, corrupted, ClassLogit(target),
                       {"n": n, "seed": seed, "trojan": trojan, "target": t.target, "source": t.source,
                        "metric": f"logit of the target class {t.target!r}"})


# --- one entry point ------------------------------------------------------------------------

def task_for(handle: ModelHandle, spec: str, *, n: int = 32, seed: int = 0) -> CircuitTask:
    """`facts`, `trojan:NAME` or a JSON file of prompt pairs, checked against what the model can do."""
    if spec == "facts":
        return facts_task(handle, n=n, seed=seed)
    if spec.startswith("trojan:"):
        return trojan_task(handle, spec.removeprefix("trojan:"), n=n, seed=seed)
    if spec.endswith(".json") or Path(spec).is_file():
        if not Path(spec).is_file():
            raise WorkbenchError(f"task file {spec} does not exist; give facts, trojan:NAME or a JSON file of pairs")
        return file_task(handle, spec)
    raise WorkbenchError(f"unknown task {spec!r}; expected facts, trojan:NAME (e.g. trojan:patch-universal) or a "
                         "JSON file of prompt pairs")
