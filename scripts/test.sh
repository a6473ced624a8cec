#!/usr/bin/env bash
# The whole test suite: unit tests, integration tests (the real binaries on real files) and doc tests.
# Usage: scripts/test.sh   (from anywhere; installs nothing beyond the Rust toolchain's cargo-nextest)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --doc -q
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --all-targets --no-fail-fast
else
    echo "cargo-nextest not found; using cargo test" >&2
    cargo test --all-targets --no-fail-fast
fi
