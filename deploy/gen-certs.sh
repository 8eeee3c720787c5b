#!/bin/sh
# Generate a demo role-tagged PKI for mutual TLS between dealer, party0, party1 and client.
# Usage: deploy/gen-certs.sh [OUT_DIR] [EXTRA_HOSTS]
#   OUT_DIR      default deploy/certs
#   EXTRA_HOSTS  comma-separated host names/IPs the dealer's and parties' certificates
#                must also cover (the real addresses when they run on separate hosts)
# Writes ca.pem (signs dealer and parties), client-ca.pem + client-ca.key (signs clients)
# and <role>.pem/.key for dealer, party0, party1 and client; each certificate states its
# role in a URI SAN (mpcvit://party/0, mpcvit://dealer, mpcvit://client/client, ...).
# More clients later: mpcvit certs --out OUT_DIR --client NAME (writes client-NAME.pem).
# Then point each process at it: MPCVIT_TLS_DIR=OUT_DIR, or the `tls:` block of its YAML.
set -eu
OUT=${1:-deploy/certs}
HOSTS=${2:-}
exec mpcvit certs --out "$OUT" --hosts "localhost,127.0.0.1${HOSTS:+,$HOSTS}"
