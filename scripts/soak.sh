#!/usr/bin/env bash
# The soak test: the real daemon, hundreds of clients streaming X509-SVIDs and fetching JWT-SVIDs,
# an edit every second, SVIDs rotating every ~3 s. Bounded: TBOT_SOAK_SECS (default 180).
# Prints the report (errors by code, resident memory and descriptors after the warm-up and at the
# end); with TBOT_REPORT_DIR set, also writes soak.json there. Not part of CI (too long).
set -euo pipefail
cd "$(dirname "$0")/.."
export TBOT_SOAK_SECS="${TBOT_SOAK_SECS:-180}"
exec cargo test --release --test soak -- --ignored --nocapture
