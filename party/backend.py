"""The secure model behind a party server: CrypTen sessions over the peer transport.

Implements the coordinator's ``SecureBackend`` with the project's runtime
(``mpcvit.mpc.runtime.crypten_session``) and ``mpcvit.models.secure.SecureViT``.
Party 0 holds the plaintext model; party 1 learns only the public architecture and
receives weight shares in the start-up session.  Input shares arrive from the client
already split, so they enter CrypTen with ``MPCTensor.from_shares`` (no extra round),
and output shares are re-randomised with a pseudo-random zero sharing before they
leave, so each party's output share alone is uniform whatever the model computed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from mpcvit.models.plan import ModelPlan
from mpcvit.models.secure import program_fingerprint
from mpcvit.mpc.compat import import_crypten
from mpcvit.mpc.errors import DealerUnreachable, PeerError

from .pairing import SessionStats

crypten = import_crypten()
import torch  # noqa: E402  (after CrypTen's compat shim)

log = logging.getLogger("mpcvit.party")


CODE_FINGERPRINT = program_fingerprint()


@dataclass(frozen=True)
class ModelFacts:
    """Public facts of the served model: what ModelInfo reports and party 1 receives."""

    name: str
    config: dict[str, Any]
    spec: dict[str, Any]
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    extra: dict[str, Any] = field(default_factory=dict)
    # The protocol plan both parties run, per block type (``ModelPlan.to_dict``; {} is the
    # default plan).
    protocol: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (int(c["in_chans"]), int(c["image_size"]), int(c["image_size"]))

    @property
    def num_classes(self) -> int:
        return int(self.config["num_classes"])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.config, "spec": self.spec,
                "class_names": list(self.class_names), "mean": list(self.mean),
                "std": list(self.std), "code": CODE_FINGERPRINT,
                "protocol": dict(self.protocol)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelFacts:
        try:
            return cls(name=str(d["name"]), config=dict(d["config"]), spec=dict(d["spec"]),
                       class_names=tuple(str(n) for n in d.get("class_names", ())),
                       mean=tuple(float(v) for v in d.get("mean", ())),
                       std=tuple(float(v) for v in d.get("std", ())),
                       protocol=ModelPlan.from_dict(d.get("protocol") or {}).to_dict())
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed model description from the leader: {exc}") from None


def describe_model(model: Any, name: str, dataset: str | None,
                   extra: dict[str, Any] | None = None) -> ModelFacts:
    """Public facts of a plaintext ViT (architecture, class names, normalisation).

    The checkpoint's own metadata (``extra``) wins over the configured ``dataset``.
    """
    from mpcvit.models import data

    extra = extra or {}
    config = model.config
    class_names: tuple[str, ...] = tuple(str(n) for n in extra.get("class_names") or ())
    norm = extra.get("normalization") or {}
    mean: tuple[float, ...] = tuple(float(v) for v in norm.get("mean") or ())
    std: tuple[float, ...] = tuple(float(v) for v in norm.get("std") or ())
    dataset = extra.get("dataset") or dataset
    if dataset and not mean:
        known = data.normalization_for(dataset, config.in_chans)
        mean, std = tuple(known.mean), tuple(known.std)
    if dataset and not class_names and dataset.split(":", 1)[0].lower() == "fashion-mnist":
        class_names = data.FASHION_MNIST_CLASSES
    if not class_names:
        class_names = tuple(str(i) for i in range(config.num_classes))
    plan = ModelPlan.of(getattr(model, "protocol", None))
    return ModelFacts(name=name, config=config.to_dict(), spec=model.spec.to_dict(),
                      class_names=class_names, mean=mean, std=std, protocol=plan.to_dict())


class CrypTenBackend:
    """One party's secure model; every method runs inside its own CrypTen session."""

    def __init__(self, transport: Any, provider: Any, *, rank: int,
                 model: Any = None, facts: ModelFacts | None = None,
                 bulk_prepare_max_batch: int = 0) -> None:
        if rank == 0 and (model is None or facts is None):
            raise ValueError("party 0 needs the plaintext model and its public facts")
        self.transport = transport
        self.provider = provider
        self.rank = rank
        self._model = model  # party 0 only; never leaves this process in the clear
        self.facts = facts
        # A session of up to this many images that finds nothing prepared fetches its
        # randomness in bulk first.
        self.bulk_prepare_max_batch = bulk_prepare_max_batch
        self._secure = None
        self.precision_bits = int(crypten.encoder.FixedPointEncoder().scale).bit_length() - 1
        # Tuple traces of past sessions by batch size: what an offline phase must prepare.
        self._traces: dict[int, list] = {}

    # -- coordinator interface ---------------------------------------------------------
    def public_model(self) -> dict[str, Any]:
        assert self.facts is not None
        return self.facts.to_dict()

    def load_public_model(self, meta: dict[str, Any]) -> None:
        if meta.get("code") != CODE_FINGERPRINT:
            raise ValueError(f"party 0 runs secure-model code {meta.get('code')!r}, this party "
                             f"{CODE_FINGERPRINT!r}: deploy the same mpcvit version on both")
        self.facts = ModelFacts.from_dict(meta)
        self._secure = None
        self._traces.clear()
        self.discard_prepared()

    # -- offline phase (dealer provider only) ------------------------------------------
    def can_prepare(self, batch: int) -> bool:
        return self.provider.kind == "dealer" and batch in self._traces

    def _generations(self, link: int | None) -> dict[int, int] | None:
        return None if link is None else {1 - self.rank: link}

    def probe_dealer(self) -> str | None:
        """None if the dealer answers (or is not used); else why not."""
        if self.provider.kind != "dealer":
            return None
        from mpcvit.mpc.dealer import DealerProvider

        return DealerProvider.probe(self.provider)

    def prepare(self, session: str, batch: int, link: int | None = None) -> float:
        """Fetch/draw the correlated randomness of a future ``batch``-image session now.

        Uses the tuple trace of an earlier session of the same batch size (the protocol
        is data-oblivious, so every such session makes the same requests).  With ``link``
        the work stops as soon as the peer's link leaves that generation."""
        from mpcvit.mpc.runtime import dealer_provider

        if not self.can_prepare(batch):
            raise RuntimeError(f"no tuple trace for batch size {batch} yet")
        generations = self._generations(link)
        check = None
        if generations is not None:
            def check() -> None:
                self.transport.check_link(generations)
        log.info("event=offline_prepare_start session=%s batch=%d", session, batch)
        seconds = dealer_provider().prepare(session, self.rank, 2, self.provider,
                                            self._traces[batch], check)
        log.info("event=offline_prepared session=%s batch=%d seconds=%.3f", session, batch,
                 seconds)
        return seconds

    def discard_prepared(self) -> None:
        if self.provider.kind == "dealer":
            from mpcvit.mpc.runtime import dealer_provider

            dealer_provider().discard_prepared()

    def _bulk_prepare(self, session: str, batch: int, link: int | None) -> None:
        """A session that nothing prepared while idle (a busy service) fetches its
        randomness now in a few bulk requests, not tuple by tuple during the online phase.
        Each party decides alone: a party's tuples are the same whether drawn ahead or
        online, so the two need not agree."""
        if batch > self.bulk_prepare_max_batch or not self.can_prepare(batch):
            return
        from mpcvit.mpc.runtime import dealer_provider

        if dealer_provider().is_prepared(session):
            return
        try:
            self.prepare(session, batch, link)
        except (PeerError, DealerUnreachable):
            raise
        except Exception as exc:  # noqa: BLE001 - the online phase fetches instead
            log.warning("event=bulk_prepare_failed session=%s error=%s", session,
                        type(exc).__name__)

    def share_weights(self, session: str, link: int | None = None) -> None:
        from mpcvit.models.configs import ViTConfig
        from mpcvit.models.secure import SecureViT
        from mpcvit.models.spec import ArchSpec
        from mpcvit.mpc.runtime import crypten_session

        assert self.facts is not None
        config = ViTConfig.from_dict(self.facts.config)
        spec = ArchSpec.from_dict(self.facts.spec)
        self._secure = None
        # Traces name the dealer's weight masks of the previous shares: stale now.
        self._traces.clear()
        self.discard_prepared()
        start = time.perf_counter()
        with crypten_session(self.transport, session, self.provider,
                             self._generations(link)):
            secure = SecureViT.from_model(self._model if self.rank == 0 else None,
                                          config, spec, src=0,
                                          protocol=ModelPlan.from_dict(self.facts.protocol))
        self._secure = secure
        log.info("event=weights_session session=%s seconds=%.2f", session,
                 time.perf_counter() - start)

    def infer(self, session: str, inputs: np.ndarray,
              link: int | None = None) -> tuple[np.ndarray, SessionStats]:
        from crypten.mpc import MPCTensor
        from crypten.mpc.primitives import ArithmeticSharedTensor
        from mpcvit.mpc.runtime import crypten_session

        if self._secure is None:
            raise RuntimeError("no weight shares: the start-up session has not run")
        start = time.perf_counter()
        try:
            self._bulk_prepare(session, len(inputs), link)
        except (PeerError, DealerUnreachable) as exc:
            # The session cannot run either.  The peer may already wait in it: tell it
            # now (as a failing session would), not after its receive timeout.
            reason = type(exc).__name__
            if isinstance(exc, DealerUnreachable):
                reason = f"{reason}: {exc}"
            self.transport.abort_session(session, reason)
            raise
        with crypten_session(self.transport, session, self.provider,
                             self._generations(link)) as comm:
            x = MPCTensor.from_shares(torch.from_numpy(np.ascontiguousarray(inputs)),
                                      precision=self.precision_bits)
            with torch.no_grad():
                logits = self._secure(x)
            out = logits._tensor
            mask = ArithmeticSharedTensor.PRZS(out.share.size())
            shares = (out.share + mask.share).numpy().astype(np.int64, copy=True)
            comm_stats = comm.get_communication_stats()
        if self.provider.kind == "dealer":
            from mpcvit.mpc.runtime import dealer_provider

            self._traces[len(inputs)] = list(dealer_provider().last_trace)
        stats = SessionStats(
            session=session, seconds=time.perf_counter() - start,
            rounds=int(comm_stats.get("rounds", 0)), bytes_sent=int(comm_stats.get("bytes", 0)),
            batch_size=len(inputs),
        )
        scale_bits = int(out.encoder.scale).bit_length() - 1
        if scale_bits != self.precision_bits:
            raise RuntimeError("secure model returned an unexpected fixed-point scale")
        return shares, stats
