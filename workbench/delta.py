"""WeightDelta: what every editor produces, applied and reverted bit-exactly.

A delta maps parameter names to changes, dense tensors or low-rank factors `(u, v)` meaning
`u @ v.T` (kept as factors, materialized only when applied). It records two sha256
fingerprints of the model it was fitted on: of the parameters it edits, and of every
parameter and buffer (an edit is computed through the whole model, not only the weight it
changes). `apply` checks both and refuses any other model; deltas saved before the second
fingerprint existed are checked on their edited weights only, with a warning. `revert`
restores saved copies of the originals (subtracting floats is not exact) and checks the
edited weights' fingerprint again, so an edited-then-reverted model is the same bits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.errors import FingerprintMismatchError, WorkbenchError
from workbench.fingerprint import combine_digests, parameter_fingerprint, tensor_digests
from workbench.storage import json_default, load_safetensors_checked, save_safetensors_checked

log = logging.getLogger(__name__)

FORMAT = "workbench.delta"
FORMAT_VERSION = 2  # 2: adds state_fingerprint and checks; version 1 files still load

CHECK_EDITED = "edited_weights"
"""Check: the parameters the delta changes are bit-identical to those it was fitted on."""
CHECK_STATE = "model_state"
"""Check: every parameter and buffer of the model is bit-identical to the model it was fitted on."""


class ModelChangedError(RuntimeError):
    """A block that promised not to change the model (fitting an edit) changed it: a bug."""


@dataclass(frozen=True)
class LowRank:
    """A rank-r change `u @ v.T`; `u` is (rows, r) and `v` is (cols, r) of the parameter."""

    u: torch.Tensor
    v: torch.Tensor

    def __post_init__(self) -> None:
        if self.u.ndim != 2 or self.v.ndim != 2 or self.u.shape[1] != self.v.shape[1]:
            raise WorkbenchError(
                f"low-rank factors must be u (rows, r) and v (cols, r); got {tuple(self.u.shape)} and {tuple(self.v.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.u.shape[0], self.v.shape[0])

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    def materialize(self, *, device: torch.device | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        u = self.u.to(device=device, dtype=dtype)
        v = self.v.to(device=device, dtype=dtype)
        return u @ v.T


Change = torch.Tensor | LowRank


def _as_change(name: str, value: Any) -> Change:
    if isinstance(value, LowRank):
        change: Change = LowRank(value.u.detach(), value.v.detach())
    elif isinstance(value, tuple) and len(value) == 2:
        change = LowRank(value[0].detach(), value[1].detach())
    elif isinstance(value, torch.Tensor):
        change = value.detach()
    else:
        raise WorkbenchError(f"change for {name!r} must be a Tensor or low-rank (u, v) factors, not "
                             f"{type(value).__name__}")
    parts = (change.u, change.v) if isinstance(change, LowRank) else (change,)
    if not all(bool(torch.isfinite(t).all()) for t in parts):
        raise WorkbenchError(f"the change to {name} has NaN or infinite entries (the fit diverged, or a factor or "
                             "strength overflowed the weights' number range); no delta is made of it")
    return change


def _frobenius(change: Change) -> float:
    if isinstance(change, torch.Tensor):
        return float(torch.linalg.vector_norm(change.double()))
    # ||u v^T||_F^2 = trace((u^T u)(v^T v)): no need to materialize the full matrix.
    u, v = change.u.double(), change.v.double()
    return float(torch.sqrt(torch.clamp(torch.sum((u.T @ u) * (v.T @ v)), min=0.0)))


def _jsonable(value: Any, what: str) -> Any:
    """Dataclasses become dicts; anything else must already survive a JSON round trip."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    try:
        return json.loads(json.dumps(value, default=json_default))
    except (TypeError, ValueError) as exc:
        raise WorkbenchError(f"the delta's {what} must be JSON-serializable (it is saved with the delta): {exc}") from exc


@dataclass
class _Applied:
    model: weakref.ref[nn.Module]
    originals: dict[str, torch.Tensor]
    fingerprint_after: str


class WeightDelta:
    """Parameter name -> change, with the metadata needed to apply it only where it belongs.

    Build one with `WeightDelta.from_model(model, changes, method=..., request=...)` while
    the model still has the weights the edit was fitted on. `model_fingerprint` covers the
    edited parameters, `state_fingerprint` the whole model (None in deltas saved before it
    was recorded); `checked` names the checks `apply` makes.
    """

    def __init__(
        self,
        changes: Mapping[str, Any],
        *,
        method: str,
        model_fingerprint: str,
        state_fingerprint: str | None = None,
        request: Any = None,
        created: float | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        if not changes:
            raise WorkbenchError("a WeightDelta needs at least one parameter change")
        self.changes: dict[str, Change] = {name: _as_change(name, changes[name]) for name in sorted(changes)}
        self.method = method
        self.request = _jsonable(request, "request")
        self.model_fingerprint = model_fingerprint
        self.state_fingerprint = state_fingerprint
        self.created = time.time() if created is None else float(created)
        self.extra: dict[str, Any] = _jsonable(dict(extra or {}), "extra")
        self._applied: dict[int, _Applied] = {}
        self._warned_unchecked = False

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        changes: Mapping[str, Any],
        *,
        method: str,
        request: Any = None,
        extra: Mapping[str, Any] | None = None,
        guard: UnchangedGuard | None = None,
    ) -> WeightDelta:
        """A delta fitted on `model` as it is now: its touched parameters and the whole model are fingerprinted.

        `guard`: the `assert_unchanged` block the fit ran in, just ended; its closing check
        hashed this same model, so those digests are used instead of hashing it again.
        """
        params = dict(model.named_parameters())
        unknown = sorted(set(changes) - set(params))
        if unknown:
            raise WorkbenchError(f"model has no parameter(s) {unknown}; e.g. {sorted(params)[:5]}")
        digests = guard.digests if guard is not None and guard.model is model and guard.digests else tensor_digests(model)
        return cls(
            changes,
            method=method,
            request=request,
            model_fingerprint=combine_digests(digests, changes.keys()),
            state_fingerprint=combine_digests(digests),
            extra=extra,
        )

    # --- inspection -------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self.changes)

    @property
    def checked(self) -> tuple[str, ...]:
        """What `apply` verifies: `CHECK_EDITED`, plus `CHECK_STATE` when the whole model was fingerprinted."""
        return (CHECK_EDITED,) if self.state_fingerprint is None else (CHECK_EDITED, CHECK_STATE)

    def dense(self, name: str) -> torch.Tensor:
        """The change to `name` as a full tensor (materializes low-rank factors)."""
        change = self.changes[name]
        return change.materialize() if isinstance(change, LowRank) else change

    def norms(self) -> dict[str, float]:
        """Frobenius norm of each parameter's change (editors log these to catch blow-ups)."""
        return {name: _frobenius(change) for name, change in self.changes.items()}

    def metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "request": self.request,
            "model_fingerprint": self.model_fingerprint,
            "state_fingerprint": self.state_fingerprint,
            "checks": list(self.checked),
            "created": self.created,
            "extra": self.extra,
            "params": {
                name: ("low_rank" if isinstance(c, LowRank) else "dense") for name, c in self.changes.items()
            },
        }

    def __repr__(self) -> str:
        parts = [
            f"{n}: rank {c.rank}" if isinstance(c, LowRank) else f"{n}: dense {tuple(c.shape)}"
            for n, c in self.changes.items()
        ]
        return f"WeightDelta(method={self.method!r}, {', '.join(parts)})"

    # --- application --------------------------------------------------------------------

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(model.named_parameters())
        missing = [n for n in self.changes if n not in params]
        if missing:
            raise FingerprintMismatchError(
                f"this {self.method} delta changes parameter(s) {missing} that the model does not have; "
                "it was fitted on a different architecture"
            )
        return {n: params[n] for n in self.changes}

    def is_applied(self, model: nn.Module) -> bool:
        state = self._applied.get(id(model))
        return state is not None and state.model() is model

    def apply(self, model: nn.Module) -> None:
        """Add the delta to `model` in place; originals are kept so `revert` is bit-exact."""
        if self.is_applied(model):
            raise WorkbenchError(
                f"this {self.method} delta is already applied to this model; revert it before applying again"
            )
        params = self._params(model)
        self.check(model)
        for name, param in params.items():
            want = self.changes[name].shape
            if tuple(want) != tuple(param.shape):
                raise FingerprintMismatchError(f"delta for {name!r} has shape {tuple(want)} but the parameter is {tuple(param.shape)}")
        originals = _add_changes(params, self.changes)
        self._applied[id(model)] = _Applied(weakref.ref(model), originals, parameter_fingerprint(model, params))

    def check(self, model: nn.Module) -> None:
        """Raise `FingerprintMismatchError` unless `model` is the one this delta was fitted on.

        The edited weights are checked first, then (when recorded) every parameter and buffer,
        from one sha256 pass over the model. A delta without a whole-model fingerprint (saved
        before it was recorded) gets the edited-weights check only, and a warning.
        """
        names = list(self._params(model))
        digests = tensor_digests(model, None if self.state_fingerprint is not None else names)
        found = combine_digests(digests, names)
        if found != self.model_fingerprint:
            raise FingerprintMismatchError(
                f"refusing to apply this {self.method} delta: it was fitted on parameters with fingerprint "
                f"{self.model_fingerprint[:16]}… but this model's {', '.join(names)} have fingerprint "
                f"{found[:16]}…; the model is not the one the edit was computed for (different weights, "
                "or another edit is already applied). Apply it to the original model, or refit."
            )
        if self.state_fingerprint is None:
            if not self._warned_unchecked:
                log.warning(
                    "this %s delta records no fingerprint of the whole model it was fitted on (saved before "
                    "the workbench recorded one): only its edited weight(s) %s were checked, not the other "
                    "parameters and buffers the fit read; refit it for the full check",
                    self.method,
                    ", ".join(names),
                )
                self._warned_unchecked = True
            return
        state = combine_digests(digests)
        if state != self.state_fingerprint:
            raise FingerprintMismatchError(
                f"refusing to apply this {self.method} delta: it was fitted on another model: its edited "
                f"weight(s) {', '.join(names)} match but other parameters or buffers differ (model fingerprint "
                f"{state[:16]}…, fitted on {self.state_fingerprint[:16]}…). The edit was computed through the "
                "whole model, so it is not valid here; revert any other edit applied to this model, or refit."
            )

    def revert(self, model: nn.Module) -> None:
        """Restore the exact original parameters saved by `apply`, then verify the fingerprint."""
        state = self._applied.get(id(model))
        if state is None or state.model() is not model:
            raise WorkbenchError(f"this {self.method} delta is not applied to this model; nothing to revert")
        params = self._params(model)
        if parameter_fingerprint(model, params) != state.fingerprint_after:
            log.warning(
                "parameters %s changed while the %s delta was applied; revert restores the pre-edit values "
                "and discards those changes",
                list(params),
                self.method,
            )
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state.originals[name])
        del self._applied[id(model)]
        found = parameter_fingerprint(model, params)
        if found != self.model_fingerprint:
            raise ModelChangedError(
                f"revert of the {self.method} delta did not restore the original parameters "
                f"(fingerprint {found[:16]}…, expected {self.model_fingerprint[:16]}…)"
            )

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """`with delta.applied(model): ...` applies, and reverts on every exit path."""
        self.apply(model)
        try:
            yield model
        finally:
            self.revert(model)

    # --- sequential edits ----------------------------------------------------------------

    def compose(self, other: WeightDelta) -> WeightDelta:
        """One delta equal to applying `self`, then `other` (fitted on the model with `self` applied).

        `other` may only touch parameters `self` touches (then `self`'s fingerprints cover them
        all, and the result checks the whole model when both parts do); otherwise use
        `compose_on(model, self, other)`, which fingerprints on the model.
        Low-rank + low-rank stays low rank (factors are concatenated); anything with a dense
        part becomes dense. The composed delta adds one sum, so its edited weights can differ
        in the last bit from applying the two one after the other; revert is bit-exact either way.
        """
        extra_names = sorted(set(other.changes) - set(self.changes))
        if extra_names:
            raise WorkbenchError(
                f"cannot compose: the second delta also touches {extra_names}, whose original fingerprint "
                "the first delta does not record; use workbench.delta.compose_on(model, first, second)"
            )
        return WeightDelta(
            _sum_changes(self.changes, other.changes),
            method=f"{self.method}+{other.method}",
            request=[self.request, other.request],
            model_fingerprint=self.model_fingerprint,
            state_fingerprint=self.state_fingerprint if other.state_fingerprint is not None else None,
            extra={"composed_of": [self.metadata(), other.metadata()]},
        )

    # --- files --------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write a safetensors file (`<param>::dense` or `<param>::u`/`::v`) with JSON metadata."""
        tensors: dict[str, torch.Tensor] = {}
        for name, change in self.changes.items():
            if isinstance(change, LowRank):
                tensors[f"{name}::u"], tensors[f"{name}::v"] = change.u, change.v
            else:
                tensors[f"{name}::dense"] = change
        return save_safetensors_checked(path, tensors, self.metadata())

    @classmethod
    def load(cls, path: str | Path) -> WeightDelta:
        """Read a delta written by `save`; tampered or truncated files and pickles are refused."""
        from workbench.errors import CorruptFileError

        tensors, meta = load_safetensors_checked(path, what="delta file")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CorruptFileError(f"{path} is a workbench safetensors file but not a WeightDelta")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise CorruptFileError(
                f"{path} has delta format version {meta['format_version']}; this workbench reads up to "
                f"{FORMAT_VERSION}. Upgrade the workbench."
            )
        changes: dict[str, Change] = {}
        for name, kind in meta["params"].items():
            try:
                changes[name] = (
                    LowRank(tensors[f"{name}::u"], tensors[f"{name}::v"]) if kind == "low_rank" else tensors[f"{name}::dense"]
                )
            except KeyError as exc:
                raise CorruptFileError(f"delta file {path} lacks tensor {exc.args[0]!r}") from exc
        return cls(
            changes,
            method=meta["method"],
            request=meta.get("request"),
            model_fingerprint=meta["model_fingerprint"],
            state_fingerprint=meta.get("state_fingerprint"),
            created=meta.get("created"),
            extra=meta.get("extra"),
        )


def _sum_changes(first: Mapping[str, Change], second: Mapping[str, Change]) -> dict[str, Change]:
    out: dict[str, Change] = dict(first)
    for name, b in second.items():
        a = out.get(name)
        if a is None:
            out[name] = b
        elif isinstance(a, LowRank) and isinstance(b, LowRank):
            dtype = torch.promote_types(a.u.dtype, b.u.dtype)
            out[name] = LowRank(
                torch.cat([a.u.to(dtype=dtype), b.u.to(a.u.device, dtype)], dim=1),
                torch.cat([a.v.to(dtype=dtype), b.v.to(a.v.device, dtype)], dim=1),
            )
        else:
            da = a.materialize() if isinstance(a, LowRank) else a
            db = b.materialize() if isinstance(b, LowRank) else b
            dtype = torch.promote_types(da.dtype, db.dtype)
            out[name] = da.to(dtype=dtype) + db.to(da.device, dtype)
    return out


def compose_on(model: nn.Module, first: WeightDelta, second: WeightDelta) -> WeightDelta:
    """Compose two sequential edits, checking both fingerprints on `model` (without either edit).

    `second` must have been fitted on `model` with `first` applied; the result carries the
    fingerprint of every parameter either delta touches and of the whole model (when both
    parts recorded one), taken on the unedited `model`.
    """
    names = sorted(set(first.changes) | set(second.changes))
    digests = tensor_digests(model)
    with first.applied(model):  # refuses a model that is not first's
        try:
            second.check(model)
        except FingerprintMismatchError as exc:
            raise FingerprintMismatchError(
                f"the second ({second.method}) delta was not fitted on this model with the first "
                f"({first.method}) delta applied; sequential edits compose only in the order they were fitted"
            ) from exc
    both_full = first.state_fingerprint is not None and second.state_fingerprint is not None
    return WeightDelta(
        _sum_changes(first.changes, second.changes),
        method=f"{first.method}+{second.method}",
        request=[first.request, second.request],
        model_fingerprint=combine_digests(digests, names),
        state_fingerprint=combine_digests(digests) if both_full else None,
        extra={"composed_of": [first.metadata(), second.metadata()]},
    )


def _add_changes(params: Mapping[str, nn.Parameter], changes: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Add each change to its parameter in place (in at least float32); returns the exact originals.

    On an error every parameter is restored before it propagates.
    """
    originals = {name: param.detach().clone() for name, param in params.items()}
    try:
        with torch.no_grad():
            for name, param in params.items():
                work = torch.promote_types(param.dtype, torch.float32)
                change = changes[name]
                d = (
                    change.materialize(device=param.device, dtype=work)
                    if isinstance(change, LowRank)
                    else change.to(device=param.device, dtype=work)
                )
                param.copy_((param.to(work) + d).to(param.dtype))
    except BaseException:
        _restore(params, originals)
        raise
    return originals


def _restore(params: Mapping[str, nn.Parameter], originals: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(originals[name])


@contextmanager
def changes_added(model: nn.Module, changes: Mapping[str, Any]) -> Iterator[None]:
    """`changes` added to `model` for the block, then the exact original bits restored.

    For an editor's own intermediate states inside its `assert_unchanged` block (MEMIT reads
    keys through the layers it has already changed): no fingerprints are taken, since the
    guard around the fit checks the model as a whole.
    """
    params = dict(model.named_parameters())
    unknown = sorted(set(changes) - set(params))
    if unknown:
        raise WorkbenchError(f"model has no parameter(s) {unknown}; e.g. {sorted(params)[:5]}")
    touched = {name: params[name] for name in changes}
    originals = _add_changes(touched, changes)
    try:
        yield
    finally:
        _restore(touched, originals)


@dataclass
class UnchangedGuard:
    """What an `assert_unchanged` block checked: the model and, once it ended, its per-tensor digests."""

    model: nn.Module
    digests: dict[str, str] = field(default_factory=dict)


@contextmanager
def assert_unchanged(model: nn.Module, names: Any = None) -> Iterator[UnchangedGuard]:
    """Raise `ModelChangedError` if `model`'s parameters (all, or `names`) differ after the block.

    Editors wrap `fit` in this: fitting an edit must never leave the model changed. If the
    block raised and also changed the model, the error says so and chains the original.
    Yields a guard that holds the closing check's digests of the whole model (when `names`
    is None), which `WeightDelta.from_model(..., guard=)` reuses instead of hashing again.
    """
    names = None if names is None else list(names)
    before = tensor_digests(model, names)
    guard = UnchangedGuard(model)
    try:
        yield guard
    except BaseException as exc:
        if tensor_digests(model, names) != before:
            raise ModelChangedError("the model's parameters changed inside a block that failed with an error") from exc
        raise
    if tensor_digests(model, names) != before:
        raise ModelChangedError(
            "the model's parameters changed inside a block that must leave them untouched "
            "(fitting an edit must not modify the model)"
        )
    if names is None:
        guard.digests = before


fingerprint_guard = assert_unchanged
