"""Edit requests: what an editor is asked to change, in the CounterFact vocabulary.

A `Rewrite` says "for `subject` under `prompt`, the answer should become `target_new`".
Targets are stored bare (" Paris" is built by `target_text`), as in CounterFact, so records
exported from FactWorld run unchanged in other editing tools.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from workbench.errors import WorkbenchError


def target_text(target: str) -> str:
    """The continuation a causal LM should produce: the bare target with one leading space."""
    return target if target.startswith(" ") else " " + target


@dataclass(frozen=True)
class Rewrite:
    """One requested fact rewrite, plus the prompts that measure it (CounterFact record)."""

    prompt: str  # with "{}" where the subject goes
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: str | int | None = None
    relation_id: str | None = None
    paraphrase_prompts: tuple[str, ...] = field(default_factory=tuple)
    neighborhood_prompts: tuple[str, ...] = field(default_factory=tuple)
    generation_prompts: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if "{}" not in self.prompt:
            raise WorkbenchError(f"prompt {self.prompt!r} has no '{{}}' where the subject goes; "
                                 f"write it like 'The capital of {{}} is'")
        if not self.subject.strip():
            raise WorkbenchError("subject is empty; give the entity whose fact is rewritten")
        if not self.target_new.strip():
            raise WorkbenchError("target_new is empty; give the new answer, e.g. 'Paris'")

    @property
    def text(self) -> str:
        """The rewrite prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    @classmethod
    def from_counterfact(cls, record: Mapping[str, Any]) -> Rewrite:
        """Build from a CounterFact-format record (validate it first with factworld's loader)."""
        rw = record["requested_rewrite"]
        return cls(
            prompt=rw["prompt"],
            subject=rw["subject"],
            target_new=rw["target_new"]["str"],
            target_true=rw.get("target_true", {}).get("str"),
            case_id=record.get("case_id"),
            relation_id=rw.get("relation_id"),
            paraphrase_prompts=tuple(record.get("paraphrase_prompts", ())),
            neighborhood_prompts=tuple(record.get("neighborhood_prompts", ())),
            generation_prompts=tuple(record.get("generation_prompts", ())),
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("paraphrase_prompts", "neighborhood_prompts", "generation_prompts"):
            data[key] = list(data[key])
        return data


def subject_token_span(tokenizer: Any, prompt: str, subject: str) -> tuple[int, int]:
    """Token positions [start, end) of `subject` inside `prompt.format(subject)` (or a full text).

    Uses character offsets, so it is exact for any fast tokenizer; the error shows the
    prompt's tokens when the subject is not there.
    """
    text = prompt.format(subject) if "{}" in prompt else prompt
    start_char = text.find(subject)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    if start_char < 0 or not subject:
        tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"])
        raise WorkbenchError(f"subject {subject!r} is not in the prompt {text!r}; the prompt's tokens are {tokens}")
    end_char = start_char + len(subject)
    positions = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > start_char and a < end_char]
    if not positions:
        tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"])
        raise WorkbenchError(f"subject {subject!r} covers no token of {text!r}; tokens are {tokens}")
    return positions[0], positions[-1] + 1


def target_token_ids(tokenizer: Any, target: str) -> list[int]:
    """Token ids of the target continuation (with its leading space); error if it is empty."""
    if not isinstance(target, str) or not target.strip():
        raise WorkbenchError(f"target {target!r} is empty; give the answer word, e.g. 'Paris'")
    ids = tokenizer(target_text(target), add_special_tokens=False)["input_ids"]
    if not ids:
        raise WorkbenchError(f"target {target!r} tokenizes to nothing; give a word the tokenizer knows")
    return list(ids)


def validate_rewrite(tokenizer: Any, rewrite: Rewrite, *, model: Any = None) -> None:
    """Fail early, with the prompt's tokens, on a subject or target the tokenizer cannot place.

    With `model`, also on a prompt (rewrite, paraphrase or neighbourhood) that, with its longest
    target, has more tokens than the model has positions.
    """
    from workbench.tokens import check_fits, encode_prompt

    subject_token_span(tokenizer, rewrite.prompt, rewrite.subject)
    targets = [target_token_ids(tokenizer, rewrite.target_new)]
    if rewrite.target_true:
        targets.append(target_token_ids(tokenizer, rewrite.target_true))
    if model is None:
        return
    longest = max(len(t) for t in targets)
    prompts = [("the prompt", rewrite.text)]
    prompts += [(f"paraphrase prompt {i}", p) for i, p in enumerate(rewrite.paraphrase_prompts)]
    prompts += [(f"neighborhood prompt {i}", p) for i, p in enumerate(rewrite.neighborhood_prompts)]
    for what, text in prompts:
        check_fits(model, len(encode_prompt(tokenizer, text)) + longest, f"{what} with its target")
