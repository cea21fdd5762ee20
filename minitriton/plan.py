"""Merge plans: which adjacent layer pairs a `MiniCache` merges, each with its own settings.

    >>> plan = MergePlan.paper(30)                       # (15,16), (17,18), ... as in the paper
    >>> plan = MergePlan([PairSpec(3, t=0.0, magnitude="projection", sink=4), (16, 17)])
    >>> MergePlan.from_json(plan.to_json())
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

from ._checks import check_index, check_unit_interval
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

    def __post_init__(self):
        # Validated at construction, numbers stored as Python int / float (numpy numbers are
        # accepted): TypeError or ValueError naming the field otherwise.
        values = dict(prev=check_index("prev", self.prev, "a layer index"),
                      t=check_unit_interval("t", self.t),
                      gamma=check_unit_interval("gamma", self.gamma),
                      sink=check_index("sink", self.sink, "an int"))
        if self.magnitude not in MAGNITUDE_MODES:
            raise ValueError(f"magnitude: expected one of {MAGNITUDE_MODES}, got "
                             f"{self.magnitude!r}")
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {self.method!r}")
        for name, v in values.items():
            object.__setattr__(self, name, v)

    @property
    def cur(self) -> int:
        return self.prev + 1

    @property
    def layers(self) -> tuple[int, int]:
        return (self.prev, self.prev + 1)

    def check(self, num_layers: Optional[int] = None) -> "PairSpec":
        """The spec, once its layers are known to lie in [0, num_layers) (the fields are
        checked at construction)."""
        if num_layers is not None:
            num_layers = check_index("num_layers", num_layers)
            if self.cur >= num_layers:
                raise ValueError(f"pair ({self.prev}, {self.cur}): layer {self.cur} is out "
                                 f"of range for num_layers={num_layers}")
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
        if num_layers is not None:
            num_layers = check_index("num_layers", num_layers, "an int")
        if isinstance(pairs, (str, bytes, dict)) or not hasattr(pairs, "__iter__"):
            raise TypeError(f"pairs: expected an iterable of PairSpec, dict or (l, l + 1), got "
                            f"{type(pairs).__name__}")
        PairSpec(0, t=t, gamma=gamma, magnitude=magnitude, sink=sink, method=method)  # defaults
        specs = []
        for i, p in enumerate(pairs):
            if isinstance(p, PairSpec):
                spec = p
            elif isinstance(p, dict):
                spec = _spec_from_dict(f"pairs[{i}]", p)
            elif isinstance(p, (tuple, list)) and len(p) == 2:
                a, b = p
                if any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in p):
                    raise TypeError(f"pairs[{i}]: expected two int layer indices, got {p!r}")
                a, b = int(a), int(b)
                if b != a + 1:
                    raise ValueError(f"pairs[{i}]: expected adjacent layers (l, l + 1), got {p!r}")
                if a < 0:
                    raise ValueError(f"pairs[{i}]: expected layer indices >= 0, got {p!r}")
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
        num_layers = check_index("num_layers", num_layers, low=1)
        s = num_layers // 2 if start is None else check_index("start", start, "a layer index")
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
        """The plan of `to_json` (`{"pairs": [...]}`), or a bare list of pairs; each pair a dict
        of PairSpec fields or an `[l, l + 1]` list (with the default settings)."""
        if not isinstance(text, (str, bytes, bytearray)):
            raise TypeError(f"text: expected a JSON string, got {type(text).__name__}")
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ValueError(f"text: not valid JSON ({err})") from None
        except RecursionError:
            raise ValueError("text: JSON nested too deeply to be a plan") from None
        if isinstance(data, dict):
            if set(data) != {"pairs"}:
                raise ValueError(f"text: expected {{\"pairs\": [...]}} or a list of pairs, got "
                                 f"keys {sorted(data)}")
            data = data["pairs"]
        if not isinstance(data, list):
            raise ValueError(f"text: expected {{\"pairs\": [...]}} or a list of pairs, got "
                             f"{type(data).__name__}")
        return cls(data, num_layers=num_layers)


def _spec_from_dict(name: str, d: dict) -> PairSpec:
    fields = {f.name for f in dataclasses.fields(PairSpec)}
    unknown = sorted(set(d) - fields)
    if unknown or "prev" not in d:
        raise ValueError(f"{name}: expected PairSpec fields {sorted(fields)} with 'prev', got "
                         f"keys {sorted(d)}")
    try:
        return PairSpec(**d)
    except (TypeError, ValueError) as err:   # (a field's own message, with the pair named)
        raise type(err)(f"{name}: {err}") from None
