"""Capture, patch and edit activations with hooks that never outlive their `with` block.

    with capture(h, ["blocks.3.hook_resid_post", "blocks.3.mlp.hook_post"]) as acts:
        h.model(**batch)                       # one forward pass fills every site
    with patch(h, {"blocks.3.mlp.hook_out": clean_act}, positions=[4, 5]):
        logits = h.model(**corrupt).logits     # restore two positions

Every hook is removed in a `finally`, so an exception inside the block (or inside a
hook) leaves the model exactly as it was. A hook that returns its input unchanged
returns `None` to torch, so a no-op patch leaves the outputs bitwise equal.

Modules that return tuples (HF blocks and attention) are handled by acting on element 0,
the hidden state; input-side sites act on positional argument 0, or the `hidden_states`
keyword when the caller passed it by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from workbench.errors import WorkbenchError
from workbench.sites import Site, model_and_site_map, resolve_site, resolve_sites

if TYPE_CHECKING:
    from workbench.handle import ModelHandle

Target = Union["ModelHandle", nn.Module]
SiteLike = Union[str, Site]
Positions = Union[int, Sequence[int], torch.Tensor, None]
Replacement = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


class _StopForward(Exception):
    """Raised by a `capture(..., stop=True)` hook once every site is filled; caught on exit."""

    def __init__(self, owner: object) -> None:
        super().__init__("forward pass stopped after the last captured site")
        self.owner = owner


# --- getting at the tensor a module sees or returns --------------------------------------

def _primary(value: Any, site: Site) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if isinstance(value, Mapping) and value:  # transformers ModelOutput
        first = next(iter(value.values()))
        if isinstance(first, torch.Tensor):
            return first
    raise WorkbenchError(
        f"site {site.name!r} ({site.module_path}, {site.side}) carries a {type(value).__name__}, "
        "not a tensor or a tuple starting with one; choose a submodule that returns a tensor"
    )


def _with_primary(value: Any, new: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return new
    if isinstance(value, tuple):
        return (new, *value[1:])
    if isinstance(value, list):
        return [new, *value[1:]]
    key = next(iter(value.keys()))
    value[key] = new  # ModelOutput keeps attribute and item access in sync
    return value


def _input_of(args: tuple[Any, ...], kwargs: dict[str, Any], site: Site) -> tuple[torch.Tensor, int | str]:
    if args:
        return _primary(args[0], site), 0
    if "hidden_states" in kwargs:
        return _primary(kwargs["hidden_states"], site), "hidden_states"
    tensors = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    if len(tensors) == 1:
        return kwargs[tensors[0]], tensors[0]
    raise WorkbenchError(
        f"input-side site {site.name!r}: {site.module_path} was called without a positional input "
        f"or a hidden_states keyword (keywords: {', '.join(kwargs) or 'none'}); use its output side instead"
    )


def _register(model: nn.Module, site: Site, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> RemovableHandle:
    """Hook `fn(act) -> new act | None` onto a site; `None` or `act` itself means unchanged."""
    module = model.get_submodule(site.module_path)
    if site.side == "output":
        def hook(_mod: nn.Module, _args: Any, output: Any) -> Any:
            act = _primary(output, site)
            new = fn(act)
            if new is None or new is act:
                return None
            return _with_primary(output, new)

        return module.register_forward_hook(hook)

    def pre_hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        act, where = _input_of(args, kwargs, site)
        new = fn(act)
        if new is None or new is act:
            return None
        if where == 0:
            return (_with_primary(args[0], new), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs[where] = _with_primary(kwargs[where], new)  # type: ignore[index]
        return args, kwargs

    return module.register_forward_pre_hook(pre_hook, with_kwargs=True)


def _as_list(sites: SiteLike | Sequence[SiteLike]) -> list[SiteLike]:
    if isinstance(sites, (str, Site)):
        return [sites]
    return list(sites)


def _key(site: SiteLike) -> str:
    return site.name if isinstance(site, Site) else site


@contextmanager
def _hooked(model: nn.Module, hooks: list[tuple[Site, Callable[[torch.Tensor], torch.Tensor | None]]]) -> Iterator[None]:
    handles: list[RemovableHandle] = []
    try:
        for site, fn in hooks:
            handles.append(_register(model, site, fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


# --- public context managers -------------------------------------------------------------

@contextmanager
def capture(
    target: Target,
    sites: SiteLike | Sequence[SiteLike],
    *,
    detach: bool = True,
    clone: bool | None = None,
    stop: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the activation at each site during forward passes run inside the block.

    Yields a dict keyed by the names given (a later pass overwrites an earlier one).
    `detach=False` records the live tensor, in the autograd graph, so gradients with respect
    to it can be taken; `clone` (default: when detaching) protects the record from later
    in-place ops; a clone of a live tensor is a new graph node that the output does not use. `stop=True` aborts the
    forward pass as soon as every site is filled (saves the rest of the network when
    collecting statistics) and ends the block there: run one forward per block.
    """
    names = _as_list(sites)
    model, _ = model_and_site_map(target)
    resolved = resolve_sites(target, names)
    keys = [_key(s) for s in names]
    store: dict[str, torch.Tensor] = {}
    token = object()
    wanted = set(keys)
    clone = detach if clone is None else clone

    def recorder(key: str) -> Callable[[torch.Tensor], None]:
        def record(act: torch.Tensor) -> None:
            value = act.detach() if detach else act
            store[key] = value.clone() if clone else value
            if stop and wanted.issubset(store):
                raise _StopForward(token)

        return record

    with _hooked(model, [(site, recorder(key)) for key, site in zip(keys, resolved)]):
        try:
            yield store
        except _StopForward as exc:
            if exc.owner is not token:
                raise


def _position_mask(positions: Positions, act: torch.Tensor) -> torch.Tensor:
    """A bool mask broadcastable to `act`, True at the token positions (dim 1) to replace."""
    if act.ndim < 2:
        raise WorkbenchError(f"positions need an activation with a token axis (dim 1); this one has shape {tuple(act.shape)}")
    batch, seq = act.shape[0], act.shape[1]
    pos = positions if isinstance(positions, torch.Tensor) else torch.as_tensor(positions)
    pos = pos.to(act.device)
    if pos.dtype == torch.bool:
        if pos.shape not in ((seq,), (batch, seq)):
            raise WorkbenchError(f"a boolean positions mask must have shape ({seq},) or ({batch}, {seq}); got {tuple(pos.shape)}")
        mask = pos.expand(batch, seq)
    else:
        idx = pos.reshape(-1).long()
        if idx.numel() and (int(idx.max()) >= seq or int(idx.min()) < -seq):
            raise WorkbenchError(f"positions {idx.tolist()} out of range for a sequence of length {seq}")
        mask = torch.zeros(seq, dtype=torch.bool, device=act.device)
        mask[idx] = True
        mask = mask.expand(batch, seq)
    return mask.reshape(batch, seq, *([1] * (act.ndim - 2)))


def _replacer(site: Site, value: Replacement, positions: Positions) -> Callable[[torch.Tensor], torch.Tensor | None]:
    def replace(act: torch.Tensor) -> torch.Tensor | None:
        new = value(act) if callable(value) else value
        if new is None or new is act:
            return None
        if not isinstance(new, torch.Tensor):
            raise WorkbenchError(f"patch for site {site.name!r} gave a {type(new).__name__}; expected a tensor")
        if new.device != act.device or new.dtype != act.dtype:
            new = new.to(device=act.device, dtype=act.dtype)
        if new.shape != act.shape:
            try:
                new = new.expand_as(act)
            except RuntimeError:
                raise WorkbenchError(
                    f"patch for site {site.name!r} has shape {tuple(new.shape)}, which does not broadcast "
                    f"to the activation's {tuple(act.shape)}"
                ) from None
        if positions is None:
            return new
        return torch.where(_position_mask(positions, act), new, act)

    return replace


@contextmanager
def patch(
    target: Target,
    patches: Mapping[SiteLike, Replacement],
    *,
    positions: Positions = None,
) -> Iterator[None]:
    """Replace activations during forward passes inside the block.

    Each value is a tensor (broadcast to the activation's shape) or a function
    `act -> new act` that must not modify `act` in place (use `edit` for that).
    `positions` (an index, a list of indices, or a bool mask of shape (seq,) or
    (batch, seq)) restricts the replacement to those token positions; elsewhere the
    activation is left bit-for-bit unchanged.
    """
    model, _ = model_and_site_map(target)
    keys = list(patches)
    resolved = resolve_sites(target, keys)
    with _hooked(model, [(site, _replacer(site, patches[key], positions)) for key, site in zip(keys, resolved)]):
        yield


@contextmanager
def edit(target: Target, edits: Mapping[SiteLike, Callable[[torch.Tensor], torch.Tensor | None]]) -> Iterator[None]:
    """Edit activations in place-style: `fn(act)` may modify `act` and return None.

    `fn` gets a private copy of the activation (so writing `act[:, 3] = 0` never corrupts
    a tensor the model still uses elsewhere, such as the residual stream); what it returns,
    or the modified copy when it returns None, replaces the activation.
    """
    model, _ = model_and_site_map(target)
    keys = list(edits)
    resolved = resolve_sites(target, keys)

    def editor(fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(act: torch.Tensor) -> torch.Tensor:
            copy = act.clone()
            out = fn(copy)
            return copy if out is None else out

        return run

    with _hooked(model, [(site, _replacer(site, editor(edits[key]), None)) for key, site in zip(keys, resolved)]):
        yield


# --- what a site carries -----------------------------------------------------------------------------

def describe_site(target: ModelHandle | nn.Module, name: str, *, inputs: Any = None) -> dict[str, Any]:
    """Resolve one site and report its module path, side, layer and activation shape.

    The shape comes from one forward pass on `inputs`, or on the handle's dummy input
    (a short tokenized text, or a zeros image) when `inputs` is None.
    """
    from workbench.models import dummy_input, run_model

    site = resolve_site(target, name)
    model, _ = model_and_site_map(target)
    if inputs is None:
        if isinstance(target, nn.Module):
            raise WorkbenchError("describe_site on a bare module needs inputs=...; pass a ModelHandle to use a dummy input")
        inputs = dummy_input(target)
    with torch.no_grad(), capture(target, [site], stop=True) as acts:
        run_model(model, inputs)
    act = acts.get(site.name)
    return {
        "name": site.name,
        "module_path": site.module_path,
        "side": site.side,
        "layer": site.layer,
        "canonical": site.canonical,
        "shape": list(act.shape) if isinstance(act, torch.Tensor) else None,
        "dtype": str(act.dtype).removeprefix("torch.") if isinstance(act, torch.Tensor) else None,
    }


def site_shape(target: ModelHandle | nn.Module, name: str, *, inputs: Any = None) -> tuple[int, ...]:
    """The activation shape at one site on the dummy input (or `inputs`)."""
    shape = describe_site(target, name, inputs=inputs)["shape"]
    if shape is None:
        raise WorkbenchError(f"site {name!r} produced no tensor on the given input")
    return tuple(shape)
