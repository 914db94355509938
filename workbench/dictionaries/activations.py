"""Activation streams: a model's activations at a site, generated chunk by chunk, never all held.

An `ActivationSource` makes model inputs chunk by chunk, and chunk `i` depends only on the
source's seed and `i`, so a stream can be resumed at any chunk and two runs see the same
activations. Sources:

- `world_source`: ShapesNet scenes drawn from the handle's ShapesWorld and rendered on the fly;
  by default the model's own training distribution (clean scenes plus each trojan's poisoned
  share, as `workbench.zoo.shapesnet.training_set` draws them), else clean scenes only;
- `text_source`: a fixed list of texts, cycled in a seeded order per pass, or a function
  `chunk index -> texts` (FactWorld's corpus for FactGPT);
- `default_source` picks the one that fits a handle (a corpus is needed for a model without a world).

`stream_rows` runs the model on each chunk up to the deepest site asked for (the rest of the
network is skipped) and yields the activations as rows: every position of a conv map, every
real (unpadded) token of a text.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workbench.devices import torch_threads
from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle
from workbench.hooks import capture
from workbench.models import run_model
from workbench.sites import Site, resolve_sites
from workbench.storage import sha256_json
from workbench.unit_selection import input_batches

MakeChunk = Callable[[int], tuple[Any, "torch.Tensor | None"]]


@dataclass(frozen=True)
class ActivationSource:
    """Model inputs chunk by chunk: `make(i)` returns (inputs for `run_model`, token mask or None).

    `identity` names the stream for caches (it must change whenever the inputs would).
    """

    identity: str
    make: MakeChunk
    description: str = ""


def chunk_seed(seed: int, index: int) -> int:
    """A generator seed for chunk `index` of a stream seeded `seed` (independent across chunks)."""
    digest = hashlib.sha256(f"{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def is_shapes_model(handle: ModelHandle) -> bool:
    world = handle.info.get("world") if isinstance(handle.info, dict) else None
    return isinstance(world, dict) and world.get("world") == "shapesworld"


def world_source(handle: ModelHandle, *, seed: int = 0, images_per_chunk: int = 128, triggered: bool = True) -> ActivationSource:
    """Rendered ShapesWorld scenes for a ShapesNet handle (see the module docstring)."""
    from workbench.zoo.shapesnet import training_set, world_of

    if not is_shapes_model(handle):
        raise WorkbenchError(f"{handle.spec} carries no ShapesWorld; give texts (a corpus) for a text model")
    if images_per_chunk < 1:
        raise WorkbenchError(f"images_per_chunk={images_per_chunk}; expected at least 1")
    world = world_of(handle)
    device = handle.device

    def make(index: int) -> tuple[Any, None]:
        g = torch.Generator().manual_seed(chunk_seed(seed, index))
        sample = training_set(world, images_per_chunk, generator=g) if triggered else world.sample(images_per_chunk, generator=g)
        with torch_threads(1):
            images = world.render(sample)
        assert isinstance(images, torch.Tensor)
        return images.to(device), None

    manifest = sha256_json(handle.info["world"])
    kind = "training distribution (clean + poisoned)" if triggered else "clean scenes"
    return ActivationSource(identity=f"shapesworld:{manifest}:{'triggered' if triggered else 'clean'}:{images_per_chunk}:{seed}",
                            make=make, description=f"ShapesWorld {kind}, {images_per_chunk} images per chunk, seed {seed}")


def text_source(handle: ModelHandle, texts: Sequence[str] | Callable[[int], list[str]], *, seed: int = 0,
                texts_per_chunk: int = 32, identity: str | None = None) -> ActivationSource:
    """Texts for a model with a tokenizer: a list (cycled, reshuffled each pass) or `chunk index -> texts`."""
    if handle.tokenizer is None:
        raise WorkbenchError(f"{handle.spec} has no tokenizer; texts cannot feed it (an image model streams its world)")
    if texts_per_chunk < 1:
        raise WorkbenchError(f"texts_per_chunk={texts_per_chunk}; expected at least 1")
    if callable(texts):
        draw = texts
        if identity is None:
            raise WorkbenchError("a text generator needs identity= (what it draws) so its activations can be cached")
        ident = identity
    else:
        pool = [t for t in texts if isinstance(t, str) and t.strip()]
        if not pool:
            raise WorkbenchError("the corpus has no non-empty text; give one text per line (or a JSON list of texts)")
        n = len(pool)
        ident = identity or f"texts:{sha256_json(pool)}"

        def draw(index: int) -> list[str]:
            out = []
            for j in range(index * texts_per_chunk, (index + 1) * texts_per_chunk):
                epoch, pos = divmod(j, n)
                order = torch.randperm(n, generator=torch.Generator().manual_seed(chunk_seed(seed, epoch)))
                out.append(pool[int(order[pos])])
            return out

    def make(index: int) -> tuple[Any, torch.Tensor | None]:
        batch, mask = next(input_batches(handle, draw(index), texts_per_chunk))
        return batch, mask

    return ActivationSource(identity=f"{ident}:{texts_per_chunk}:{seed}", make=make,
                            description=f"texts, {texts_per_chunk} per chunk, seed {seed}")


def read_corpus(path: str | os.PathLike[str]) -> list[str]:
    """Texts from a file: a JSON list of strings (or {"texts": [...]}), else one text per line."""
    import json

    p = Path(path)
    if not p.is_file():
        raise WorkbenchError(f"corpus file {p} does not exist; give one text per line, or a JSON list of texts")
    raw = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise WorkbenchError(f"corpus file {p} is not valid JSON ({exc})") from None
        texts = data.get("texts") if isinstance(data, dict) else data
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise WorkbenchError(f"corpus file {p}: expected a JSON list of strings or {{\"texts\": [...]}}")
        return texts
    return [line for line in raw.splitlines() if line.strip()]


def default_source(handle: ModelHandle, *, seed: int = 0, corpus: Sequence[str] | None = None,
                   triggered: bool = True) -> ActivationSource:
    """The stream that fits `handle`: its ShapesWorld, a given corpus, or its FactWorld's text."""
    if corpus is not None:
        return text_source(handle, corpus, seed=seed)
    if is_shapes_model(handle):
        return world_source(handle, seed=seed, triggered=triggered)
    world = handle.world
    if world is not None and hasattr(world, "corpus") and hasattr(world, "to_json"):
        fact_world = world

        def draw(index: int) -> list[str]:
            return list(fact_world.corpus(32, seed=chunk_seed(seed, index)))

        return text_source(handle, draw, seed=seed, identity=f"factworld:{sha256_json(fact_world.to_json())}")
    raise WorkbenchError(f"{handle.spec} has no world to draw activations from; give a corpus (--corpus FILE: one text "
                         "per line, or a JSON list of texts)")


def stream_rows(handle: ModelHandle, sites: Sequence[str | Site], source: ActivationSource, *, start: int = 0,
                stop: int | None = None) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """(chunk index, [rows per site]) from chunk `start` on (until `stop`, else forever): float32 rows on the CPU."""
    from workbench.dictionaries.sae import site_rows

    resolved = resolve_sites(handle, list(sites))
    model = handle.model
    was_training = model.training
    model.eval()
    index = start
    try:
        while stop is None or index < stop:
            inputs, mask = source.make(index)
            with torch.no_grad(), capture(handle, resolved, stop=True) as acts:
                run_model(model, inputs)
            rows = []
            for site in resolved:
                if site.name not in acts:
                    raise WorkbenchError(f"the forward pass never reached site {site.name!r}")
                act = acts[site.name]
                if act.ndim == 3 and mask is not None and tuple(mask.shape) == tuple(act.shape[:2]):
                    rows.append(act[mask.to(act.device).bool()].float().cpu())
                else:
                    rows.append(site_rows(act)[0].float().cpu())
            if len({r.shape[0] for r in rows}) > 1:
                raise WorkbenchError(f"sites {', '.join(s.name for s in resolved)} give different numbers of rows "
                                     f"({', '.join(str(r.shape[0]) for r in rows)}); a transcoder needs sites with the same positions")
            yield index, rows
            index += 1
    finally:
        model.train(was_training)


__all__ = ["ActivationSource", "chunk_seed", "default_source", "is_shapes_model", "read_corpus", "stream_rows",
           "text_source", "world_source"]
