"""Aggregation of LoRA updates of different ranks and shapes (pure torch, no I/O).

FedSpine (the spec): rebuild every node's update in the unpruned coordinates, ΔW_i = scale_i·B_i·A_i scattered
at the node's kept rows/cols; average coordinate by coordinate weighted by sample count, dividing each entry
by the weight of the nodes that kept that coordinate (a coordinate only some nodes kept is not shrunk toward
zero; one nobody kept keeps its previous value); then give node j the best rank-r_j approximation (truncated
SVD) of the average sliced to its kept rows/cols.

What a node uploads is its whole LoRA state, which started from that truncated slice.  Averaging those states
as they are would drop, every round, the part of the global update that the truncation withheld from each
node: a rank-2 node pulls the average toward its rank-2 view of it, and with static ranks the average of
three rank-8 states (rank up to 24) is cut back to its top 8 components before anyone trains on the rest.
So ``aggregate`` takes the slice each node started from and averages what the node *changed*: node i
contributes ΔW_i + (G − S_i) on its kept coordinates, where G is the global update before the round and S_i
the slice it received, i.e. G + (ΔW_i − S_i).  With no truncation (S_i = G there) this is exactly the
average of the states, and with a shared structure it is FedAvg of the changes, G + Σ w_i (ΔW_i − S_i) / Σ w_i.

``min_keepers`` (ours, ``MIN_KEEPERS`` = 2 in the coordinator) changes a coordinate only where at least that many
of the round's nodes kept it (at most the number of nodes in the round, so a one-node round still learns);
elsewhere the coordinate keeps its previous value.  Every change the global update ever received was then
averaged over at least two nodes' data: a coordinate that one node alone still has is not trained on that
node's skewed data alone, round after round, and the node deploys the federated value there.

The coordinator moves the global state by its round change through ``RoundMomentum`` (server momentum without
amplification, β = ``MOMENTUM``), for this average and for zero-padding alike: applied once per round after the
partials are merged, so that it changes nothing of hierarchical = flat.

Group importance that nodes report with their updates is averaged the same way, coverage-weighted per group
(a group scored only by the nodes that still have it), and sent back to every node with its slice.

Zero-padding (HetLoRA) instead pads every node's factors to the largest rank and averages B and A
*separately*. The product of the averages is not the average of the products: with two nodes of equal weight
it is (B1+B2)(A1+A2)/4 = (B1A1 + B2A2)/4 + (B1A2 + B2A1)/4, i.e. each node's own update is halved and cross
terms between unrelated factors appear; and truncating the padded factors back to a low rank keeps only the
first components, which a high-rank node dominates.  ``ZeroPadLora`` implements it for the HetLoRA baseline,
split into partial sums and their application as the average is (so it runs under regional aggregators too).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from shared.updates import GroupScores, LoraUpdate, ModuleUpdate, UpdateError, UpdateLimits

OVERSAMPLE = 16
POWER_ITERS = 4
GROUP_BATCH = 256  # nodes per concatenated matmul in aggregation (bounds its memory: 256·r columns)
MIN_KEEPERS = 2  # a coordinate changes only where at least this many of the round's nodes kept it (1: the spec)
MOMENTUM = 0.5  # β of RoundMomentum, the exponential average of the global model's round changes


def _key(t: torch.Tensor) -> str:
    return hashlib.sha1(t.numpy().tobytes()).hexdigest()[:16]


@dataclass
class Partial:
    """A sub-fleet's share of one round's aggregate: sums over its nodes, which add.  Of one of two kinds:

    ``kind`` "average" (``GlobalLora.partial``, the mask-aware average): ``modules[name]`` = (Σ w/τ·change scattered,
    Σ w, Σ w·τ, keepers) per coordinate, float32 of the unpruned shape; ``importance[key]`` = (Σ w·score, Σ w) per
    group.  ``kind`` "zero_pad" (``ZeroPadLora.partial``, HetLoRA): ``factors[name]`` = (Σ w·√s·pad(B), Σ w·√s·pad(A)),
    the scale-absorbed factors zero-padded to the fleet's padding rank; no modules, no importance, states (``changes``
    False).  Both: ``dense[name]`` = (Σ w/τ·change, Σ w, Σ w·τ) (zero padding: τ = 1 and the states); ``steps`` and
    ``weights`` list each contributing node's τ and w (FedNova's τ_eff is a function of them; zero padding: τ = 1, and
    Σ w divides the factors); ``nodes`` counts them.
    """

    changes: bool  # True: changes from each node's start were summed (the coordinator's case); False: states
    nodes: int = 0
    steps: list[float] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    dense: dict[str, tuple[torch.Tensor, float, float]] = field(default_factory=dict)
    importance: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    kind: str = "average"  # PARTIAL_KINDS: "average" (GlobalLora) or "zero_pad" (ZeroPadLora)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # zero_pad: (ΣB, ΣA)

    def to_bytes(self) -> bytes:
        """safetensors, like a node's update (never pickle); scalars in the metadata."""
        t: dict[str, torch.Tensor] = {"steps": torch.tensor(self.steps, dtype=torch.float64),
                                      "weights": torch.tensor(self.weights, dtype=torch.float64)}
        for name, parts in self.modules.items():
            for part, x in zip(_MODULE_PARTS, parts, strict=True):
                t[f"lora.{name}.{part}"] = x.contiguous()
        for name, (B, A) in self.factors.items():
            t[f"factors.{name}.B"], t[f"factors.{name}.A"] = B.contiguous(), A.contiguous()
        scalars = {}
        for name, (change, weight, wpace) in self.dense.items():
            t[f"dense.{name}"] = change.contiguous()
            scalars[name] = [weight, wpace]
        for key, (num, den) in self.importance.items():
            t[f"importance.{key}.num"], t[f"importance.{key}.den"] = num.contiguous(), den.contiguous()
        meta = {"format": PARTIAL_FORMAT, "kind": self.kind, "changes": str(int(self.changes)),
                "nodes": str(self.nodes), "dense": json.dumps(scalars)}
        return st_save(t, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes, limits: UpdateLimits | None = None) -> Partial:
        """Decode and validate a region's partial (network data); raise UpdateError naming the defect."""
        limits = limits or UpdateLimits()
        if len(data) > limits.max_bytes:
            raise UpdateError(f"partial of {len(data)} bytes exceeds the limit of {limits.max_bytes}")
        try:
            n = int.from_bytes(bytes(data[:8]), "little")
            meta = json.loads(bytes(data[8:8 + n])).get("__metadata__") or {}
            tensors = st_load(bytes(data))
        except (SafetensorError, ValueError, RuntimeError, AttributeError) as exc:
            raise UpdateError(f"malformed partial: {exc}") from None
        if meta.get("format") != PARTIAL_FORMAT or meta.get("changes") not in ("0", "1"):
            raise UpdateError(f"not a {PARTIAL_FORMAT} payload (metadata {str(meta)[:80]})")
        kind = meta.get("kind", "average")
        if kind not in PARTIAL_KINDS:
            raise UpdateError(f"partial metadata: kind {kind[:40]!r} is not one of {list(PARTIAL_KINDS)}")
        if kind == "zero_pad" and meta["changes"] != "0":
            raise UpdateError("partial metadata: a zero_pad partial sums states (changes must be 0)")
        try:
            nodes, scalars = int(meta.get("nodes", "")), json.loads(meta.get("dense", ""))
        except ValueError:
            raise UpdateError("partial metadata: nodes must be an integer and dense a JSON map") from None
        out = cls(changes=meta["changes"] == "1", nodes=nodes, kind=kind)
        parts: dict[str, dict[str, torch.Tensor]] = {}
        imp: dict[str, dict[str, torch.Tensor]] = {}
        facs: dict[str, dict[str, torch.Tensor]] = {}
        for key, x in tensors.items():
            if x.dtype not in (torch.float32, torch.float64) or not bool(torch.isfinite(x).all()):
                raise UpdateError(f"partial {key}: must be finite float32/float64")
            if key in ("steps", "weights"):
                if x.dim() != 1 or bool((x <= 0).any()):
                    raise UpdateError(f"partial {key}: must be a vector of positive numbers")
                setattr(out, key, x.tolist())
            elif key.startswith("lora.") and kind == "average":
                name, _, part = key[5:].rpartition(".")
                if part not in _MODULE_PARTS or not name or x.dim() != 2 or x.dtype != torch.float32:
                    raise UpdateError(f"partial: unexpected tensor {key!r}")
                parts.setdefault(name, {})[part] = x
            elif key.startswith("factors.") and kind == "zero_pad":
                name, _, part = key[8:].rpartition(".")
                if part not in ("B", "A") or not name or x.dim() != 2 or x.dtype != torch.float32:
                    raise UpdateError(f"partial: unexpected tensor {key!r}")
                facs.setdefault(name, {})[part] = x
            elif key.startswith("importance.") and kind == "average":
                name, _, part = key[11:].rpartition(".")
                if part not in ("num", "den") or not name or x.dim() != 1 or x.dtype != torch.float32:
                    raise UpdateError(f"partial: unexpected tensor {key!r}")
                imp.setdefault(name, {})[part] = x
            elif key.startswith("dense.") and x.dtype == torch.float32:
                w = scalars.get(key[6:]) if isinstance(scalars, dict) else None
                if not (isinstance(w, list) and len(w) == 2 and all(isinstance(v, (int, float)) and math.isfinite(v)
                                                                     and v >= 0 for v in w)):
                    raise UpdateError(f"partial {key}: needs finite [weight, weight x steps] >= 0 in the metadata")
                out.dense[key[6:]] = (x, float(w[0]), float(w[1]))
            else:
                raise UpdateError(f"partial: unexpected tensor {key!r}")
        if not (len(out.steps) == len(out.weights) == nodes) or nodes < 0:
            raise UpdateError(f"partial: {nodes} nodes but {len(out.steps)} steps and {len(out.weights)} weights")
        if len(parts) + len(facs) > limits.max_modules:
            raise UpdateError(f"partial has {len(parts) + len(facs)} modules, more than {limits.max_modules}")
        for name, p in facs.items():
            if set(p) != {"B", "A"} or p["B"].shape[1] != p["A"].shape[0]:
                raise UpdateError(f"partial factors.{name}: needs B (out x r) and A (r x in) of one padding rank r")
            out.factors[name] = (p["B"], p["A"])
        if len({B.shape[1] for B, _ in out.factors.values()}) > 1:
            raise UpdateError("partial: factors padded to different ranks")
        for name, p in parts.items():
            if set(p) != set(_MODULE_PARTS) or len({tuple(x.shape) for x in p.values()}) != 1:
                raise UpdateError(f"partial lora.{name}: needs {list(_MODULE_PARTS)} of one shape")
            if any(bool((p[k] < 0).any()) for k in ("den", "pace", "keepers")):
                raise UpdateError(f"partial lora.{name}: weights and counts must be >= 0")
            out.modules[name] = tuple(p[k] for k in _MODULE_PARTS)  # type: ignore[assignment]
        for key, p in imp.items():
            if set(p) != {"num", "den"} or p["num"].shape != p["den"].shape or bool((p["den"] < 0).any()):
                raise UpdateError(f"partial importance.{key}: needs num and den >= 0 of one size")
            out.importance[key] = (p["num"], p["den"])
        return out


PARTIAL_FORMAT = "fedspine-partial-v1"
PARTIAL_KINDS = ("average", "zero_pad")  # Partial.kind: GlobalLora's mask-aware average, ZeroPadLora's zero padding
_MODULE_PARTS = ("num", "den", "pace", "keepers")


def merge(partials: Sequence[Partial]) -> Partial:
    """One partial for the union of the (disjoint) sub-fleets of ``partials``: the sums added (pure).  A region of
    regions forwards this; the root applies it.  Raises UpdateError where the partials disagree."""
    if len({p.changes for p in partials}) > 1:
        raise UpdateError("partials mix averaged changes and averaged states")
    if len({p.kind for p in partials}) > 1:
        raise UpdateError("partials mix the mask-aware average and zero padding")
    out = Partial(changes=partials[0].changes if partials else True, kind=partials[0].kind if partials else "average")
    for p in partials:
        out.nodes += p.nodes
        out.steps += p.steps
        out.weights += p.weights
        for name, (B, A) in p.factors.items():
            have = out.factors.get(name)
            if have is not None and (have[0].shape != B.shape or have[1].shape != A.shape):
                raise UpdateError(f"partials disagree on factors.{name}'s shape (padding rank)")
            out.factors[name] = (B, A) if have is None else (have[0] + B, have[1] + A)
        for name, parts in p.modules.items():
            have = out.modules.get(name)
            if have is not None and have[0].shape != parts[0].shape:
                raise UpdateError(f"partials disagree on lora.{name}'s shape")
            out.modules[name] = tuple(parts) if have is None else tuple(a + b for a, b in zip(have, parts, strict=True))
        for name, (change, weight, wpace) in p.dense.items():
            have = out.dense.get(name)
            if have is not None and have[0].shape != change.shape:
                raise UpdateError(f"partials disagree on dense.{name}'s shape")
            out.dense[name] = (change, weight, wpace) if have is None else \
                (have[0] + change, have[1] + weight, have[2] + wpace)
        for key, (num, den) in p.importance.items():
            have = out.importance.get(key)
            if have is not None and have[0].shape != num.shape:
                raise UpdateError(f"partials disagree on importance.{key}'s size")
            out.importance[key] = (num, den) if have is None else (have[0] + num, have[1] + den)
    return out


class RoundMomentum:
    """Server momentum without amplification: the global state moves by v / (1 - β^t), the bias-corrected exponential
    average v = β·v + (1 - β)·Δ of its round changes Δ (the first moment of FedAdam, Reddi et al. 2021).  A direction
    that persists keeps its size (round 1 moves by Δ exactly); one that flips between rounds is damped to
    (1 - β)/(1 + β).  Under label skew, a round's change is pulled toward the classes of its short local runs and
    the next round pulls back: that is the part averaged away (docs/experiments/stability-under-label-skew.md,
    candidate D).  β = 0 turns it off."""

    def __init__(self, beta: float = MOMENTUM) -> None:
        if not 0 <= beta < 1:
            raise ValueError(f"momentum {beta} must be in [0, 1)")
        self.beta = beta
        self.velocity: dict[str, torch.Tensor] = {}  # parameter key -> the averaged change
        self.rounds = 0  # rounds applied (the bias correction's t)

    def start_round(self) -> None:
        self.rounds += 1

    def smooth(self, key: str, change: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
        """What the global state moves by instead of the round's ``change``, on the coordinates the round changed
        (``where``; None: all of them; elsewhere 0)."""
        if not self.beta:
            return change
        b = self.beta
        v = self.velocity.get(key)
        if v is None or v.shape != change.shape:
            v = torch.zeros_like(change)
        new = b * v + (1 - b) * change
        self.velocity[key] = new if where is None else torch.where(where, new, v)
        out = self.velocity[key] / (1 - b ** max(self.rounds, 1))
        return out if where is None else torch.where(where, out, torch.zeros_like(out))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"velocity.{k}": t for k, t in self.velocity.items()},
                "velocity_rounds": torch.tensor([self.rounds], dtype=torch.int64)}

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.velocity = {k[len("velocity."):]: v.float() for k, v in tensors.items() if k.startswith("velocity.")}
        self.rounds = int(tensors["velocity_rounds"].item()) if "velocity_rounds" in tensors else 0


class GlobalLora:
    """The global update: a dense ΔW per adapted module in unpruned coordinates, plus dense parameters."""

    def __init__(self, min_keepers: int = MIN_KEEPERS, momentum: float = MOMENTUM) -> None:
        if min_keepers < 1:
            raise ValueError(f"min_keepers {min_keepers} must be >= 1")
        self.min_keepers = min_keepers
        self.momentum = RoundMomentum(momentum)
        self.delta: dict[str, torch.Tensor] = {}
        self.dense: dict[str, torch.Tensor] = {}
        self.importance: dict[str, torch.Tensor] = {}  # "<layer>.<kind>" -> fleet mean score per group
        self.scored: dict[str, torch.Tensor] = {}  # same keys -> bool, groups some node has scored
        self._cache: dict = {}  # slices by (module, rows, cols, rank) and by whole structure; "importance"

    @property
    def empty(self) -> bool:
        return not self.delta

    def check(self, update: LoraUpdate) -> None:
        """Refuse an update whose modules or shapes disagree with the global state (once it exists)."""
        if self.empty:
            return
        if set(update.modules) != set(self.delta):
            extra, missing = set(update.modules) - set(self.delta), set(self.delta) - set(update.modules)
            raise UpdateError(f"module set differs from the global state (extra {sorted(extra)[:3]}, "
                              f"missing {sorted(missing)[:3]})")
        for name, m in update.modules.items():
            if tuple(m.shape) != tuple(self.delta[name].shape):
                raise UpdateError(f"lora.{name}: shape {m.shape} != global {tuple(self.delta[name].shape)}")
        for name, t in update.dense.items():
            if name in self.dense and tuple(t.shape) != tuple(self.dense[name].shape):
                raise UpdateError(f"dense.{name}: shape {tuple(t.shape)} != global {tuple(self.dense[name].shape)}")
        for key, g in update.importance.items():
            if key in self.importance and g.size != self.importance[key].numel():
                raise UpdateError(f"importance.{key}: size {g.size} != global {self.importance[key].numel()}")

    def aggregate(self, updates: Sequence[tuple[LoraUpdate, float]],
                  starts: Sequence[LoraUpdate | None] | None = None, steps: Sequence[int] | None = None) -> None:
        """Replace the global state by the mask-aware average of ``updates`` ((update, weight) pairs).

        ``starts[i]``, when given, is the slice node i received this round (None: it received nothing, the
        global state was empty); node i then contributes its change added to the global state, see the module
        docstring.  Without ``starts`` the states are averaged as they are.

        ``steps[i]``, when given with ``starts``, is how many local steps node i ran; changes are then averaged
        as FedNova does (Wang et al., 2020): each per step, scaled back by the weighted mean step count of the
        nodes that kept the coordinate.  A node that ran more steps then moves the average no further per step
        than the others, instead of pulling it toward its own data's optimum.  Equal steps change nothing.
        """
        if not updates:
            return
        for u, _ in updates:
            self.check(u)
        self.apply([self.partial(updates, starts, steps)])

    def partial(self, updates: Sequence[tuple[LoraUpdate, float]], starts: Sequence[LoraUpdate | None] | None = None,
                steps: Sequence[int] | None = None) -> Partial:
        """The sums that ``aggregate`` divides, over ``updates`` only (a region's sub-fleet): per coordinate the
        weighted change Σ w_i/τ_i·(ΔW_i − S_i), the keepers' weight Σ w_i, their step weight Σ w_i·τ_i and count;
        the same for dense parameters and importance.  Sums add, so ``apply`` of the partials of any split of a
        round's updates is ``aggregate`` of all of them (up to floating-point summation order).  Pure: reads the
        global state (each node's start and the dense base), changes nothing."""
        if starts is not None and len(starts) != len(updates):
            raise ValueError(f"{len(starts)} starting slices for {len(updates)} updates")
        if steps is not None and (len(steps) != len(updates) or any(t < 1 for t in steps)):
            raise ValueError(f"steps {list(steps)} must be >= 1, one per update")
        paces = [float(t) for t in steps] if steps is not None and starts is not None else [1.0] * len(updates)
        out = Partial(changes=starts is not None, nodes=sum(1 for _, w in updates if w > 0),
                      steps=[p for p, (_, w) in zip(paces, updates, strict=True) if w > 0],
                      weights=[float(w) for _, w in updates if w > 0])
        for name in sorted({n for u, _ in updates for n in u.modules}):
            out.modules[name] = self._module_sums(name, updates, starts, paces)
        for name in sorted({n for u, _ in updates for n in u.dense}):
            held = [(i, u.dense[name].float(), w) for i, (u, w) in enumerate(updates) if name in u.dense and w > 0]
            if not held:
                continue
            prev = self.dense.get(name)
            base = prev if prev is not None and tuple(prev.shape) == tuple(held[0][1].shape) else torch.zeros_like(held[0][1])
            # Σ c_i·(t_i − s_i) = Σ c_i·t_i − Σ_s (Σ c_i) s: one weighted sum of the stacked tensors, and each distinct
            # start (nodes alike share one) subtracted once
            coef = [w / paces[i] for i, _, w in held]
            change = torch.tensordot(torch.tensor(coef), torch.stack([t for _, t, _ in held]), dims=1)
            started: dict[int, tuple[torch.Tensor, float]] = {}
            for (i, _, _), c in zip(held, coef, strict=True):
                s = starts[i].dense.get(name) if starts is not None and starts[i] is not None else None
                s = s.float() if s is not None else base
                started[id(s)] = (s, started.get(id(s), (s, 0.0))[1] + c)
            for s, c in started.values():
                change.sub_(s, alpha=c)
            out.dense[name] = (change, sum(w for _, _, w in held), sum(w * paces[i] for i, _, w in held))
        for key in sorted({k for u, _ in updates for k in u.importance}):
            size = self.importance[key].numel() if key in self.importance else \
                next(u.importance[key].size for u, _ in updates if key in u.importance)
            num = torch.zeros(size, dtype=torch.float32)
            den = torch.zeros(size, dtype=torch.float32)
            for u, w in updates:
                g = u.importance.get(key)
                if g is None or w <= 0 or g.size != size:  # check() refuses such a size once the key exists
                    continue
                num.index_add_(0, g.idx, g.score.float() * w)
                den.index_add_(0, g.idx, torch.full((g.idx.numel(),), float(w)))
            out.importance[key] = (num, den)
        return out

    @staticmethod
    def _module_sums(name: str, updates: Sequence[tuple[LoraUpdate, float]], starts: Sequence[LoraUpdate | None] | None,
                     paces: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One module's (Σ w/τ·change scattered, Σ w, Σ w·τ, keepers), computed per distinct kept structure: the
        nodes that kept the same rows and cols share one matmul of their concatenated factors
        (Σ c_i·B_i·A_i = [c_1·B_1 | c_2·B_2 | …]·[A_1; A_2; …]), one subtraction of their weighted starts and one
        scatter, instead of a handful of small tensor operations per node (the root's hot path at thousands of
        nodes a round)."""
        shape = next(u.modules[name].shape for u, _ in updates if name in u.modules)
        num = torch.zeros(shape, dtype=torch.float32)
        den = torch.zeros(shape, dtype=torch.float32)
        pace = torch.zeros(shape, dtype=torch.float32)  # Σ w·steps over the nodes that kept each coordinate
        keepers = torch.zeros(shape, dtype=torch.float32)  # how many nodes kept each
        groups: dict[tuple, list[int]] = {}  # kept structure -> the nodes (in update order) that have it
        for i, (u, w) in enumerate(updates):
            m = u.modules.get(name)
            if m is None or w <= 0:
                continue
            full = m.rows.numel() == shape[0] and m.cols.numel() == shape[1]  # validated: every index, in order
            key = () if full else (m.rows.numpy().tobytes(), m.cols.numpy().tobytes())
            groups.setdefault(key, []).append(i)
        received: dict[int, torch.Tensor] = {}  # each distinct start as a dense matrix (nodes alike share one)
        for key, members in groups.items():
            first = updates[members[0]][0].modules[name]
            rows, cols = first.rows, first.cols
            change = torch.zeros(rows.numel(), cols.numel(), dtype=torch.float32)
            started: dict[int, float] = {}  # start (by id) -> Σ c_i of the group's nodes that started from it
            w_sum = w_pace = 0.0
            for lo in range(0, len(members), GROUP_BATCH):
                batch = members[lo:lo + GROUP_BATCH]
                Bs, As, coef = [], [], []  # coef: each factor column's c_i·scale_i
                for i in batch:
                    m, w = updates[i][0].modules[name], updates[i][1]
                    c = w / paces[i]
                    Bs.append(m.B)
                    As.append(m.A)
                    coef += [c * m.scale] * m.rank
                    w_sum += w
                    w_pace += w * paces[i]
                    s = starts[i].modules.get(name) if starts is not None and starts[i] is not None else None
                    if s is not None:
                        if id(s) not in received:
                            received[id(s)] = s.dense_delta()
                        started[id(s)] = started.get(id(s), 0.0) + c
                change.addmm_(torch.cat(Bs, dim=1).float() * torch.tensor(coef), torch.cat(As, dim=0).float())
            if started:
                base = torch.zeros(shape, dtype=torch.float32)
                for sid, c in started.items():
                    base.add_(received[sid], alpha=c)
                change -= base if not key else base[rows.unsqueeze(1), cols.unsqueeze(0)]
            if not key:  # unpruned: no scatter needed
                num += change
                den += w_sum
                pace += w_pace
                keepers += len(members)
                continue
            num[rows.unsqueeze(1), cols.unsqueeze(0)] += change
            rmask = torch.zeros(shape[0]).index_fill_(0, rows, 1.0)
            cmask = torch.zeros(shape[1]).index_fill_(0, cols, 1.0)
            den.addr_(rmask, cmask, alpha=w_sum)
            pace.addr_(rmask, cmask, alpha=w_pace)
            keepers.addr_(rmask, cmask, alpha=float(len(members)))
        return num, den, pace, keepers

    def apply(self, partials: Sequence[Partial]) -> None:
        """Replace the global state by the average that ``partials`` (of disjoint sets of nodes) sum up: what
        ``aggregate`` of all their nodes' updates gives.  Raises UpdateError for partials that disagree with the
        global state or each other (a region's partial is network data)."""
        if not partials:
            return
        total = merge(partials)
        self.check_partial(total)
        need = min(self.min_keepers, total.nodes)
        if total.changes:
            self.momentum.start_round()
        for name, (num, den, pace, keepers) in total.modules.items():
            shape = tuple(num.shape)
            prev = self.delta.get(name)
            if need > 1:  # too few keepers: no change there (the previous value, or zero, stays)
                den = torch.where(keepers >= need, den, torch.zeros_like(den))
            if not total.changes:  # average the states
                self.delta[name] = torch.where(den > 0, num / den.clamp_min(1e-30),
                                               prev if prev is not None else torch.zeros(shape))
                continue
            change = torch.where(den > 0, num * pace / den.square().clamp_min(1e-30), torch.zeros(shape))
            change = self.momentum.smooth(f"delta.{name}", change, den > 0)
            self.delta[name] = change if prev is None else prev + change
        for name, (change, weight, wpace) in total.dense.items():
            if weight <= 0:
                continue
            prev = self.dense.get(name)
            base = prev if prev is not None and tuple(prev.shape) == tuple(change.shape) else torch.zeros_like(change)
            step = change * (wpace / weight) / weight
            self.dense[name] = base + (self.momentum.smooth(f"dense.{name}", step) if total.changes else step)
        for key, (num, den) in total.importance.items():
            size = num.numel()
            prev = self.importance.get(key, torch.zeros(size))
            self.importance[key] = torch.where(den > 0, num / den.clamp_min(1e-30), prev)
            self.scored[key] = self.scored.get(key, torch.zeros(size, dtype=torch.bool)) | (den > 0)
        self._cache.clear()

    def check_partial(self, partial: Partial) -> None:
        """Refuse a partial (a region's: network data) that ``apply`` could not add to this global state: of the other
        kind, or whose modules, shapes or importance sizes disagree with the state's (once it exists)."""
        if partial.kind != "average":
            raise UpdateError(f"a {partial.kind} partial for the mask-aware average (the method aggregates otherwise)")
        if not self.empty and partial.modules and set(partial.modules) != set(self.delta):
            raise UpdateError(f"partial's modules {sorted(partial.modules)[:3]} differ from the global state's")
        for name, (num, *_) in partial.modules.items():
            prev = self.delta.get(name)
            if prev is not None and tuple(prev.shape) != tuple(num.shape):
                raise UpdateError(f"partial lora.{name}: shape {tuple(num.shape)} != global {tuple(prev.shape)}")
        for key, (num, _) in partial.importance.items():
            if key in self.importance and self.importance[key].numel() != num.numel():
                raise UpdateError(f"partial importance.{key}: size {num.numel()} != global "
                                  f"{self.importance[key].numel()}")

    def fleet_importance(self) -> dict[str, GroupScores]:
        """The fleet's averaged importance of every group some node has scored (what each slice carries)."""
        out = {}
        for key, scores in self.importance.items():
            idx = self.scored[key].nonzero().flatten()
            if idx.numel():
                out[key] = GroupScores(idx=idx, score=scores[idx].clone(), size=scores.numel())
        return out

    def slice_for(self, structure: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None, rank: int,
                  alpha: float) -> LoraUpdate | None:
        """Node view: the average sliced to ``structure`` (rows, cols per module; None = unpruned), best rank-r."""
        if self.empty:
            return None
        whole = (rank, tuple((n, _key(r), _key(c)) for n, (r, c) in sorted((structure or {}).items())))
        if whole in self._cache:  # nodes with the same structure and rank share one object (and its bytes)
            return self._cache[whole]
        mods = {}
        for name, full in self.delta.items():
            if structure is not None and name in structure:
                rows, cols = structure[name]
            else:
                rows, cols = torch.arange(full.shape[0]), torch.arange(full.shape[1])
            key = (name, _key(rows), _key(cols), rank)
            if key not in self._cache:
                self._cache[key] = factorize(full[rows.unsqueeze(1), cols.unsqueeze(0)], rows, cols,
                                             tuple(full.shape), rank, alpha)
            mods[name] = self._cache[key]
        if "importance" not in self._cache:
            self._cache["importance"] = self.fleet_importance()
        self._cache[whole] = LoraUpdate(mods, dict(self.dense), self._cache["importance"])
        return self._cache[whole]

    def start_for(self, structure: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None, rank: int,
                  sent_rank: int, alpha: float) -> LoraUpdate | None:
        """What a node of rank ``rank`` sent ``slice_for(structure, sent_rank)`` trains from: that slice's first
        ``rank`` components.  Cached with the slices, so that nodes alike share one object (``aggregate`` turns
        each distinct start into a dense matrix once)."""
        sent = self.slice_for(structure, sent_rank, alpha)
        if sent is None or rank >= sent.rank:
            return sent
        key = ("leading", id(sent), rank)  # the slice is held in the cache as long as this entry
        if key not in self._cache:
            self._cache[key] = sent.leading(rank)
        return self._cache[key]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"delta.{n}": t for n, t in self.delta.items()}, **{f"dense.{n}": t for n, t in self.dense.items()},
                **{f"importance.{k}": t for k, t in self.importance.items()},
                **{f"scored.{k}": t.to(torch.uint8) for k, t in self.scored.items()}}

    def momentum_tensors(self) -> dict[str, torch.Tensor]:
        """The server momentum's state, for the coordinator's checkpoint (a region does not need it)."""
        return self.momentum.tensors()

    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load ``state_tensors`` (and ``momentum_tensors`` where present; absent: no momentum history)."""
        self.momentum.load(tensors)
        self.delta = {k[len("delta."):]: v.float() for k, v in tensors.items() if k.startswith("delta.")}
        self.dense = {k[len("dense."):]: v.float() for k, v in tensors.items() if k.startswith("dense.")}
        self.importance = {k[len("importance."):]: v.float() for k, v in tensors.items() if k.startswith("importance.")}
        self.scored = {k: tensors.get(f"scored.{k}", torch.ones(v.numel(), dtype=torch.uint8)).bool()
                       for k, v in self.importance.items()}
        self._cache.clear()


def factorize(delta: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int], rank: int,
              alpha: float) -> ModuleUpdate:
    """Best rank-``rank`` factors of ``delta`` (Eckart–Young), split evenly so that (alpha/rank)·B·A ≈ delta.

    Components beyond the matrix rank come out as zero rows of A / columns of B; the node re-initialises
    all-zero rows of A so that LoRA training can use them (B stays zero, so the update is unchanged).
    """
    scale = alpha / rank
    k = min(rank, *delta.shape)
    oversample = rank + OVERSAMPLE
    if min(delta.shape) <= 2 * oversample:
        U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    else:
        # Randomized truncated SVD (Halko et al.): exact when the update's rank fits the oversampled subspace,
        # within noise of the optimum otherwise; 10-20x cheaper than a full SVD of a MiniLM FFN slice.
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(0)  # deterministic (resume must reproduce the same factors)
        U, S, V = torch.svd_lowrank(delta.double(), q=oversample, niter=POWER_ITERS)
        torch.random.set_rng_state(gen_state)
        Vh = V.T
    # Components below 1e-6 of the largest are rounding (how small depends on the LAPACK build): exact zeros, as
    # the node's refactor (edge_node.model, rel_tol) treats them as dead and re-initialises them anyway.
    k = min(k, int((S > 1e-6 * float(S.max())).sum())) if S.numel() else 0
    root = S[:k].sqrt()
    B = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
    A = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
    B[:, :k] = U[:, :k] * root
    A[:k] = root.unsqueeze(1) * Vh[:k]
    s = scale ** 0.5
    return ModuleUpdate(A=(A / s).float(), B=(B / s).float(), rows=rows.clone(), cols=cols.clone(),
                        shape=shape, scale=scale)


class ZeroPadLora:
    """HetLoRA's aggregation: zero-pad factors to one rank and average B and A separately.

    Stored as scale-absorbed factors (√scale·B, √scale·A), so that B̃Ã is each node's update; a node of rank r
    receives the first r components.  Only for nodes that share the unpruned structure (HetLoRA never prunes).

    The average is a ratio of sums, B = Σ w_i·√s_i·pad(B_i) / Σ w_i (A likewise; dense Σ w_i·t_i / Σ w_i), so it splits
    as the mask-aware one does: ``partial`` sums over a sub-fleet (a region's nodes), ``merge`` adds the sums and
    ``apply`` divides them and moves the state by the server momentum, once, at the root; ``aggregate`` is
    ``apply([partial(all)])``.  Every partial pads to ``rank``, which the whole fleet knows (HetLoRA: the largest rank
    of its tier table), so that the sums of regions whose nodes are of different tiers add.
    """

    def __init__(self, rank: int | None = None, momentum: float = MOMENTUM) -> None:
        if rank is not None and rank < 1:
            raise ValueError(f"padding rank {rank} must be >= 1")
        # Factors are padded to ``rank``; None: to the largest rank of the round's updates and of the state, which
        # only one coordinator can do (partials of sub-fleets would then not add).
        self.rank = rank
        self.momentum = RoundMomentum(momentum)  # on the round's change of B, A and the dense parameters
        self.B: dict[str, torch.Tensor] = {}
        self.A: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, tuple[int, int]] = {}
        self.dense: dict[str, torch.Tensor] = {}

    @property
    def empty(self) -> bool:
        return not self.B

    def check(self, update: LoraUpdate) -> None:
        """Refuse an update zero padding cannot average into this state: a pruned module, a rank above the padding
        rank, or (once the state exists) other modules or shapes."""
        for name, m in update.modules.items():
            if m.rows.numel() != m.shape[0] or m.cols.numel() != m.shape[1]:
                raise UpdateError(f"lora.{name}: zero-padding aggregation needs unpruned modules")
            if self.rank is not None and m.rank > self.rank:
                raise UpdateError(f"lora.{name}: rank {m.rank} exceeds the padding rank {self.rank}")
        if self.empty:
            return
        if set(update.modules) != set(self.B):
            raise UpdateError(f"module set {sorted(update.modules)[:3]} differs from the global state's "
                              f"{sorted(self.B)[:3]}")
        for name, m in update.modules.items():
            if tuple(m.shape) != self.shapes[name]:
                raise UpdateError(f"lora.{name}: shape {m.shape} != global {self.shapes[name]}")
        for name, t in update.dense.items():
            if name in self.dense and tuple(t.shape) != tuple(self.dense[name].shape):
                raise UpdateError(f"dense.{name}: shape {tuple(t.shape)} != global {tuple(self.dense[name].shape)}")

    def aggregate(self, updates: Sequence[tuple[LoraUpdate, float]]) -> None:
        """Replace the state by the zero-padded average of ``updates`` ((update, weight) pairs), reached through the
        server momentum."""
        if not updates:
            return
        for u, _ in updates:
            self.check(u)
        self.apply([self.partial(updates)])

    def padding_rank(self, updates: Sequence[tuple[LoraUpdate, float]] = ()) -> int:
        if self.rank is not None:
            return self.rank
        return max([m.rank for u, _ in updates for m in u.modules.values()] + [B.shape[1] for B in self.B.values()],
                   default=1)

    def partial(self, updates: Sequence[tuple[LoraUpdate, float]]) -> Partial:
        """The sums that ``aggregate`` divides, over ``updates`` only (a region's sub-fleet): per module the weighted,
        scale-absorbed factors zero-padded to the padding rank, Σ w_i·√s_i·pad(B_i) and Σ w_i·√s_i·pad(A_i); per
        dense parameter Σ w_i·t_i and the holders' Σ w_i; the nodes' weights (their sum divides the factors).  Sums
        add, so ``apply`` of the partials of any split of a round's updates is ``aggregate`` of all of them (up to
        floating-point summation order).  Pure: reads nothing of the state but its padding rank."""
        held = [(u, float(w)) for u, w in updates if w > 0]
        out = Partial(changes=False, kind="zero_pad", nodes=len(held), steps=[1.0] * len(held),
                      weights=[w for _, w in held])
        pad = self.padding_rank(updates)
        for name in sorted({n for u, _ in held for n in u.modules}):
            ms = [(u.modules[name], w) for u, w in held if name in u.modules]
            rows, cols = ms[0][0].shape
            B = torch.zeros(rows, pad)
            A = torch.zeros(pad, cols)
            for m, w in ms:
                if tuple(m.shape) != (rows, cols) or m.rows.numel() != rows or m.cols.numel() != cols:
                    raise UpdateError(f"lora.{name}: zero-padding aggregation needs unpruned modules of one shape")
                if m.rank > pad:
                    raise UpdateError(f"lora.{name}: rank {m.rank} exceeds the padding rank {pad}")
                c = w * m.scale ** 0.5
                B[:, : m.rank] += c * m.B.float()
                A[: m.rank] += c * m.A.float()
            out.factors[name] = (B, A)
        for name in sorted({n for u, _ in held for n in u.dense}):
            pairs = [(u.dense[name].float(), w) for u, w in held if name in u.dense]
            weight = sum(w for _, w in pairs)
            out.dense[name] = (sum(w * t for t, w in pairs), weight, weight)
        return out

    def check_partial(self, partial: Partial) -> None:
        """Refuse a partial (a region's: network data) that ``apply`` could not add to this state: of the other kind,
        padded to another rank, or whose modules or shapes disagree with the state's (once it exists)."""
        if partial.kind != "zero_pad":
            raise UpdateError(f"a {partial.kind} partial for zero-padding aggregation (HetLoRA)")
        for name, (B, A) in partial.factors.items():
            if self.rank is not None and B.shape[1] != self.rank:
                raise UpdateError(f"partial factors.{name}: padded to rank {B.shape[1]}, not {self.rank}")
            if name in self.shapes and (B.shape[0], A.shape[1]) != self.shapes[name]:
                raise UpdateError(f"partial factors.{name}: shape {(B.shape[0], A.shape[1])} != global "
                                  f"{self.shapes[name]}")
        if not self.empty and partial.factors and set(partial.factors) != set(self.B):
            raise UpdateError(f"partial's modules {sorted(partial.factors)[:3]} differ from the global state's")

    def apply(self, partials: Sequence[Partial]) -> None:
        """Replace the state by the zero-padded average that ``partials`` (of disjoint sets of nodes) sum up, moved to
        through the server momentum: what ``aggregate`` of all their nodes' updates gives.  Raises UpdateError for
        partials that disagree with the state or each other (a region's partial is network data)."""
        if not partials:
            return
        total = merge(partials)
        self.check_partial(total)
        weight = sum(total.weights)
        if weight <= 0:
            return
        self.momentum.start_round()
        for name, (B, A) in sorted(total.factors.items()):
            self.B[name] = self._moved(f"B.{name}", self.B.get(name), B / weight)
            self.A[name] = self._moved(f"A.{name}", self.A.get(name), A / weight)
            self.shapes[name] = (B.shape[0], A.shape[1])
        for name, (t, w, _) in sorted(total.dense.items()):
            if w > 0:
                self.dense[name] = self._moved(f"dense.{name}", self.dense.get(name), t / w)

    def _moved(self, key: str, prev: torch.Tensor | None, avg: torch.Tensor) -> torch.Tensor:
        """The averaged state ``avg``, reached from ``prev`` by the momentum's step instead of directly."""
        base = prev if prev is not None and prev.shape == avg.shape else torch.zeros_like(avg)
        return base + self.momentum.smooth(key, avg - base)

    def slice_for(self, rank: int, alpha: float) -> LoraUpdate | None:
        if self.empty:
            return None
        scale = alpha / rank
        s = scale ** 0.5
        mods = {}
        for name, B in self.B.items():
            A = self.A[name]
            r = min(rank, B.shape[1])
            Bn, An = torch.zeros(B.shape[0], rank), torch.zeros(rank, A.shape[1])
            Bn[:, :r], An[:r] = B[:, :r] / s, A[:r] / s
            out, inp = self.shapes[name]
            mods[name] = ModuleUpdate(A=An, B=Bn, rows=torch.arange(out), cols=torch.arange(inp), shape=(out, inp),
                                      scale=scale)
        return LoraUpdate(mods, dict(self.dense))

    def delta(self, name: str) -> torch.Tensor:
        return self.B[name] @ self.A[name]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"zpB.{n}": t for n, t in self.B.items()}, **{f"zpA.{n}": t for n, t in self.A.items()},
                **{f"dense.{n}": t for n, t in self.dense.items()}}

    def momentum_tensors(self) -> dict[str, torch.Tensor]:
        return self.momentum.tensors()

    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load ``state_tensors`` (and ``momentum_tensors`` where present).  Factors of a lower rank than the padding
        rank (a checkpoint written when the state was as wide as its round's largest rank) are zero-padded to it,
        their momentum too: exact, as zero components add nothing."""
        self.momentum.load(tensors)
        self.B = {k[4:]: v for k, v in tensors.items() if k.startswith("zpB.")}
        self.A = {k[4:]: v for k, v in tensors.items() if k.startswith("zpA.")}
        if set(self.B) != set(self.A) or any(B.shape[1] != self.A[n].shape[0] for n, B in self.B.items()):
            raise ValueError("zero-padded state: every module needs zpB (out x r) and zpA (r x in) of one rank")
        if self.rank is not None:
            for n, B in self.B.items():
                if B.shape[1] > self.rank:
                    raise ValueError(f"zero-padded state zpB.{n}: rank {B.shape[1]} exceeds the padding rank "
                                     f"{self.rank} (the largest of the tier table)")
                self.B[n], self.A[n] = _padded(B, self.rank, dim=1), _padded(self.A[n], self.rank, dim=0)
            for k, v in self.momentum.velocity.items():
                if k[:2] in ("B.", "A.") and k[2:] in self.B:
                    self.momentum.velocity[k] = _padded(v, self.rank, dim=1 if k[0] == "B" else 0)
        self.shapes = {n: (b.shape[0], self.A[n].shape[1]) for n, b in self.B.items()}
        self.dense = {k[6:]: v for k, v in tensors.items() if k.startswith("dense.")}


# The tensor name prefixes of each kind of global state (GlobalLora.state_tensors, ZeroPadLora.state_tensors)
_STATE_KEYS = {"average": ("delta", "dense", "importance", "scored"), "zero_pad": ("zpB", "zpA", "dense")}


def load_state_bytes(data: bytes, limits: UpdateLimits, zero_pad_rank: int | None = None) -> GlobalLora | ZeroPadLora:
    """A global state from its wire bytes (what a regional aggregator downloads from the root), validated as network
    data: safetensors of ``GlobalLora.state_tensors``, or with ``zero_pad_rank`` (HetLoRA) of
    ``ZeroPadLora.state_tensors``, factors padded to exactly that rank; raise UpdateError naming the defect."""
    if len(data) > limits.max_bytes:
        raise UpdateError(f"global state of {len(data)} bytes exceeds {limits.max_bytes}")
    try:
        tensors = st_load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise UpdateError(f"malformed global state: {exc}") from None
    kind = "average" if zero_pad_rank is None else "zero_pad"
    for key, t in tensors.items():
        prefix = key.split(".", 1)[0]
        if prefix not in _STATE_KEYS[kind] or "." not in key:
            other = "zero_pad" if kind == "average" else "average"
            why = (f"a {other} state's tensor, but the round asks for the {kind} aggregation"
                   if prefix in _STATE_KEYS[other] and "." in key else "unexpected tensor")
            raise UpdateError(f"global state: {why} ({key!r})")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UpdateError(f"global state {key}: NaN or Inf")
        if prefix in ("delta", "zpB", "zpA") and (t.dim() != 2 or not t.is_floating_point()):
            raise UpdateError(f"global state {key}: must be a float matrix")
    if zero_pad_rank is None:
        g = GlobalLora()
        g.load_tensors(tensors)
        return g
    for key, B in tensors.items():
        if key.startswith("zpB."):
            A = tensors.get(f"zpA.{key[4:]}")
            if A is None or B.shape[1] != zero_pad_rank or A.shape[0] != zero_pad_rank:
                raise UpdateError(f"global state {key}: needs zpB (out x {zero_pad_rank}) and zpA.{key[4:]} "
                                  f"({zero_pad_rank} x in), padded to the round's zero_pad_rank")
    if {k[4:] for k in tensors if k.startswith("zpA.")} != {k[4:] for k in tensors if k.startswith("zpB.")}:
        raise UpdateError("global state: a zpA factor without its zpB")
    z = ZeroPadLora(rank=zero_pad_rank)
    z.load_tensors(tensors)
    return z


def _padded(x: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """A factor zero-padded to ``rank`` components along ``dim`` (B: columns, dim 1; A: rows, dim 0)."""
    missing = rank - x.shape[dim]
    if missing <= 0:
        return x
    return torch.nn.functional.pad(x, (0, missing) if dim == 1 else (0, 0, 0, missing))
