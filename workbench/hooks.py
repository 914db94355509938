"""Capture, patch and edit activations with hooks that never outlive their `with` block.

    with capture(h, ["blocks.3.hook_resid_post", "blocks.3.mlp.hook_post"]) as acts:
        h.model(**batch)                       # one forward pass fills every site
    with patch(h, {"blocks.3.mlp.hook_out": clean_act}, positions=[4, 5]):
        logits = h.model(**corrupt).logits     # restore two positions

Sites are canonical names, module names (`MODULE:input` for the input side) or `Site`s.
Recording (`capture`, `Recorder`, `run_with_cache`) also takes a predicate over the model's
site names, like TransformerLens's names filter:
`capture(h, lambda name: name.endswith("hook_resid_post"))`. A `patch` or `edit` function
written `fn(act, *, site)` is told which `Site` it runs at, so one function can serve many
sites. `Recorder` keeps its hooks across many forward passes (an optimization loop) and can
cut each pass once every site is recorded.

Every hook is removed in a `finally`, so an exception inside the block (or inside a
hook) leaves the model exactly as it was. A hook that returns its input unchanged
returns `None` to torch, so a no-op patch leaves the outputs bitwise equal.

Modules that return tuples (HF blocks and attention) are handled by acting on element 0,
the hidden state; input-side sites act on positional argument 0, or the `hidden_states`
keyword when the caller passed it by name.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from workbench.errors import WorkbenchError
from workbench.sites import Site, list_sites, model_and_site_map, resolve_site, resolve_sites

if TYPE_CHECKING:
    from workbench.handle import ModelHandle

Target = Union["ModelHandle", nn.Module]
SiteLike = Union[str, Site]
Positions = Union[int, Sequence[int], torch.Tensor, None]
Replacement = Union[torch.Tensor, Callable[..., torch.Tensor]]
SiteFilter = Callable[[str], bool]
Sites = Union[SiteLike, Sequence[SiteLike], SiteFilter]


class _StopForward(Exception):
    """Raised by a recording hook with `stop=True` once every site is filled; caught by its owner."""

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


def matching_sites(target: Target, names_filter: SiteFilter) -> list[Site]:
    """The sites whose name passes `names_filter`, over the model's canonical and module site
    names (`list_sites` order), e.g. `lambda name: name.endswith("mlp.hook_post")`."""
    found = [site for site in list_sites(target) if names_filter(site.name)]
    if not found:
        raise WorkbenchError("no site name passes the filter; `workbench sites MODEL` lists the names")
    return found


def _select(target: Target, sites: Sites) -> tuple[list[str], list[Site]]:
    """Record keys (the names given, or the matching names) and their resolved sites."""
    if callable(sites):
        found = matching_sites(target, sites)
        return [site.name for site in found], found
    names = _as_list(sites)
    return [_key(s) for s in names], resolve_sites(target, names)


def _takes_site(fn: Callable[..., Any]) -> bool:
    """Whether a callback asks for the site it runs at: a `site` parameter after the activation."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    return any(p.name == "site" and (p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and i > 0))
               for i, p in enumerate(params))


def _bind_site(fn: Callable[..., Any], site: Site) -> Callable[[torch.Tensor], Any]:
    if _takes_site(fn):
        return lambda act: fn(act, site=site)
    return fn


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


# --- recording -----------------------------------------------------------------------------

class Recorder:
    """Records the activation at each site on every forward pass while it is entered.

    A persistent `capture`: the hooks are registered once on entering and removed on every
    exit path, so a loop of many forward passes pays for them once. `run(...)` does one
    pass into a fresh `acts` dict; a plain `model(...)` call inside the block records too
    (a later pass overwrites an earlier one). `detach`/`clone` are as for `capture`.
    `stop=True` ends a pass as soon as every site is recorded, skipping the rest of the
    network: `run` then returns None, and a plain call ends the `with` block there.
    """

    def __init__(self, target: Target, sites: Sites, *, detach: bool = True, clone: bool | None = None,
                 stop: bool = False) -> None:
        self.model, _ = model_and_site_map(target)
        self.names, self.sites = _select(target, sites)
        self.detach = detach
        self.clone = detach if clone is None else clone
        self.stop = stop
        self.acts: dict[str, torch.Tensor] = {}
        self.stopped = False
        self._wanted = set(self.names)
        self._handles: list[RemovableHandle] | None = None

    def __enter__(self) -> Recorder:
        if self._handles is not None:
            raise WorkbenchError("this Recorder is already entered; enter it once at a time")
        self._handles = []
        try:
            for key, site in zip(self.names, self.sites):
                self._handles.append(_register(self.model, site, self._recorder(key)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        self._remove()
        return isinstance(exc, _StopForward) and exc.owner is self

    def _remove(self) -> None:
        for handle in self._handles or ():
            handle.remove()
        self._handles = None

    def _recorder(self, key: str) -> Callable[[torch.Tensor], None]:
        def record(act: torch.Tensor) -> None:
            value = act.detach() if self.detach else act
            self.acts[key] = value.clone() if self.clone else value
            if self.stop and self._wanted.issubset(self.acts):
                self.stopped = True
                raise _StopForward(self)

        return record

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """One forward pass of the model into a fresh `acts`; its output, or None when `stop` cut it short."""
        if self._handles is None:
            raise WorkbenchError("Recorder.run needs the recorder entered: `with Recorder(h, sites) as rec:`")
        self.acts = {}
        self.stopped = False
        try:
            return self.model(*args, **kwargs)
        except _StopForward as exc:
            if exc.owner is not self:
                raise
            return None


@contextmanager
def capture(
    target: Target,
    sites: Sites,
    *,
    detach: bool = True,
    clone: bool | None = None,
    stop: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the activation at each site during forward passes run inside the block.

    `sites` is one site, a list, or a predicate over site names. Yields a dict keyed by the
    names given or matched (a later pass overwrites an earlier one). `detach=False` records
    the live tensor, in the autograd graph, so gradients with respect to it can be taken;
    `clone` (default: when detaching) protects the record from later in-place ops; a clone
    of a live tensor is a new graph node that the output does not use. `stop=True` aborts the
    forward pass as soon as every site is filled (saves the rest of the network when
    collecting statistics) and ends the block there: run one forward per block.
    """
    with Recorder(target, sites, detach=detach, clone=clone, stop=stop) as recorder:
        yield recorder.acts


def run_with_cache(target: Target, inputs: Any, sites: Sites, *, detach: bool = True, clone: bool | None = None,
                   stop: bool = False) -> tuple[Any, dict[str, torch.Tensor]]:
    """One forward pass on `inputs` (a keyword dict, a tuple of arguments or one tensor, as
    `models.run_model` takes them) with the activations at `sites` recorded.

    Returns (the model's output, or None when `stop` cut the pass short; acts by name).
    """
    from workbench.models import run_model

    out = None
    with Recorder(target, sites, detach=detach, clone=clone, stop=stop) as recorder:
        out = run_model(recorder.model, inputs)
    return out, recorder.acts


# --- replacing activations ----------------------------------------------------------------

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
    fn = _bind_site(value, site) if callable(value) else None

    def replace(act: torch.Tensor) -> torch.Tensor | None:
        new = fn(act) if fn is not None else value
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
    `act -> new act` that must not modify `act` in place (use `edit` for that); a function
    written `fn(act, *, site)` also gets the `Site` it runs at.
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
def edit(target: Target, edits: Mapping[SiteLike, Callable[..., torch.Tensor | None]]) -> Iterator[None]:
    """Edit activations in place-style: `fn(act)` may modify `act` and return None.

    `fn` gets a private copy of the activation (so writing `act[:, 3] = 0` never corrupts
    a tensor the model still uses elsewhere, such as the residual stream); what it returns,
    or the modified copy when it returns None, replaces the activation. A function written
    `fn(act, *, site)` also gets the `Site` it runs at.
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

    hooks = [(site, _replacer(site, editor(_bind_site(edits[key], site)), None)) for key, site in zip(keys, resolved)]
    with _hooked(model, hooks):
        yield


# --- what a site carries -----------------------------------------------------------------------------

def describe_site(target: ModelHandle | nn.Module, name: str, *, inputs: Any = None) -> dict[str, Any]:
    """Resolve one site and report its module path, side, layer and activation shape.

    The shape comes from one forward pass on `inputs`, or on the handle's dummy input
    (a short tokenized text, or a zeros image) when `inputs` is None.
    """
    from workbench.models import dummy_input

    site = resolve_site(target, name)
    if inputs is None:
        if isinstance(target, nn.Module):
            raise WorkbenchError("describe_site on a bare module needs inputs=...; pass a ModelHandle to use a dummy input")
        inputs = dummy_input(target)
    with torch.no_grad():
        _, acts = run_with_cache(target, inputs, [site], stop=True)
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
