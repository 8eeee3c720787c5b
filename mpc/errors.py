"""Errors raised by the secure runtime, so callers can map them to clear statuses."""

from __future__ import annotations


class MpcRuntimeError(RuntimeError):
    """Base class of every error the secure runtime raises on purpose."""


class PeerError(MpcRuntimeError):
    """Talking to another party failed; the current session cannot continue."""


class PeerTimeout(PeerError):
    """A peer did not send what the protocol expected within the timeout."""


class PeerDisconnected(PeerError):
    """A peer's stream closed (crashed, killed or shut down) during a session."""


class PeerAborted(PeerError):
    """A peer gave up the session (its own part failed) and said so."""


class ProtocolViolation(PeerError):
    """A peer sent something the protocol does not allow (wrong sequence, shape, ...)."""


class DealerError(MpcRuntimeError):
    """The dealer could not be reached or refused a request."""


class DealerUnreachable(DealerError):
    """No connection to the dealer (down, restarting, or the network is cut)."""


class ConfigError(MpcRuntimeError, ValueError):
    """A runtime configuration is missing a field or has a bad value."""
