"""Run CrypTen sessions over gRPC: install a GrpcCommunicator and a provider.

CrypTen reaches its communicator through four functions of ``crypten.communicator``
(``get``, ``is_initialized``, ``_init``, ``uninit``) and its tuple provider through
``crypten.mpc.get_default_provider()`` keyed by ``cfg.mpc.provider``.  We plug in at
exactly those seams: while a session is open they answer with our communicator; at any
other time they fall through to CrypTen's originals (so gloo runs keep working).

``crypten.init()`` is still what starts a session, so CrypTen syncs its PRNG seeds over
our communicator exactly as it would over gloo.  Re-syncing per session means a session
aborted half-way (peer crash) leaves no stale shared state behind.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import crypten
import crypten.communicator as _cc
import crypten.mpc as _cmpc
from crypten.config import cfg

from . import compat
from .communicator import GrpcCommunicator
from .config import ProviderSpec
from .dealer import DealerProvider
from .errors import DealerError, MpcRuntimeError, PeerAborted
from .transport import PeerTransport

if TYPE_CHECKING:
    from crypten.communicator.communicator import Communicator

log = logging.getLogger("mpcvit.runtime")
compat.patch_crypten(crypten)

DEALER_PROVIDER_NAME = "DEALER"

_session_lock = threading.RLock()
_pending: GrpcCommunicator | None = None
_active: GrpcCommunicator | None = None
_originals = {name: getattr(_cc, name) for name in ("get", "is_initialized", "_init", "uninit")}
_dealer_provider = DealerProvider()
_warned_tfp = False


def active_communicator() -> GrpcCommunicator:
    if _active is None:
        raise RuntimeError("no mpcvit CrypTen session is open")
    return _active


def _get() -> Communicator:
    return _active if _active is not None else _originals["get"]()


def _is_initialized() -> bool:
    if _active is not None:
        return True
    if _pending is not None:
        return False
    return _originals["is_initialized"]()


def _init(use_threads: bool = False, rank: int = 0, world_size: int = 1,
          init_ttp: bool = False) -> None:
    global _active
    if _pending is None:
        return _originals["_init"](use_threads, rank=rank, world_size=world_size,
                                   init_ttp=init_ttp)
    if init_ttp:
        raise MpcRuntimeError("CrypTen's TTP provider is not used over gRPC; use the dealer")
    _active = _pending


def _uninit() -> None:
    global _active
    if _active is None:
        return _originals["uninit"]()
    _active = None


def install_hooks() -> None:
    """Point CrypTen's communicator and provider lookups at mpcvit (idempotent)."""
    _cc.get, _cc.is_initialized, _cc._init, _cc.uninit = _get, _is_initialized, _init, _uninit
    providers = vars(_cmpc).get("__SUPPORTED_PROVIDERS")
    if not isinstance(providers, dict):
        raise MpcRuntimeError("this CrypTen has no provider registry; mpcvit needs 0.4.1")
    providers[DEALER_PROVIDER_NAME] = _dealer_provider


install_hooks()


def select_provider(spec: ProviderSpec) -> None:
    """Set CrypTen's provider for the next operations (in this process)."""
    global _warned_tfp
    if spec.kind == "tfp":
        if not _warned_tfp:
            log.warning(
                "INSECURE provider TFP: party 0 generates all correlated randomness and can "
                "learn every secret; use it for tests and development only"
            )
            _warned_tfp = True
        cfg.mpc.provider = "TFP"
    else:
        cfg.mpc.provider = DEALER_PROVIDER_NAME


def dealer_provider() -> DealerProvider:
    return _dealer_provider


@contextlib.contextmanager
def crypten_session(
    transport: PeerTransport, session_id: str | None, provider: ProviderSpec,
    generations: dict[int, int] | None = None,
) -> Iterator[GrpcCommunicator]:
    """Open one CrypTen session over ``transport``; everything inside runs MPC over gRPC.

    Both (all) parties must open the session with the same id and run the same program.
    Sessions in a process run one at a time: CrypTen's state is process-global.
    ``generations`` pins the peers' links (``PeerTransport.link_state``) on which the
    parties agreed to run this session: if a peer went away since, the session fails at
    once with ``PeerDisconnected`` rather than reconnecting to a peer that never heard
    of it.  Without it, the session (re)connects and uses the links as they are now.
    """
    global _pending
    session_id = session_id or uuid.uuid4().hex
    with _session_lock:
        if _active is not None:
            raise MpcRuntimeError("a CrypTen session is already open in this process")
        if generations is None:
            transport.ensure_connected()
        comm = GrpcCommunicator(transport, session_id, generations)
        cfg.communicator.verbose = True
        select_provider(provider)
        _pending = comm
        try:
            crypten.init()
        except BaseException:
            _pending = None
            _uninit()
            transport.end_session(session_id)
            raise
        _pending = None
        # CrypTen's init synchronises the parties' PRNG seeds over the communicator, and
        # verbose accounting is already on: start the session's figures from zero so that
        # they count the program alone (as stock CrypTen's do, which turn verbose on later).
        comm.reset_communication_stats()
        dealer_open = False
        try:
            if provider.kind == "dealer":
                _dealer_provider.begin(session_id, comm.rank, comm.world_size, provider)
                dealer_open = True
            yield comm
        except BaseException as exc:
            if not isinstance(exc, PeerAborted):
                # Our part failed (dealer, a bug, a stuck peer, an interrupt): tell the
                # peers now rather than leave them waiting for the receive timeout.  The
                # reason names the error type only, since messages could carry values;
                # a DealerError's message is the dealer's status and our own text.
                # (abort_session bounds its length.)
                reason = type(exc).__name__
                if isinstance(exc, DealerError):
                    reason = f"{reason}: {exc}"
                transport.abort_session(session_id, reason)
            raise
        finally:
            if dealer_open:
                _dealer_provider.end()
            crypten.uninit()
            transport.end_session(session_id)
