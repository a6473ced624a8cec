#!/usr/bin/env bash
# The whole test suite: unit tests, integration tests (the real binaries on real files and sockets,
# moto as the STS stand-in for `iam` joins) and doc tests.
# Usage: scripts/test.sh   (from anywhere). Needs python3 (3.9+), openssl and cargo-nextest (falls
# back to cargo test); creates target/test-venv with moto[server] on first run.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/test-venv
if [ ! -x "$venv/bin/moto_server" ]; then
    echo "installing the test peers (moto[server]) into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'moto[server]>=5,<6'
fi
export TBOT_TEST_VENV="$PWD/$venv"

cargo test --doc -q
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --all-targets --no-fail-fast
else
    echo "cargo-nextest not found; using cargo test" >&2
    cargo test --all-targets --no-fail-fast
fi
