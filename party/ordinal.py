"""``{ordinal}`` in a party's addresses: how replica k of a StatefulSet finds replica k
of the other party (and its dealer) without a config file per replica.

A value such as ``peer: mpcvit-party1-{ordinal}.mpcvit-party1:50051`` becomes
``mpcvit-party1-3.mpcvit-party1:50051`` in the pod whose ordinal is 3.  The ordinal is
``$MPCVIT_ORDINAL`` (the manifests fill it from the ``apps.kubernetes.io/pod-index``
label through the downward API) or, when that is unset or empty, the number after the
last ``-`` of the host name (a StatefulSet pod is named ``<statefulset>-<ordinal>``).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from typing import Any

from mpcvit.mpc.errors import ConfigError

PLACEHOLDER = "{ordinal}"
ENV_ORDINAL = "MPCVIT_ORDINAL"
ADDRESS_KEYS = ("listen", "peer", "dealer")


def pod_ordinal(env: Mapping[str, str], hostname: str | None = None) -> int | None:
    """This replica's ordinal, or None when neither source gives one."""
    value = (env.get(ENV_ORDINAL) or "").strip()
    if value:
        if not value.isdigit():
            raise ConfigError(f"{ENV_ORDINAL}={value!r} is not a replica ordinal")
        return int(value)
    if hostname is None:
        hostname = env.get("HOSTNAME") or socket.gethostname()
    match = re.search(r"-(\d+)$", hostname.split(".", 1)[0])
    return int(match.group(1)) if match else None


def expand_ordinal(data: dict[str, Any], env: Mapping[str, str] | None = None,
                   hostname: str | None = None) -> dict[str, Any]:
    """A copy of ``data`` with ``{ordinal}`` replaced in its address values."""
    env = os.environ if env is None else env
    used = [k for k in ADDRESS_KEYS if PLACEHOLDER in str(data.get(k) or "")]
    if not used:
        return data
    ordinal = pod_ordinal(env, hostname)
    if ordinal is None:
        raise ConfigError(f"{', '.join(used)} use {PLACEHOLDER} but this process has no "
                          f"replica ordinal: set {ENV_ORDINAL} or run it as a StatefulSet pod "
                          "(host name ending in -<ordinal>)")
    out = dict(data)
    for key in used:
        out[key] = str(out[key]).replace(PLACEHOLDER, str(ordinal))
    return out
