#!/usr/bin/env bash
# The whole test suite: unit tests, integration tests (the real binaries on real files and sockets,
# moto as the STS stand-in for `iam` joins, py-spiffe/grpcio/cryptography as independent clients) and
# doc tests.
# Usage: scripts/test.sh   (from anywhere). Needs python3 (3.10+, with venv), openssl, etcd,
# haproxy and cargo-nextest (falls back to cargo test); creates target/test-venv with the Python peers
# of tests/peers/requirements.txt (moto, py-spiffe, grpcio, cryptography) on first run.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use (the build needs none: no `protoc`): openssl (an independent check
# of every certificate), python3's venv,
# node, etcd (a real 3-member cluster for the HA issuer), haproxy (the load balancer in front of
# the replicas), lintian (checks the Debian package of scripts/package.sh), and podman with runc,
# busybox-static and catatonit (a real container engine for the container attestors). Installed
# with apt-get when missing (as root; else say what to install).
missing=()
command -v etcd >/dev/null || missing+=(etcd-server)
command -v etcdctl >/dev/null || missing+=(etcd-client)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v openssl >/dev/null || missing+=(openssl)
command -v lintian >/dev/null || missing+=(lintian)
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || [ -x /usr/sbin/runc ] || missing+=(runc)
command -v busybox >/dev/null || missing+=(busybox-static)
command -v catatonit >/dev/null || [ -x /usr/libexec/podman/catatonit ] || missing+=(catatonit)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq "${missing[@]}"
    else
        echo "the tests need: ${missing[*]} (install them, e.g. sudo apt-get install ${missing[*]})" >&2
        exit 2
    fi
fi

venv=target/test-venv
requirements=tests/peers/requirements.txt
# (Re)install when the requirements changed since the venv was made.
if ! cmp -s "$requirements" "$venv/requirements.installed" 2>/dev/null; then
    echo "installing the test peers ($requirements) into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$venv/requirements.installed"
fi
export TBOT_TEST_VENV="$PWD/$venv"

# The JavaScript peer (@grpc/grpc-js, a gRPC implementation of its own) into target/test-node.
node_peers=target/test-node
if ! cmp -s tests/peers/node/package.json "$node_peers/package.json" 2>/dev/null; then
    echo "installing the JavaScript test peers (tests/peers/node/package.json) into $node_peers" >&2
    mkdir -p "$node_peers"
    cp tests/peers/node/package.json "$node_peers/package.json"
    (cd "$node_peers" && npm install --no-audit --no-fund --silent)
fi
export TBOT_TEST_NODE_MODULES="$PWD/$node_peers/node_modules"

cargo test --doc -q
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --all-targets --no-fail-fast
else
    echo "cargo-nextest not found; using cargo test" >&2
    cargo test --all-targets --no-fail-fast
fi
