"""Composition of several controllers' plans into the one op call.

Rules: biases add, prob_mults multiply, captures merge, regions do not compose (two
controllers giving regions on one call is an error: their label sets have no common
meaning; one controller's regions multiply with the prob_mults). Injection (``source``, with
its ``value_map`` and ``own_prob_mult``) does not compose either: at most one controller's
plan per call may set a source (two would each redefine the call's P); ``value_map`` and
``own_prob_mult`` need a ``source`` in the same plan; other plans' prob_mults act on the
edited attention in the target's token columns: they multiply the own term's factor and,
for the injected term, are folded into the value map (W[j, n]·f[n], so the injected map
P_src·W is scaled at target token n, not at source token j). That fold needs factors that
are constant over the query pixels ((B|1, H|1, 1, N), like the HRV controllers'); a
per-pixel prob_mult with a value map is an error. One capture passes through
untouched (the common case: zero overhead). Several captures are served by one kernel pass
into a scratch :class:`Capture` and then added into each owner's buffers:

* token mass and row LSE: one scratch buffer each, added to every owner that asked;
* token columns: the owners' ``tokens`` are concatenated (no de-duplication, so no device
  sync), each owner reading back its own slice of columns;
* auxiliary-key probes: at most one owner may carry ``probe_keys``; the kernel adds into
  that owner's ``probe_mass`` directly;
* ``maps``: the scratch carries the first owner's ``head_weights``; an owner whose weights
  are another tensor gets its maps from scratch per-head maps, weighted afterwards;
* captured rows: the scratch captures the smallest row range covering every owner's
  ``rows`` (all rows if one owner has none) and each owner receives its own rows only.

Replacement text states (``value_states`` / ``key_states`` with ``state_rows``, structured
diffusion guidance) come from at most one controller per call. Values mixed from other
encodings leave P alone, so they compose with biases, factors, regions and captures (which
see P as usual), not with injection (whose value map would act on the mixed values).
Several key sets give their rows several softmaxes: nothing else may act on such a call.

Differentiable ``maps`` (a :class:`MapsRequest`) are an output of their own op form
(``attention_with_maps``), which has no capture buffers and no injection: at most one
plan per call may request them, and the composed call may then carry no capture, source
or two-source term (biases, prob_mults and regions compose as usual).

On a call with a prompt-to-prompt token map (``value_map``), other controllers' captures
(a trace during an edit) receive the edited map the edit applies, as the original's
AttentionStore does (:class:`EditedCapture`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..capture import Capture
from ..op import attention
from .controller import AttentionCall, Plan

_KNOWN_FIELDS = {"bias", "prob_mult", "capture", "regions", "source", "value_map", "own_prob_mult", "own_capture",
                 "value_states", "key_states", "state_rows", "maps"}
_STATE_FIELDS = ("value_states", "key_states", "state_rows")


def refuse_fields_beyond(plan: Plan, supported: Sequence[str], where: str) -> None:
    """Raise NotImplementedError naming every field ``plan`` sets beyond ``supported`` (the
    ones a processor applies): a control a processor cannot apply is an error, never
    silently dropped."""
    unsupported = [f.name for f in dataclasses.fields(plan)
                   if f.name not in supported and getattr(plan, f.name) is not None]
    if unsupported:
        raise NotImplementedError(f"{', '.join(unsupported)}: not supported on {where}; it takes "
                                  f"{', '.join(supported)}")


# The Plan fields planned_attention applies; any other (injection, replacement text states,
# differentiable maps, ...) is refused by name.
PLANNED_FIELDS = ("bias", "prob_mult", "capture", "regions")


def planned_attention(installation, describe: Callable[[], AttentionCall], q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, where: str) -> Tuple[torch.Tensor, Optional[AttentionCall]]:
    """The op on (B, H, S, D) ``q``, ``k``, ``v`` under the installation's controllers, for
    the processors that run it on their own tensors (MM-DiT joint, Wan): ``describe()``
    (called only when controllers are installed) is the call they plan for; their plans
    compose into one, whose fields beyond PLANNED_FIELDS are refused naming ``where``; the
    composed plan's routing runs after the op. Returns (output, the call or None)."""
    bias = prob_mult = capture = regions = route = call = None
    if installation.controllers:
        call = describe()
        plan, route = compose([c.plan(call) for c in installation.controllers],
                              (call.batch, call.heads, call.queries, call.keys), call.device)
        if plan is not None:
            refuse_fields_beyond(plan, PLANNED_FIELDS, where)
            bias, prob_mult, capture, regions = plan.bias, plan.prob_mult, plan.capture, plan.regions
    out = attention(q, k, v, bias=bias, prob_mult=prob_mult, capture=capture, regions=regions,
                    backend=installation.backend)
    if route is not None:
        route()
    return out, call


_UNKNOWN_FIELDS: dict = {}   # Plan (sub)class -> its fields without a composition rule


def _unknown_fields(plan: Plan) -> Tuple[str, ...]:
    """The fields of a plan's class without a composition rule, once per class, not per call
    (dataclasses.fields costs microseconds, and compose runs on every layer call). A plain
    dict, not functools.lru_cache: torch.compile traces this and breaks the graph on the
    latter."""
    names = _UNKNOWN_FIELDS.get(type(plan))
    if names is None:
        names = _UNKNOWN_FIELDS[type(plan)] = tuple(f.name for f in dataclasses.fields(plan)
                                                    if f.name not in _KNOWN_FIELDS)
    return names


def compose(plans: Sequence[Optional[Plan]], shape: Tuple[int, int, int, int],
            device: torch.device) -> Tuple[Optional[Plan], Optional[Callable[[], None]]]:
    """One plan for an op call of ``shape`` (B, H, M, N) on ``device``, and a function to
    call after the op (None when there is nothing to route back)."""
    plans = [p for p in plans if p is not None]
    if not plans:
        return None, None
    for plan in plans:
        set_unknown = [name for name in _unknown_fields(plan) if getattr(plan, name) is not None]
        if set_unknown:
            raise NotImplementedError(f"compose: plan field(s) {set_unknown} of {type(plan).__name__} "
                                      "have no composition rule yet")
    for plan in plans:
        if plan.source is None and (plan.value_map is not None or plan.own_prob_mult is not None):
            raise ValueError(f"compose: value_map/own_prob_mult: expected a source in the same plan "
                             f"({type(plan).__name__} sets them without one)")
        if plan.own_capture is not None and plan.own_prob_mult is None:
            raise ValueError("compose: own_capture: expected own_prob_mult in the same plan (it captures "
                             "the own term of the two-source form)")
        _check_states(plan)
    with_maps = [p for p in plans if p.maps is not None]
    if with_maps:
        return _with_maps(plans, with_maps), None
    if len(plans) == 1:
        return plans[0], None
    with_states = [p for p in plans if p.state_rows is not None]
    if with_states:
        return _compose_with_states(plans, with_states, shape, device)
    with_source = [p for p in plans if p.source is not None]
    if len(with_source) > 1:
        raise ValueError(f"compose: source: expected at most one controller's plan with an injection source per "
                         f"call, got {len(with_source)}; two prompt-to-prompt edits cannot both replace the "
                         "attention (chain them instead, e.g. Reweight(..., after=Replace(...)))")
    injection = with_source[0] if with_source else None
    with_regions = [p for p in plans if p.regions is not None]
    if len(with_regions) > 1:
        raise ValueError(f"compose: regions: expected at most one controller's plan with regions per call, "
                         f"got {len(with_regions)}; region labels of different controllers cannot be combined")
    regions = with_regions[0].regions if with_regions else None
    bias = _combine([p.bias for p in plans], torch.add)
    prob_mult = _combine([p.prob_mult for p in plans], torch.mul)
    source = value_map = own = own_capture = None
    if injection is not None:
        source, value_map, own_capture = injection.source, injection.value_map, injection.own_capture
        others = _combine([p.prob_mult for p in plans if p is not injection], torch.mul)
        own = injection.own_prob_mult
        if own is not None and others is not None:
            own = own * others
        if value_map is not None and others is not None:
            value_map = _fold_into_value_map(value_map, others, shape)
            prob_mult = injection.prob_mult
    captures = [p.capture for p in plans if p.capture is not None and not p.capture.empty]
    if injection is not None and injection.value_map is not None:
        observers = [p.capture for p in plans if p is not injection and p.capture is not None and not p.capture.empty]
        if observers:
            if injection.capture is not None or injection.own_capture is not None:
                raise ValueError("compose: capture: expected no other controller's capture on a call whose "
                                 "prompt-to-prompt edit captures its own maps (LocalBlend); run the trace "
                                 "without local_blend")
            edited = EditedCapture(observers, injection.value_map, injection.own_prob_mult, shape, device)
            return Plan(bias, prob_mult, edited.injected, regions, source, value_map, own, edited.own), edited.route
    if len(captures) <= 1:
        return Plan(bias, prob_mult, captures[0] if captures else None, regions, source, value_map, own,
                    own_capture), None
    merged = MergedCapture(captures, shape, device)
    return Plan(bias, prob_mult, merged.scratch, regions, source, value_map, own, own_capture), merged.route


def _with_maps(plans: Sequence[Plan], with_maps: Sequence[Plan]) -> Plan:
    """The composed plan of a call whose maps are requested as a differentiable output."""
    if len(with_maps) > 1:
        raise ValueError(f"compose: maps: expected at most one controller's plan requesting differentiable maps per "
                         f"call, got {len(with_maps)} ({', '.join(type(p.maps.receive).__qualname__ for p in with_maps)})")
    others = [name for p in plans for name in ("capture", "source", "own_capture", "value_states", "key_states")
              if getattr(p, name) is not None and not (name == "capture" and p.capture.empty)]
    if others:
        raise ValueError(f"compose: maps: differentiable maps (attention_with_maps) cannot be combined with "
                         f"{sorted(set(others))} on the same call; expected plans with bias, prob_mult or regions only")
    with_regions = [p for p in plans if p.regions is not None]
    if len(with_regions) > 1:
        raise ValueError(f"compose: regions: expected at most one controller's plan with regions per call, "
                         f"got {len(with_regions)}; region labels of different controllers cannot be combined")
    return Plan(bias=_combine([p.bias for p in plans], torch.add),
                prob_mult=_combine([p.prob_mult for p in plans], torch.mul),
                regions=with_regions[0].regions if with_regions else None, maps=with_maps[0].maps)


def _check_states(plan: Plan) -> None:
    has_states = plan.value_states is not None or plan.key_states is not None
    if has_states != (plan.state_rows is not None):
        raise ValueError(f"compose: state_rows: expected together with value_states or key_states in one plan "
                         f"({type(plan).__name__} sets {'only states' if has_states else 'only state_rows'})")
    if plan.value_states is not None and plan.source is not None:
        raise ValueError("compose: value_states: expected no injection source in the same plan")
    if plan.key_states is not None:
        others = [name for name in ("bias", "prob_mult", "capture", "regions", "source")
                  if getattr(plan, name) is not None]
        if others:
            raise ValueError(f"compose: key_states: expected no other control in the same plan, got {others}")


def _compose_with_states(plans, with_states, shape, device):
    if len(with_states) > 1:
        raise ValueError(f"compose: value_states/key_states: expected at most one controller's plan with "
                         f"replacement text states per call, got {len(with_states)}")
    states = with_states[0]
    if states.key_states is not None:
        raise ValueError(f"compose: key_states: expected no other controller on a call whose rows get several "
                         f"key sets (structured guidance's conjunction mode), got {len(plans) - 1} other plan(s)")
    if any(p.source is not None for p in plans):
        raise ValueError("compose: value_states: expected no injection source on the same call (a "
                         "prompt-to-prompt edit's values would be the mixed ones)")
    rest = [dataclasses.replace(p, **dict.fromkeys(_STATE_FIELDS)) if p is states else p for p in plans]
    plan, route = compose(rest, shape, device)
    return dataclasses.replace(plan, value_states=states.value_states, state_rows=states.state_rows), route


def _fold_into_value_map(value_map: torch.Tensor, factor: torch.Tensor, shape) -> torch.Tensor:
    """W (B, [H|1,] N, N) scaled at its target columns by a pixel-constant factor:
    (B, H|1, N, N)."""
    f = factor.reshape((1,) * (4 - factor.dim()) + tuple(factor.shape))
    if f.shape[2] != 1:
        raise ValueError(f"compose: prob_mult of shape {tuple(factor.shape)} varies over the query pixels and "
                         f"cannot act on a prompt-to-prompt token map (value_map): only factors of shape "
                         f"(B|1, H|1, 1, N) compose with it (call (B, H, M, N) = {tuple(shape)})")
    W = value_map if value_map.dim() == 4 else value_map[:, None]
    return W * f[:, :, 0, None, :].to(W.dtype)


def _combine(tensors: List[Optional[torch.Tensor]], op) -> Optional[torch.Tensor]:
    present = [t for t in tensors if t is not None]
    if not present:
        return None
    result = present[0]
    for t in present[1:]:
        result = op(result, t)
    return result


class EditedCapture:
    """Captures of other controllers (a trace) on a call with a prompt-to-prompt token map:
    they receive the edited map the edit applies, A = P_inj·W + P_own·g (the original's
    AttentionStore keeps the maps after the edit), not the injected P. Both terms are
    captured over every key column into scratch buffers; ``route`` maps them through the
    edit's own W and g (without other controllers' factors: captures are of P before
    ``prob_mult``) and adds the owners' columns into their buffers."""

    def __init__(self, owners: Sequence[Capture], value_map: torch.Tensor, own_prob_mult: Optional[torch.Tensor],
                 shape: Tuple[int, int, int, int], device: torch.device):
        B, H, M, N = shape
        for owner in owners:
            if owner.wants_probes or owner.lse is not None:
                raise ValueError("compose: capture: probe keys and row LSE of an edited prompt-to-prompt map are "
                                 "not defined (the map is not a softmax); capture maps or token mass")
        self.owners = list(owners)
        self.W = (value_map if value_map.dim() == 4 else value_map[:, None]).float()      # (B, H|1, N, N)
        self.g = None if own_prob_mult is None else own_prob_mult.float()                  # (B, H|1, 1, N)
        self.shape = shape
        map_owners = [c for c in self.owners if c.maps is not None]
        self.weights = map_owners[0].head_weights if map_owners else None
        per_head = (self.W.shape[1] > 1 or (self.g is not None and self.g.shape[1] > 1)
                    or any(c.head_maps is not None for c in self.owners)
                    or any(c.head_weights is not self.weights for c in map_owners))
        self.per_head = per_head
        need_maps = bool(map_owners) or any(c.head_maps is not None for c in self.owners)
        columns = torch.arange(N, device=device)

        def scratch() -> Capture:
            return Capture(
                token_mass=torch.zeros(B, H, N, device=device) if any(c.token_mass is not None for c in owners) else None,
                maps=torch.zeros(B, M, N, device=device) if need_maps and not per_head else None,
                head_maps=torch.zeros(B, H, M, N, device=device) if need_maps and per_head else None,
                tokens=columns if need_maps else None,
                head_weights=self.weights if need_maps and not per_head else None)

        self.injected = scratch()
        self.own = scratch() if self.g is not None else None

    def _edited(self, name: str) -> Optional[torch.Tensor]:
        """The edited statistic ``name`` over every column: token_mass, maps or head_maps."""
        inj = getattr(self.injected, name)
        if inj is None:
            return None
        W, g = self.W, self.g
        if name == "maps":
            out = inj @ W[:, 0]
            return out if g is None else out + self.own.maps * g[:, 0]
        if name == "token_mass":                                        # (B, H, N) · (B, H|1, N, N)
            out = (inj.unsqueeze(-2) @ W).squeeze(-2)
        else:                                                           # (B, H, M, N) · (B, H|1, N, N)
            out = inj @ W
        if g is None:
            return out
        return out + getattr(self.own, name) * (g[:, :, 0] if name == "token_mass" else g)

    def route(self) -> None:
        mass, maps, head_maps = self._edited("token_mass"), self._edited("maps"), self._edited("head_maps")
        B = self.shape[0]
        for owner in self.owners:
            r = slice(*owner.row_range(B))   # an owner's capture.rows: the other rows stay untouched
            if owner.token_mass is not None:
                owner.token_mass[r] += mass[r]
            if owner.head_maps is not None:
                owner.head_maps[r] += _columns(head_maps, owner.tokens)[r]
            if owner.maps is None:
                continue
            if not self.per_head:
                owner.maps[r] += _columns(maps, owner.tokens)[r]
            else:
                H = head_maps.shape[1]
                w = owner.head_weights
                w = torch.ones(B, H, device=head_maps.device) if w is None else w.float().expand(B, H)
                owner.maps[r] += torch.einsum("bh,bhmt->bmt", w, _columns(head_maps, owner.tokens))[r]


def _columns(x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """x[..., tokens] for tokens (T,) or per row (B, T)."""
    if tokens.dim() == 1:
        return x[..., tokens]
    index = tokens.reshape(tokens.shape[0], *([1] * (x.dim() - 2)), tokens.shape[-1])
    return torch.gather(x, -1, index.expand(*x.shape[:-1], tokens.shape[-1]))


class MergedCapture:
    """One scratch Capture serving several owners' captures of one (B, H, M, N) call."""

    def __init__(self, owners: Sequence[Capture], shape: Tuple[int, int, int, int],
                 device: torch.device):
        self.owners = list(owners)
        B, H, M, N = shape
        self.batch = B
        probe_owners = [c for c in self.owners if c.wants_probes]
        if len(probe_owners) > 1:
            raise ValueError(f"compose: capture.probe_keys: expected at most one capture with probe keys per "
                             f"call, got {len(probe_owners)}")
        probe_owner = probe_owners[0] if probe_owners else None
        ranges = [c.rows for c in self.owners]
        rows = None if None in ranges else range(min(r.start for r in ranges), max(r.stop for r in ranges))
        if probe_owner is not None and probe_owner.rows != rows:
            raise ValueError(f"compose: capture.rows: the capture with probe keys has rows {probe_owner.rows}, "
                             f"the merged capture {rows}; expected the same rows for both")

        def zeros_if(wanted: bool, *size: int) -> Optional[torch.Tensor]:
            return torch.zeros(size, device=device) if wanted else None

        column_owners = [c for c in self.owners if c.wants_token_columns]
        self.columns = []  # (owner, first column, end column) in the scratch
        tokens = None
        if column_owners:
            parts = [c.tokens for c in column_owners]
            if any(t.dim() == 2 for t in parts):
                parts = [t.expand(B, t.shape[-1]) if t.dim() == 1 else t for t in parts]
            tokens = torch.cat(parts, dim=-1)
            start = 0
            for owner, part in zip(column_owners, parts):
                self.columns.append((owner, start, start + part.shape[-1]))
                start += part.shape[-1]
        T = tokens.shape[-1] if tokens is not None else 0

        map_owners = [c for c in column_owners if c.maps is not None]
        self.weights = map_owners[0].head_weights if map_owners else None
        need_head_maps = any(c.head_maps is not None for c in column_owners) or any(
            c.head_weights is not self.weights for c in map_owners)
        self.scratch = Capture(
            token_mass=zeros_if(any(c.token_mass is not None for c in self.owners), B, H, N),
            lse=zeros_if(any(c.lse is not None for c in self.owners), B, H, M),
            maps=zeros_if(bool(map_owners), B, M, T),
            head_maps=zeros_if(need_head_maps, B, H, M, T),
            tokens=tokens,
            head_weights=self.weights,
            probe_keys=probe_owner.probe_keys if probe_owner is not None else None,
            probe_mass=probe_owner.probe_mass if probe_owner is not None else None,
            rows=rows,
        )

    def route(self) -> None:
        """Add the scratch statistics into every owner's buffers."""
        s = self.scratch
        for owner in self.owners:
            r = slice(*owner.row_range(self.batch))
            if owner.token_mass is not None:
                owner.token_mass[r] += s.token_mass[r]
            if owner.lse is not None:
                owner.lse[r] += s.lse[r]
        for owner, start, stop in self.columns:
            r = slice(*owner.row_range(self.batch))
            if owner.head_maps is not None:
                owner.head_maps[r] += s.head_maps[r, ..., start:stop]
            if owner.maps is None:
                continue
            if owner.head_weights is self.weights:
                owner.maps[r] += s.maps[r, ..., start:stop]
            else:
                B, H = s.head_maps.shape[:2]
                w = owner.head_weights
                w = torch.ones(B, H, device=s.head_maps.device) if w is None else w.float().expand(B, H)
                owner.maps[r] += torch.einsum("bh,bhmt->bmt", w[r], s.head_maps[r, ..., start:stop])
