"""The MPC protocols mpcvit adds to CrypTen, each with its party and dealer halves.

- ``tuples``: kinds of correlated randomness, what a party draws and what the dealer
  computes (CrypTen's Beaver triples, squares, binary triples, wraps, random bits);
- ``fused``: several products in one round; a shared bit turned arithmetic and
  multiplied in the same round;
- ``carry``: the mask products of one radix-4 level of the comparison's carry tree
  (plain torch, computed alike by the dealer and the parties' fallback);
- ``compare``: the sign bit of an additive sharing in 4 rounds, with its carry-mask and
  private-AND tuple kinds;
- ``masked``: weights masked once at load, so a product opens only its input, with the
  dealer's mask store;
- ``dcf``: function secret sharing, the math (DCF keys, sign/ReLU/spline gates; numpy);
- ``fss``: one-round comparisons on it, with the dealer's key kind (every party fetches
  its own key) and its key cache;
- ``splines``: the piecewise-quadratic tables of the ``spline`` variants;
- ``plan``: :class:`~plan.ProtocolPlan`, which variant each building block runs;
- ``functions``: the secure nonlinear functions (ReLU, max, LayerNorm, reciprocal,
  1/sqrt, exp, GeLU) built on the above, each taking a plan.

Both parties must run these programs message for message: :func:`code_fingerprint`
hashes this package and the runtime beside it, so two parties built from different code
refuse to pair.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import ModuleType

# The runtime modules whose behaviour both parties' programs depend on, beside this package.
_RUNTIME = ("communicator.py", "transport.py", "dealer.py", "runtime.py")


def code_fingerprint(*programs: ModuleType) -> str:
    """Hash of the code both parties must run identically: every module of this package,
    the runtime, and the given program modules (e.g. the secure model's)."""
    here = Path(__file__).resolve().parent
    files = sorted(here.glob("*.py")) + [here.parent / name for name in _RUNTIME]
    files += [Path(m.__file__).resolve() for m in programs if m.__file__]
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]
