"""Merge plans: which adjacent layer pairs a `MiniCache` merges, each with its own settings.

    >>> plan = MergePlan.paper(30)                       # (15,16), (17,18), ... as in the paper
    >>> plan = MergePlan([PairSpec(3, t=0.0, magnitude="projection", sink=4), (16, 17)])
    >>> MergePlan.from_json(plan.to_json())
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

from .pair import MAGNITUDE_MODES

DEFAULT_T = 0.6
DEFAULT_GAMMA = 0.05
DEFAULT_WINDOW = 64
METHODS = ("slerp", "mean")


# ---- the plan ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairSpec:
    """One merged layer pair (prev, prev + 1) and its settings.

    Attributes:
        prev: index of layer l-1; the pair is (prev, prev + 1).
        t: SLERP parameter in [0, 1] (0 keeps prev's directions exactly, 1 cur's).
        gamma: retention threshold in [0, 1] (larger retains more tokens).
        magnitude: "norm" (the paper) or "projection".
        sink: the first `sink` tokens of both layers are kept dense, never merged.
        method: "slerp" (MiniCache) or "mean" (both layers replaced by the average of the two
            states: the paper's averaging baseline; t, gamma and magnitude are then unused).
    """

    prev: int
    t: float = DEFAULT_T
    gamma: float = DEFAULT_GAMMA
    magnitude: str = "norm"
    sink: int = 0
    method: str = "slerp"

    @property
    def cur(self) -> int:
        return self.prev + 1

    @property
    def layers(self) -> tuple[int, int]:
        return (self.prev, self.prev + 1)

    def check(self, num_layers: Optional[int] = None) -> "PairSpec":
        if isinstance(self.prev, bool) or not isinstance(self.prev, int):
            raise TypeError(f"prev: expected an int layer index, got {self.prev!r}")
        if self.prev < 0:
            raise ValueError(f"prev: expected a layer index >= 0, got {self.prev!r}")
        if num_layers is not None and self.prev + 1 >= num_layers:
            raise ValueError(f"pair ({self.prev}, {self.prev + 1}): layer {self.prev + 1} is out "
                             f"of range for num_layers={num_layers}")
        for name in ("t", "gamma"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name}: expected a number in [0, 1], got {v!r}")
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}: expected a number in [0, 1], got {v!r}")
        if self.magnitude not in MAGNITUDE_MODES:
            raise ValueError(f"magnitude: expected one of {MAGNITUDE_MODES}, got "
                             f"{self.magnitude!r}")
        if isinstance(self.sink, bool) or not isinstance(self.sink, int):
            raise TypeError(f"sink: expected an int >= 0, got {self.sink!r}")
        if self.sink < 0:
            raise ValueError(f"sink: expected an int >= 0, got {self.sink!r}")
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {self.method!r}")
        return self

    def describe(self) -> str:
        """One line, e.g. `(15,16) slerp t=0.60 gamma=0.05 norm sink=0`."""
        if self.method == "mean":
            return f"({self.prev},{self.cur}) mean sink={self.sink}"
        return (f"({self.prev},{self.cur}) slerp t={self.t:.2f} gamma={self.gamma:.2f} "
                f"{self.magnitude} sink={self.sink}")


class MergePlan:
    """Which adjacent layer pairs are merged, each with its own `PairSpec`.

    Build it from PairSpecs, or from `(l, l + 1)` tuples that take the shared defaults:

        >>> MergePlan.paper(30)                      # (15,16), (17,18), ..., (27,28)
        >>> MergePlan([(3, 4), PairSpec(10, t=1.0, gamma=0.3)], t=0.5)
        >>> MergePlan([])                            # no merging: a dense cache

    Pairs must be adjacent, disjoint, and (given `num_layers`) in range.
    """

    def __init__(self, pairs: Iterable = (), *, t: float = DEFAULT_T,
                 gamma: float = DEFAULT_GAMMA, magnitude: str = "norm", sink: int = 0,
                 method: str = "slerp", num_layers: Optional[int] = None):
        specs = []
        for i, p in enumerate(pairs):
            if isinstance(p, PairSpec):
                spec = p
            elif isinstance(p, dict):
                spec = PairSpec(**p)
            elif isinstance(p, (tuple, list)) and len(p) == 2:
                a, b = p
                if any(isinstance(x, bool) or not isinstance(x, int) for x in p):
                    raise TypeError(f"pairs[{i}]: expected two int layer indices, got {p!r}")
                if b != a + 1:
                    raise ValueError(f"pairs[{i}]: expected adjacent layers (l, l + 1), got {p!r}")
                spec = PairSpec(a, t=t, gamma=gamma, magnitude=magnitude, sink=sink,
                                method=method)
            else:
                raise TypeError(f"pairs[{i}]: expected a PairSpec, dict or (l, l + 1) tuple, "
                                f"got {p!r}")
            specs.append(spec.check(num_layers))
        specs.sort(key=lambda s: s.prev)
        for a, b in zip(specs, specs[1:]):
            if b.prev <= a.cur:
                raise ValueError(f"pairs: ({a.prev},{a.cur}) and ({b.prev},{b.cur}) overlap")
        self.pairs: tuple[PairSpec, ...] = tuple(specs)
        self._of = {}
        for spec in self.pairs:
            self._of[spec.prev] = (spec, 0)
            self._of[spec.cur] = (spec, 1)

    @classmethod
    def paper(cls, num_layers: int, *, start: Optional[int] = None, **settings) -> "MergePlan":
        """The paper's plan: (s, s+1), (s+2, s+3), ... from s = num_layers // 2 while s + 1 < L."""
        s = num_layers // 2 if start is None else start
        return cls([(a, a + 1) for a in range(s, num_layers - 1, 2)], num_layers=num_layers,
                   **settings)

    def lookup(self, layer: int) -> Optional[tuple[PairSpec, int]]:
        """(spec, side) for a merged layer (side 0 = prev, 1 = cur), else None."""
        return self._of.get(layer)

    def merged_layers(self) -> list[int]:
        return sorted(self._of)

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self):
        return iter(self.pairs)

    def __eq__(self, other) -> bool:
        return isinstance(other, MergePlan) and self.pairs == other.pairs

    def __repr__(self) -> str:
        return f"MergePlan([{', '.join(s.describe() for s in self.pairs)}])"

    def describe(self) -> list[str]:
        return [s.describe() for s in self.pairs] or ["(no merged pairs)"]

    def to_json(self) -> str:
        return json.dumps({"pairs": [asdict(s) for s in self.pairs]}, indent=1)

    @classmethod
    def from_json(cls, text: str, num_layers: Optional[int] = None) -> "MergePlan":
        data = json.loads(text)
        pairs = data["pairs"] if isinstance(data, dict) else data
        return cls([PairSpec(**p) for p in pairs], num_layers=num_layers)
