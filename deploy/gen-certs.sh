#!/bin/sh
# Generate a demo PKI for mutual TLS between dealer, party0, party1 and client.
# Usage: deploy/gen-certs.sh [OUT_DIR] [EXTRA_HOSTS]
#   OUT_DIR      default deploy/certs
#   EXTRA_HOSTS  comma-separated host names/IPs the certificates must also cover
#                (the real addresses when the parties run on separate hosts)
# Then point each process at it: MPCVIT_TLS_DIR=OUT_DIR, or the `tls:` block of its YAML.
set -eu
OUT=${1:-deploy/certs}
HOSTS=${2:-}
exec mpcvit certs --out "$OUT" --hosts "localhost,127.0.0.1${HOSTS:+,$HOSTS}"
