"""``python -m mpcvit.party.healthcheck HOST:PORT [ROLE]``: exit 0 iff the server is SERVING.

For container health checks.  With ``$MPCVIT_TLS_DIR`` set it connects over mutual TLS
as ROLE (its own certificate), with ``127.0.0.1`` covered by the demo certificates.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__, file=sys.stderr)
        return 2
    import grpc

    from .local import health_status

    credentials = None
    tls_dir = os.environ.get("MPCVIT_TLS_DIR")
    if tls_dir:
        d, role = Path(tls_dir), argv[1] if len(argv) > 1 else "client"
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(d / "ca.pem").read_bytes(),
            private_key=(d / f"{role}.key").read_bytes(),
            certificate_chain=(d / f"{role}.pem").read_bytes())
    status = health_status(argv[0], credentials=credentials)
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
