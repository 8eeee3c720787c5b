"""Secure runtime: CrypTen over gRPC (see docs/runtime.md).

Importing this package installs the CrypTen compatibility shim (``compat``) before any
of its modules imports CrypTen.
"""

from . import compat

compat.install()
