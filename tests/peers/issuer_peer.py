"""A client of tbot's issuer API nobody here wrote: grpcio (grpc C-core) with stubs generated from
proto/issuer.proto at test time by grpcio-tools, keys made by Python `cryptography`. It sends what a
real agent never would and prints one JSON object of what the issuer answered; the Rust tests assert
on it.

Usage (the test venv from scripts/test.sh has the packages):
    issuer_peer.py hostile ADDRESS CA_PEM TOKEN IDENTITY
        ADDRESS: host:port of the issuer API; CA_PEM: the trust domain's CA; TOKEN: an unused
        single-use token; IDENTITY: a workload identity the token's bot may have whose SPIFFE ID
        reads `workload.unix.uid`.
"""

import importlib
import json
import os
import subprocess
import sys
import tempfile

import grpc
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FORGED = "2026-12-04T00:00:00.000000Z  INFO tbot::daemon: bot joined bot=admin"


def stubs():
    """Generates and imports the issuer API's stubs (package tbot.issuer.v1)."""
    out = tempfile.mkdtemp(prefix="issuer-stubs-")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            os.path.join(ROOT, "proto"),
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "issuer.proto",
        ],
        check=True,
    )
    sys.path.insert(0, out)
    return importlib.import_module("issuer_pb2"), importlib.import_module("issuer_pb2_grpc")


def new_key():
    key = ec.generate_private_key(ec.SECP256R1())
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key, spki


def code_of(fn):
    try:
        fn()
        return {"code": "OK"}
    except grpc.RpcError as e:
        return {"code": e.code().name, "details": e.details()}


def hostile(address, ca_pem, token, identity):
    pb, rpc = stubs()
    with open(ca_pem, "rb") as f:
        ca = f.read()
    anonymous = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca))
    joins = rpc.JoinServiceStub(anonymous)
    out = {}

    def join(method, token_name, public_key):
        init = pb.ClientInit(token_name=token_name, join_method=method, public_key=public_key, ttl_seconds=3600)
        for answer in joins.Join(iter([pb.JoinRequest(init=init)]), timeout=10):
            return answer.result
        raise RuntimeError("no answer")

    # A join method that carries a forged log line.
    out["forged_log_line"] = code_of(lambda: join("token\n" + FORGED + "\x1b[31m", token, new_key()[1]))
    # 64 random bytes as the key: refused, and the token stays unspent.
    out["malformed_key_join"] = code_of(lambda: join("token", token, os.urandom(64)))
    key, spki = new_key()
    bot = join("token", token, spki)
    out["join_after_malformed_key"] = {"code": "OK", "generation": bot.generation}
    out["join_claims"] = dict(bot.join)

    # As the bot: its certificate as the TLS client certificate.
    def as_bot(certificate_der, private_key):
        pem = b"-----BEGIN CERTIFICATE-----\n"
        import base64

        body = base64.encodebytes(certificate_der)
        pem += body + b"-----END CERTIFICATE-----\n"
        key_pem = private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key_pem, certificate_chain=pem)
        return grpc.secure_channel(address, creds)

    channel = as_bot(bot.certificate, key)
    workloads = rpc.WorkloadIdentityServiceStub(channel)
    svid_key, svid_spki = new_key()
    for name, value in [("slash", "0/db"), ("word", "root"), ("signed", "-1"), ("escape", "1\n2")]:
        request = pb.IssueX509Request(
            identity=identity,
            workload=[pb.Attribute(name="workload.unix.uid", values=[value])],
            public_key=svid_spki,
            ttl_seconds=600,
        )
        out[f"uid_{name}"] = code_of(lambda: workloads.IssueX509(request, timeout=10))
    request = pb.IssueX509Request(
        identity=identity,
        workload=[pb.Attribute(name="workload.unix.uid", values=["1000"])],
        public_key=svid_spki,
        ttl_seconds=600,
    )
    out["uid_number"] = code_of(lambda: workloads.IssueX509(request, timeout=10))
    # A point that is not on the curve, as an SVID key.
    off_curve = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200") + b"\x04" + b"\x07" * 64
    request = pb.IssueX509Request(
        identity=identity,
        workload=[pb.Attribute(name="workload.unix.uid", values=["1000"])],
        public_key=off_curve,
        ttl_seconds=600,
    )
    out["off_curve_svid_key"] = code_of(lambda: workloads.IssueX509(request, timeout=10))

    # A renewal with a malformed key, then a good one: not taken for a copy.
    bots = rpc.BotServiceStub(channel)
    junk = os.urandom(64)
    proof = key.sign(junk, ec.ECDSA(hashes.SHA256()))
    out["malformed_key_renewal"] = code_of(lambda: bots.Renew(pb.RenewRequest(public_key=junk, proof=proof, ttl_seconds=3600), timeout=10))
    next_key, next_spki = new_key()
    proof = key.sign(next_spki, ec.ECDSA(hashes.SHA256()))
    try:
        renewed = bots.Renew(pb.RenewRequest(public_key=next_spki, proof=proof, ttl_seconds=3600), timeout=10)
        out["renewal_after_malformed_key"] = {"code": "OK", "generation": renewed.generation}
    except grpc.RpcError as e:
        out["renewal_after_malformed_key"] = {"code": e.code().name, "details": e.details()}
    return out


def main(argv):
    command, args = argv[1], argv[2:]
    if command == "hostile":
        result = hostile(*args)
    else:
        raise SystemExit(f"unknown command {command}; see the usage at the top of this file")
    print(json.dumps(result, indent=1, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv)
