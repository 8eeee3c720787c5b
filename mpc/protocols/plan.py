"""Which protocol variant each secure building block runs: plain data both parties share.

A secure function has more than one protocol where the best one depends on the network:

- ``comparison``: ``carry`` (the radix-4 carry tree of ``compare``: 4 rounds + 1 that also
  carries the products, online bytes only) or ``fss`` (one opening of x + r and a DCF key
  from the dealer evaluated locally, ``fss``: 1 round, but dealer material and local AES
  work per compared element);
- ``gelu``: ``poly`` (relu minus a degree-7 polynomial tail; 9 rounds with ``carry``, 4 with
  ``fss``) or ``spline`` (piecewise quadratics chosen by one comparison per element
  against every breakpoint, the squares in one more round: 2 rounds with ``fss``);
- ``exp``: ``square`` (a quadratic raised to 2⁸ by squaring: 9 rounds) or ``spline``
  (piecewise quadratics: 2 rounds with ``fss``);
- ``reciprocal`` / ``rsqrt``: ``poly`` (split into octaves, a polynomial in the mantissa;
  for rsqrt the pieces below on small inputs, as ``functions.PIECES_MAX_EXTRA`` decides)
  or ``spline`` (always pieces of an octave with a quadratic each: 3 rounds with ``fss``).

``fss_bits`` is the width of the FSS comparisons on activations (ReLU, max, the GeLU and
exp breakpoints): exact for values below 2^(fss_bits − 1) fixed-point units in magnitude
(2^15 = 32768 at 32 bits; see ``fss.py`` for why that bound holds).  Range tests (LayerNorm,
division) size their own width from their documented input range.

The default plan is the protocols as they were before the variants existed, so nothing
changes unless a plan asks for it.  A plan is passed explicitly (models carry it as an
attribute, ``models/ops.py`` passes it down): there is no global switch.  Both parties
must run the same plan; it travels as a plain dict (:meth:`ProtocolPlan.to_dict`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

# Every block's variants; the first is the default.
VARIANTS: dict[str, tuple[str, ...]] = {
    "comparison": ("carry", "fss"),
    "gelu": ("poly", "spline"),
    "exp": ("square", "spline"),
    "reciprocal": ("poly", "spline"),
    "rsqrt": ("poly", "spline"),
}
FSS_BITS_RANGE = (20, 64)


@dataclass(frozen=True)
class ProtocolPlan:
    """Per building block, the protocol variant to run (see the module doc)."""

    comparison: str = "carry"
    gelu: str = "poly"
    exp: str = "square"
    reciprocal: str = "poly"
    rsqrt: str = "poly"
    fss_bits: int = 32

    def __post_init__(self) -> None:
        for block, options in VARIANTS.items():
            value = getattr(self, block)
            if value not in options:
                raise ValueError(f"protocol plan: {block} must be one of {options}, "
                                 f"got {value!r}")
        lo, hi = FSS_BITS_RANGE
        if isinstance(self.fss_bits, bool) or not isinstance(self.fss_bits, int) or not (
                lo <= self.fss_bits <= hi):
            raise ValueError(f"protocol plan: fss_bits must be an int in {lo}..{hi}, "
                             f"got {self.fss_bits!r}")

    @property
    def fss(self) -> bool:
        """Whether comparisons take one round with dealer keys."""
        return self.comparison == "fss"

    @property
    def uses_dealer_keys(self) -> bool:
        """Whether any block needs FSS keys (the dealer's or, under TFP, party-made)."""
        return self.fss

    def replace(self, **changes: Any) -> ProtocolPlan:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ProtocolPlan:
        """A plan from :meth:`to_dict`'s output (None or {} is the default plan); unknown
        fields are refused, missing ones take their defaults."""
        if not d:
            return cls()
        if not isinstance(d, dict):
            raise ValueError(f"protocol plan must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"protocol plan: unknown fields {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def parse(cls, text: str) -> ProtocolPlan:
        """A named plan (``default``, ``fss``) or ``block=variant,...`` over the default,
        e.g. ``comparison=fss,gelu=spline``."""
        text = text.strip()
        if text in PLANS:
            return PLANS[text]
        changes: dict[str, Any] = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"protocol plan: expected a name in {sorted(PLANS)} or "
                                 f"block=variant items, got {item!r}")
            key, value = key.strip(), value.strip()
            changes[key] = int(value) if key == "fss_bits" else value
        return cls.from_dict(changes)

    @staticmethod
    def variants() -> dict[str, tuple[str, ...]]:
        """The variants available per building block (the first is the default)."""
        return dict(VARIANTS)

    def describe(self) -> str:
        """``block=variant`` for every block that differs from the default."""
        default = ProtocolPlan()
        diff = [f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                if getattr(self, f.name) != getattr(default, f.name)]
        return ",".join(diff) or "default"


DEFAULT = ProtocolPlan()
PLANS: dict[str, ProtocolPlan] = {
    "default": DEFAULT,
    # Every comparison by FSS and every function by splines: fewest rounds.
    "fss": ProtocolPlan(comparison="fss", gelu="spline", exp="spline", reciprocal="spline",
                        rsqrt="spline"),
}


def resolve(plan: ProtocolPlan | dict[str, Any] | None) -> ProtocolPlan:
    """A plan from a plan, its dict, or None (the default)."""
    if plan is None:
        return DEFAULT
    if isinstance(plan, ProtocolPlan):
        return plan
    return ProtocolPlan.from_dict(plan)
