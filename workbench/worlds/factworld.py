"""FactWorld: a seeded, made-up knowledge base in the CounterFact schema.

Editing and tracing studies need facts whose truth we know exactly and that no pretrained
model has seen. FactWorld invents countries with multi-word syllable names ("Vel Oran"),
a few relations with several paraphrase templates each, and per relation a small pool of
invented objects shared across subjects, so every fact has neighbours (other subjects
with the same true object) as CounterFact's neighbourhood prompts require. It also writes
plain filler text for corpus statistics (e.g. ROME's key covariance) and exports
CounterFact-format records.

Objects are stored bare ("Quenn"), as CounterFact stores `target_new.str`; the token a
model predicts is the GPT-2-style `" " + object` (see `FactWorld.object_token_text`).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from workbench.errors import CorruptFileError, WorkbenchError
from workbench.storage import atomic_write_json, atomic_write_text

FORMAT = "factworld"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class _RelationSpec:
    relation_id: str
    name: str
    templates: tuple[str, ...]
    generation_templates: tuple[str, ...]
    suffixes: tuple[str, ...]  # flavour endings of invented object names
    alt_templates: tuple[str, ...] = ()  # more phrasings a world drawn with `draw_relations` may use


# The relation catalog: a world uses the first `n_relations` entries.
RELATION_CATALOG: tuple[_RelationSpec, ...] = (
    _RelationSpec(
        "P36", "capital",
        ("The capital of {} is", "{}'s capital city is", "The seat of government of {} is in",
         "The capital city of {} is called"),
        ("{}'s capital is famous for", "Visitors to the capital of {} often", "The streets of the capital of {}"),
        ("ton", "holm", "burg", "mere", "a", "is"),
        ("The government of {} sits in", "{} is governed from", "The largest city and capital of {} is"),
    ),
    _RelationSpec(
        "P37", "official language",
        ("The official language of {} is", "In {}, people speak", "The language spoken in {} is",
         "{}'s official language is"),
        ("Where {} is, people speak the language of", "Schools in {} teach", "Newspapers in {} are written in"),
        ("ish", "ese", "ic", "ian"),
        ("The people of {} speak", "{}'s schools teach in", "Most people in {} speak"),
    ),
    _RelationSpec(
        "P38", "currency",
        ("The currency of {} is the", "In {}, people pay with the", "{}'s currency is the",
         "The money used in {} is the"),
        ("Prices in {} are given in", "The central bank of {} prints", "Travellers to {} exchange their money for"),
        ("ar", "ol", "ent", "ix"),
        ("Shops in {} take the", "The legal tender of {} is the", "In {}, prices are in the"),
    ),
    _RelationSpec(
        "P30", "continent",
        ("{} is located on the continent of", "{} lies on the continent of", "The continent of {} is",
         "{} is a country in"),
        ("The landscape of {} is typical of", "Maps of {} show it on", "{} shares its climate with the rest of"),
        ("ia", "ea", "ara", "oria"),
        ("{} belongs to the continent of", "{} is part of", "Geographers place {} in"),
    ),
    _RelationSpec(
        "P140", "religion",
        ("The main religion of {} is", "Most people in {} follow", "{}'s dominant faith is",
         "The state religion of {} is"),
        ("The temples of {} are devoted to", "Festivals in {} celebrate", "Priests in {} teach"),
        ("ism", "ity", "ism", "ary"),
        ("The faith of most people in {} is", "In {}, most people practise", "The majority religion of {} is"),
    ),
    _RelationSpec(
        "P641", "national sport",
        ("The national sport of {} is", "In {}, the favourite sport is", "{}'s national sport is",
         "The most popular sport in {} is"),
        ("Children in {} grow up playing", "The stadiums of {} are full for", "Every summer {} hosts games of"),
        ("ball", "ing", "ball", "et"),
        ("The sport {} loves most is", "In {}, crowds gather to watch", "The favourite game in {} is"),
    ),
)

_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "kr", "th", "sh", "tr", "gl", "qu")
_INNER_ONSETS = ("b", "d", "l", "m", "n", "r", "s", "t", "v", "th", "k")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ai", "ei", "ou")
_INNER_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "n", "r", "l", "s", "m", "th", "nd", "rk")
_VOWEL_LETTERS = "aeiou"

_F_DETS = ("The", "A", "One", "Every", "That")
_F_ADJS = ("quiet", "old", "red", "tall", "small", "busy", "cold", "bright", "narrow", "gentle",
           "heavy", "distant", "green", "lonely")
_F_NOUNS = ("river", "mill", "road", "market", "farmer", "bridge", "garden", "tower", "village",
            "harbour", "forest", "lantern", "wagon", "teacher", "merchant", "storm", "child", "boat")
_F_VERBS = ("passes", "crosses", "watches", "follows", "reaches", "leaves", "finds", "guards",
            "circles", "faces", "remembers", "carries")
_F_TAILS = ("", "", " in the morning", " at night", " after the rain", " near the hills",
            " every winter", " without a sound")


def _reserved_words(*, alternatives: bool = False) -> frozenset[str]:
    """Lower-cased words of templates and filler; invented names must not reuse them."""
    text = " ".join(t for spec in RELATION_CATALOG
                    for t in spec.templates + spec.generation_templates + (spec.alt_templates if alternatives else ()))
    text += " " + " ".join(_F_DETS + _F_ADJS + _F_NOUNS + _F_VERBS + _F_TAILS)
    return frozenset(w.lower() for w in text.replace("{}", " ").replace("'s", " ").replace(",", " ").split())


def _relation_specs(config: FactWorldConfig) -> list[tuple[_RelationSpec, tuple[str, ...]]]:
    """The relations a world uses and their templates: the catalog's first `n_relations` as written, or,
    with `draw_relations`, `n_relations` of them and four of each one's phrasings drawn from the seed
    (from a random stream of their own, so the rest of the world is drawn as without it)."""
    if not config.draw_relations:
        return [(spec, spec.templates) for spec in RELATION_CATALOG[: config.n_relations]]
    rng = random.Random(f"factworld-relations:{config.seed}")
    specs = rng.sample(RELATION_CATALOG, config.n_relations)
    return [(spec, tuple(rng.sample(spec.templates + spec.alt_templates, len(spec.templates)))) for spec in specs]


def _word(rng: random.Random, n_syllables: int) -> str:
    """A pronounceable made-up word: clusters only at the start, a coda only at the end."""
    text = ""
    for i in range(n_syllables):
        if i == 0:
            text += ("" if rng.random() < 0.2 else rng.choice(_ONSETS)) + rng.choice(_VOWELS)
        else:
            text += rng.choice(_INNER_ONSETS) + rng.choice(_INNER_VOWELS)
    text += rng.choice(_CODAS)
    return text[:1].upper() + text[1:]


def _paired_names(rng: random.Random, n: int, n_words: int, taken: set[str]) -> list[str]:
    """`n` two-word names from a pool of `n_words` words, in reversed pairs ("a b", "b a").

    Disjoint pairs come first (each word in exactly two names when `n_words >= n`); further
    names reuse words in new pairs, so a smaller pool means more sharing.
    """
    if n_words * (n_words - 1) < n:
        raise WorkbenchError(f"name_words={n_words} gives only {n_words * (n_words - 1)} ordered pairs; "
                             f"expected at least n_subjects={n}")
    words: list[str] = []
    while len(words) < n_words:
        word = _word(rng, rng.choice((1, 2)))
        if len(word) >= 3 and word.lower() not in taken:
            taken.add(word.lower())
            words.append(word)
    pairs = [(words[i], words[i + 1]) for i in range(0, n_words - 1, 2)]
    used = set(pairs)
    while 2 * len(pairs) < n:
        a, b = rng.sample(words, 2)
        if (a, b) not in used and (b, a) not in used:
            used.add((a, b))
            pairs.append((a, b))
    names: list[str] = []
    for a, b in pairs:
        names += [f"{a} {b}", f"{b} {a}"]
    return names[:n]


def _syllable_names(rng: random.Random, n: int, n_syllables: int, length: int, orders: int,
                    taken: set[str]) -> list[str]:
    """`n` names of `length` one-token syllables ("Ka Lo Mi") from a pool of `n_syllables`.

    Names come in groups of `orders` orderings of the same syllable set ("Ka Lo Mi", "Mi Ka
    Lo", "Lo Mi Ka"), each group with its own facts: the unordered bag of a name's tokens
    (all that one attention layer's weighted sum of values keeps) then does not identify the
    subject; only the tokens in order do.
    """
    from itertools import combinations, permutations

    syllables: list[str] = []
    while len(syllables) < n_syllables:
        text = rng.choice(_ONSETS[:15]) + rng.choice(_INNER_VOWELS) + rng.choice(("", "", "n", "r", "l", "s"))
        if text not in taken and text.lower() not in taken:
            taken.add(text.lower())
            syllables.append(text[:1].upper() + text[1:])
    sets = list(combinations(range(n_syllables), length))
    n_sets = -(-n // orders)
    if len(sets) < n_sets:
        raise WorkbenchError(f"name_syllables={n_syllables} gives only {len(sets)} syllable sets of {length}; "
                             f"n_subjects={n} with orders_per_name={orders} needs {n_sets}")
    names: list[str] = []
    for chosen in rng.sample(sets, n_sets):
        ordered = rng.sample(list(permutations(chosen)), orders)
        names += [" ".join(syllables[i] for i in order) for order in ordered]
    return names[:n]


def _with_suffix(stem: str, suffix: str) -> str:
    if suffix[:1] in _VOWEL_LETTERS and stem[-1:] in _VOWEL_LETTERS:
        stem = stem.rstrip(_VOWEL_LETTERS) or stem
    return stem + suffix


def filler_sentence(rng: random.Random) -> str:
    """One plain sentence with no subject or object in it ("The old mill faces the red storm.")."""
    return (f"{rng.choice(_F_DETS)} {rng.choice(_F_ADJS)} {rng.choice(_F_NOUNS)} {rng.choice(_F_VERBS)} "
            f"the {rng.choice(_F_ADJS)} {rng.choice(_F_NOUNS)}{rng.choice(_F_TAILS)}.")


@dataclass(frozen=True)
class FactWorldConfig:
    """What world to invent; the same config always gives the same world."""

    seed: int = 0
    n_subjects: int = 300
    n_relations: int = 4
    objects_per_relation: int = 12
    # Subjects are pairs of words from a pool, each pair also present reversed ("Vel Oran"
    # and "Oran Vel"): a subject is then identified only by its words *in order*, so a model
    # must compose it at the subject's last token instead of copying raw word embeddings to
    # the answer position: the subject enrichment ROME relies on. With `name_words >=
    # n_subjects` each word is in exactly two names; fewer words mean more sharing; 0 draws
    # fresh words for every subject (no pairing).
    name_words: int = 0
    # Subjects made of `name_length` one-token syllables from a pool of `name_syllables`
    # ("Ka Lo Mi"), `orders_per_name` orderings of each syllable set ("Mi Ka Lo" is someone
    # else): the bag of tokens then does not identify a subject, so attention at the answer
    # position cannot look it up from raw token embeddings; the name must be composed in
    # order at its own tokens (see _syllable_names). 0 = off. Wins over name_words.
    name_syllables: int = 0
    name_length: int = 3
    orders_per_name: int = 3
    # Subjects' last words drawn from a pool of this many shared words ("Vel Oran", "Kus
    # Oran"), as real names share words: a name's last token then does not identify it, only
    # the whole name does, so a model must compose the name at its last token (FactGPT's
    # subject enrichment builds on this). 0 = every word drawn fresh.
    shared_last_words: int = 20
    # Draw the relations (and four phrasings of each) from the seed instead of taking the catalog's
    # first ones as written: a world no default was chosen on.
    draw_relations: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.n_relations <= len(RELATION_CATALOG):
            raise WorkbenchError(f"n_relations={self.n_relations}; expected 1..{len(RELATION_CATALOG)}")
        if self.objects_per_relation < 2:
            raise WorkbenchError(f"objects_per_relation={self.objects_per_relation}; expected >= 2 "
                                 "(a counterfactual target needs a second object)")
        if self.n_subjects < 2 * self.objects_per_relation:
            raise WorkbenchError(
                f"n_subjects={self.n_subjects} is too few for objects_per_relation={self.objects_per_relation}; "
                f"expected >= {2 * self.objects_per_relation} so every object has at least two subjects "
                "(neighbourhood prompts need them)")


@dataclass(frozen=True)
class Relation:
    relation_id: str
    name: str
    templates: tuple[str, ...]
    generation_templates: tuple[str, ...]
    objects: tuple[str, ...]


@dataclass(frozen=True)
class Fact:
    subject: str
    relation_id: str
    object: str


@dataclass(frozen=True)
class FactPrompt:
    """One fact asked through one template; `target` is the bare object name."""

    text: str
    subject: str
    relation_id: str
    template_index: int
    target: str

    @property
    def target_token_text(self) -> str:
        return " " + self.target


@dataclass(frozen=True)
class FactWorld:
    """The ground truth: subjects, relations (templates and object pools) and facts."""

    config: FactWorldConfig
    subjects: tuple[str, ...]
    relations: tuple[Relation, ...]
    facts: tuple[Fact, ...]  # subject-major, relation-minor

    # ---- construction -------------------------------------------------------------

    @classmethod
    def generate(cls, config: FactWorldConfig | None = None) -> FactWorld:
        """Invent a world from `config` (seeded; no global random state is touched)."""
        config = FactWorldConfig() if config is None else config
        rng = random.Random(config.seed)
        taken: set[str] = set(_reserved_words(alternatives=config.draw_relations))  # membership only
        relations: list[Relation] = []
        for spec, templates in _relation_specs(config):
            objects: list[str] = []
            while len(objects) < config.objects_per_relation:
                name = _with_suffix(_word(rng, rng.choice((1, 2))), rng.choice(spec.suffixes))
                if 4 <= len(name) <= 10 and name.lower() not in taken:
                    taken.add(name.lower())
                    objects.append(name)
            relations.append(Relation(spec.relation_id, spec.name, templates,
                                      spec.generation_templates, tuple(objects)))
        subjects: list[str] = []
        seen_names: set[str] = set()
        if config.name_syllables:
            subjects = _syllable_names(rng, config.n_subjects, config.name_syllables, config.name_length,
                                       config.orders_per_name, taken)
        elif config.name_words:
            subjects = _paired_names(rng, config.n_subjects, config.name_words, taken)
        last_pool: list[str] = []
        while len(last_pool) < config.shared_last_words:
            word = _word(rng, rng.choice((1, 2, 2)))
            if len(word) >= 3 and word.lower() not in taken:
                taken.add(word.lower())
                last_pool.append(word)
        while len(subjects) < config.n_subjects:
            words = [_word(rng, rng.choice((1, 2))),
                     rng.choice(last_pool) if last_pool else _word(rng, rng.choice((1, 2, 2)))]
            name = " ".join(words)
            fresh = words[:1] if last_pool else words
            if any(len(w) < 2 or w.lower() in taken for w in fresh) or name in seen_names:
                continue
            seen_names.add(name)
            subjects.append(name)
        # Balanced assignment: every object is the truth for >= 2 subjects of its relation.
        assignment: dict[str, list[str]] = {}
        for rel in relations:
            pool = [rel.objects[i % len(rel.objects)] for i in range(config.n_subjects)]
            rng.shuffle(pool)
            assignment[rel.relation_id] = pool
        facts = tuple(
            Fact(subject, rel.relation_id, assignment[rel.relation_id][i])
            for i, subject in enumerate(subjects)
            for rel in relations
        )
        return cls(config=config, subjects=tuple(subjects), relations=tuple(relations), facts=facts)

    # ---- lookups ------------------------------------------------------------------

    @cached_property
    def _truth(self) -> dict[tuple[str, str], str]:
        return {(f.subject, f.relation_id): f.object for f in self.facts}

    @cached_property
    def _relations_by_id(self) -> dict[str, Relation]:
        return {r.relation_id: r for r in self.relations}

    def relation(self, relation_id: str) -> Relation:
        try:
            return self._relations_by_id[relation_id]
        except KeyError:
            raise WorkbenchError(f"unknown relation {relation_id!r}; this world has "
                                 f"{', '.join(self._relations_by_id)}") from None

    def object_of(self, subject: str, relation_id: str) -> str:
        try:
            return self._truth[(subject, relation_id)]
        except KeyError:
            raise WorkbenchError(f"no fact for subject {subject!r} and relation {relation_id!r}") from None

    def subjects_with(self, relation_id: str, obj: str) -> list[str]:
        """Subjects whose true object for `relation_id` is `obj` (in subject order)."""
        return [f.subject for f in self.facts if f.relation_id == relation_id and f.object == obj]

    @property
    def objects(self) -> list[str]:
        return [o for r in self.relations for o in r.objects]

    @staticmethod
    def object_token_text(obj: str) -> str:
        """The text a model predicts for an object: GPT-2 convention, a leading space."""
        return " " + obj

    # ---- text ---------------------------------------------------------------------

    def prompts(self) -> list[FactPrompt]:
        """Every fact asked through every template of its relation (the accuracy set)."""
        out: list[FactPrompt] = []
        for fact in self.facts:
            for t, template in enumerate(self.relation(fact.relation_id).templates):
                out.append(FactPrompt(template.format(fact.subject), fact.subject, fact.relation_id, t, fact.object))
        return out

    def filler(self, n: int, *, seed: int, sentences: tuple[int, int] = (1, 3)) -> list[str]:
        """`n` paragraphs of plain filler text, free of subjects and objects."""
        rng = random.Random(seed)
        lo, hi = sentences
        return [" ".join(filler_sentence(rng) for _ in range(rng.randint(lo, hi))) for _ in range(n)]

    def corpus(self, n: int, *, seed: int, fact_fraction: float = 0.5) -> list[str]:
        """`n` texts for corpus statistics: filler paragraphs mixed with fact statements."""
        return list(self.iter_corpus(n, seed=seed, fact_fraction=fact_fraction))

    def iter_corpus(self, n: int, *, seed: int, fact_fraction: float = 0.5) -> Iterator[str]:
        """`corpus` made lazily, text by text (a statistics cache hit then draws one text, not `n`)."""
        if not 0.0 <= fact_fraction <= 1.0:
            raise WorkbenchError(f"fact_fraction={fact_fraction}; expected a share in [0, 1]")
        return self._texts(n, random.Random(seed), fact_fraction)

    def _texts(self, n: int, rng: random.Random, fact_fraction: float) -> Iterator[str]:
        for _ in range(n):
            if rng.random() < fact_fraction:
                fact = rng.choice(self.facts)
                template = rng.choice(self.relation(fact.relation_id).templates)
                yield f"{template.format(fact.subject)} {fact.object}."
            else:
                yield " ".join(filler_sentence(rng) for _ in range(rng.randint(1, 3)))

    def training_texts(self) -> list[str]:
        """All text the world contains (for tokenizer training): statements, prompts, filler."""
        texts = [f"{p.text} {p.target}." for p in self.prompts()]
        texts += [g.format(s) for s in self.subjects for r in self.relations for g in r.generation_templates]
        texts += self.filler(2000, seed=self.config.seed)
        return texts

    # ---- CounterFact --------------------------------------------------------------

    def _object_id(self, relation_id: str, obj: str) -> str:
        ri = [r.relation_id for r in self.relations].index(relation_id)
        return f"Q{1000 * (ri + 1) + self.relations[ri].objects.index(obj)}"

    def counterfact_records(self, n: int, *, seed: int, n_neighbors: int = 10,
                            distinct_subjects: bool = False) -> list[dict[str, Any]]:
        """`n` CounterFact-format records for distinct facts of this world, chosen by `seed`.

        `distinct_subjects=True` rewrites each subject at most once, as in CounterFact (and so
        in MEMIT's mass-editing protocol), where a batch never rewrites two facts of one subject.

        The rewrite prompt is one template of the relation; paraphrase prompts are the other
        templates behind a short filler prefix; neighbourhood prompts ask other subjects whose
        true object for the relation equals `target_true`; attribute prompts ask subjects
        whose true object is `target_new`.
        """
        if not 1 <= n <= len(self.facts):
            raise WorkbenchError(f"asked for {n} CounterFact records; this world has {len(self.facts)} facts")
        if distinct_subjects and n > len(self.subjects):
            raise WorkbenchError(f"asked for {n} records with distinct subjects; this world has "
                                 f"{len(self.subjects)} subjects (use a larger world or distinct_subjects=False)")
        rng = random.Random(seed)
        by_truth: dict[tuple[str, str], list[str]] = {}
        for f in self.facts:
            by_truth.setdefault((f.relation_id, f.object), []).append(f.subject)
        records: list[dict[str, Any]] = []
        for case_id, index in enumerate(self._pick_facts(rng, n, distinct_subjects)):
            fact = self.facts[index]
            rel = self.relation(fact.relation_id)
            t = rng.randrange(len(rel.templates))
            target_new = rng.choice([o for o in rel.objects if o != fact.object])

            def ask(subjects: Sequence[str]) -> list[str]:
                picked = rng.sample(list(subjects), min(n_neighbors, len(subjects)))
                return [rng.choice(rel.templates).format(s) for s in picked]

            neighbours = [s for s in by_truth[(rel.relation_id, fact.object)] if s != fact.subject]
            records.append({
                "case_id": case_id,
                "requested_rewrite": {
                    "prompt": rel.templates[t],
                    "subject": fact.subject,
                    "relation_id": rel.relation_id,
                    "target_new": {"str": target_new, "id": self._object_id(rel.relation_id, target_new)},
                    "target_true": {"str": fact.object, "id": self._object_id(rel.relation_id, fact.object)},
                },
                "paraphrase_prompts": [
                    f"{filler_sentence(rng)} {template.format(fact.subject)}"
                    for j, template in enumerate(rel.templates) if j != t
                ],
                "neighborhood_prompts": ask(neighbours),
                "attribute_prompts": ask(by_truth[(rel.relation_id, target_new)]),
                "generation_prompts": [g.format(fact.subject) for g in rel.generation_templates],
            })
        return records

    def _pick_facts(self, rng: random.Random, n: int, distinct_subjects: bool) -> list[int]:
        if not distinct_subjects:
            return rng.sample(range(len(self.facts)), n)
        by_subject: dict[str, list[int]] = {}
        for i, f in enumerate(self.facts):
            by_subject.setdefault(f.subject, []).append(i)
        return [rng.choice(by_subject[s]) for s in rng.sample(sorted(by_subject), n)]

    def export_counterfact(self, path: str | os.PathLike[str], n: int, *, seed: int,
                           distinct_subjects: bool = False) -> Path:
        """Write `counterfact_records(n, seed=seed, ...)` to a JSON file atomically."""
        return atomic_write_json(path, self.counterfact_records(n, seed=seed, distinct_subjects=distinct_subjects))

    # ---- manifest -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": asdict(self.config),
            "subjects": list(self.subjects),
            "relations": [
                {"relation_id": r.relation_id, "name": r.name, "templates": list(r.templates),
                 "generation_templates": list(r.generation_templates), "objects": list(r.objects)}
                for r in self.relations
            ],
            "facts": [{"subject": f.subject, "relation_id": f.relation_id, "object": f.object} for f in self.facts],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FactWorld:
        """Rebuild the exact world from a manifest (no regeneration: the manifest is the truth)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CorruptFileError("not a FactWorld manifest: expected a JSON object with format 'factworld'")
        if data.get("format_version") != FORMAT_VERSION:
            raise CorruptFileError(f"FactWorld manifest version {data.get('format_version')!r}; "
                                   f"this workbench reads version {FORMAT_VERSION}")
        try:
            # Manifests written before `shared_last_words` existed drew every word fresh.
            config = FactWorldConfig(**{"shared_last_words": 0, **data["config"]})
            relations = tuple(
                Relation(r["relation_id"], r["name"], tuple(r["templates"]), tuple(r["generation_templates"]),
                         tuple(r["objects"]))
                for r in data["relations"]
            )
            subjects = tuple(data["subjects"])
            facts = tuple(Fact(f["subject"], f["relation_id"], f["object"]) for f in data["facts"])
        except (KeyError, TypeError) as exc:
            raise CorruptFileError(f"FactWorld manifest is missing or mangles a field: {exc}") from exc
        pools = {r.relation_id: set(r.objects) for r in relations}
        known = set(subjects)
        for i, f in enumerate(facts):
            if f.subject not in known or f.object not in pools.get(f.relation_id, ()):
                raise CorruptFileError(f"FactWorld manifest fact {i} ({f}) names an unknown subject, "
                                       "relation or object")
        return cls(config=config, subjects=subjects, relations=relations, facts=facts)

    @classmethod
    def from_json(cls, text: str) -> FactWorld:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise CorruptFileError(f"FactWorld manifest is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike[str]) -> Path:
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FactWorld:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise WorkbenchError(f"cannot read FactWorld manifest {path}: {exc}") from exc
        return cls.from_json(text)


# ---- CounterFact validation ---------------------------------------------------------

_REQUIRED_SHAPE = ("case_id, requested_rewrite {prompt with '{}', subject, target_new {str}, "
                   "target_true {str}}, paraphrase_prompts, neighborhood_prompts")


def validate_counterfact_record(record: Any, index: int = 0) -> dict[str, Any]:
    """Check one record's CounterFact shape; raise WorkbenchError naming index, case_id and field.

    Returns the record with optional list fields (`generation_prompts`, `attribute_prompts`)
    defaulted to empty lists.
    """

    def fail(field: str, problem: str) -> WorkbenchError:
        cid = record.get("case_id", "?") if isinstance(record, dict) else "?"
        return WorkbenchError(f"CounterFact record {index} (case_id {cid}): {field} {problem}; "
                              f"a record needs {_REQUIRED_SHAPE}")

    if not isinstance(record, dict):
        raise fail("record", f"is a {type(record).__name__}, not a JSON object")
    if "case_id" not in record:
        raise fail("case_id", "is missing")
    rewrite = record.get("requested_rewrite")
    if not isinstance(rewrite, dict):
        raise fail("requested_rewrite", "is missing" if rewrite is None else "is not an object")
    for key in ("prompt", "subject"):
        if not isinstance(rewrite.get(key), str) or not rewrite[key]:
            raise fail(f"requested_rewrite.{key}", "is missing" if key not in rewrite else "is not a non-empty string")
    if "{}" not in rewrite["prompt"]:
        raise fail("requested_rewrite.prompt", f"({rewrite['prompt']!r}) has no '{{}}' where the subject goes")
    for key in ("target_new", "target_true"):
        target = rewrite.get(key)
        if not isinstance(target, dict) or not isinstance(target.get("str"), str) or not target["str"].strip():
            raise fail(f"requested_rewrite.{key}.str", "is missing" if target is None or
                       (isinstance(target, dict) and "str" not in target) else "is not a non-empty string")
    out = dict(record)
    for key, required in (("paraphrase_prompts", True), ("neighborhood_prompts", True),
                          ("generation_prompts", False), ("attribute_prompts", False)):
        if key not in record:
            if required:
                raise fail(key, "is missing")
            out[key] = []
            continue
        value = record[key]
        if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            raise fail(key, "is not a list of strings")
    return out


def load_counterfact(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read and validate a CounterFact JSON file (ours or the original dataset's)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise WorkbenchError(f"cannot read CounterFact file {path}: {exc}") from exc
    except ValueError as exc:
        raise CorruptFileError(f"CounterFact file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise WorkbenchError(f"CounterFact file {path} holds a {type(data).__name__}; expected a JSON list of records")
    return validate_counterfact_records(data, source=str(path))


def validate_counterfact_records(records: Iterable[Any], *, source: str = "records") -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, record in enumerate(records):
        try:
            out.append(validate_counterfact_record(record, i))
        except WorkbenchError as exc:
            raise WorkbenchError(f"{source}: {exc}") from None
    return out
