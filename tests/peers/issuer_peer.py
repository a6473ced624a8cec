"""A client of tbot's issuer API nobody here wrote: grpcio (grpc C-core) with stubs generated from
proto/issuer.proto at test time by grpcio-tools, keys made by Python `cryptography`. It sends what a
real agent never would and prints one JSON object of what the issuer answered; the Rust tests assert
on it.

Usage (the test venv from scripts/test.sh has the packages):
    issuer_peer.py hostile ADDRESS CA_PEM TOKEN IDENTITY IAM_TOKEN SVC_IDENTITY [TOKEN2]
        ADDRESS: host:port of the issuer API; CA_PEM: the trust domain's CA; TOKEN: an unused
        single-use token; IDENTITY: a workload identity the token's bot may have whose SPIFFE ID
        reads `workload.unix.uid`; IAM_TOKEN: an `iam` token; SVC_IDENTITY: one whose SPIFFE ID and
        a DNS SAN read `workload.systemd.service`; TOKEN2: another unused token, joined with an
        Ed25519 key.
"""

import base64
import importlib
import os
import queue
import socket
import ssl
import subprocess
import sys
import tempfile

import grpc
from cryptography.hazmat.primitives import hashes, serialization
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from peer_exit import finish, watchdog

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


def pem_of(certificate_der):
    return b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(certificate_der) + b"-----END CERTIFICATE-----\n"


def key_pem(private_key):
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def self_signed(key, common_name):
    """A certificate signed by its own key, named like a bot: what an imitator can make."""
    import datetime

    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def nested_spki(inner):
    """An EC SubjectPublicKeyInfo whose bit string holds a whole SubjectPublicKeyInfo."""
    algorithm = bytes.fromhex("301306072a8648ce3d020106082a8648ce3d030107")
    bits = b"\x03" + der_length(len(inner) + 1) + b"\x00" + inner
    body = algorithm + bits
    return b"\x30" + der_length(len(body)) + body


def der_length(n):
    return bytes([n]) if n < 0x80 else bytes([0x81, n])


def tls12_handshake(address, ca):
    """Whether a TLS 1.2-only client completes a handshake with the issuer API."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cadata=ca.decode())
    context.check_hostname = False
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            with context.wrap_socket(raw):
                return "accepted"
    except (ssl.SSLError, ConnectionError) as e:
        return f"refused: {e}"


def code_of(fn):
    try:
        fn()
        return {"code": "OK"}
    except grpc.RpcError as e:
        return {"code": e.code().name, "details": e.details()}


def hostile(address, ca_pem, token, identity, iam_token, svc_identity, token2=None):
    pb, rpc = stubs()
    with open(ca_pem, "rb") as f:
        ca = f.read()
    anonymous = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca))
    joins = rpc.JoinServiceStub(anonymous)
    # Another connection without a client certificate that never joins (its own subchannel, so
    # grpc does not share `anonymous`'s connection with it).
    stranger = grpc.secure_channel(
        address,
        grpc.ssl_channel_credentials(root_certificates=ca),
        options=[("grpc.use_local_subchannel_pool", 1)],
    )
    out = {}

    def join(method, token_name, public_key):
        init = pb.ClientInit(token_name=token_name, join_method=method, public_key=public_key, ttl_seconds=3600)
        for answer in joins.Join(iter([pb.JoinRequest(init=init)]), timeout=10):
            return answer.result
        raise RuntimeError("no answer")

    # An `iam` token name with terminal escapes and a forged line, in the answer to a challenge:
    # refused, never echoed or logged raw.
    def iam_join(token_name, method="POST"):
        answers = queue.Queue()

        def requests():
            yield pb.JoinRequest(init=pb.ClientInit(join_method="iam"))
            challenge = answers.get(timeout=10)
            solution = pb.IamSolution(
                method=method,
                url="https://sts.amazonaws.com/",
                headers={"X-Teleport-Challenge": challenge},
                body=b"Action=GetCallerIdentity&Version=2011-06-15",
                token_name=token_name,
                public_key=new_key()[1],
                ttl_seconds=3600,
            )
            yield pb.JoinRequest(solution=solution)

        for answer in joins.Join(requests(), timeout=10):
            if answer.HasField("challenge"):
                answers.put(answer.challenge.challenge)
            else:
                return answer.result
        raise RuntimeError("no answer")

    # First, so the issuer logs it (one line per source every 10 s): a method that carries a
    # terminal escape and a forged line, which the refusal quotes.
    out["iam_forged_method"] = code_of(lambda: iam_join(iam_token, "GET\x1b[31m\n" + FORGED))
    out["iam_escapes"] = code_of(lambda: iam_join("\x1b[31mhostile-iam\n" + FORGED))

    def x509_request(identity, attribute, value, public_key):
        workload = [pb.Attribute(name=attribute, values=[value])]
        return pb.IssueX509Request(identity=identity, workload=workload, public_key=public_key, ttl_seconds=600)

    # A join method that carries a forged log line.
    out["forged_log_line"] = code_of(lambda: join("token\n" + FORGED + "\x1b[31m", token, new_key()[1]))
    # 64 random bytes as the key: refused, and the token stays unspent.
    out["malformed_key_join"] = code_of(lambda: join("token", token, os.urandom(64)))
    key, spki = new_key()
    bot = join("token", token, spki)
    out["join_after_malformed_key"] = {"code": "OK", "generation": bot.generation}
    # The connection the join came on had no client certificate: the issuer says it now
    # authenticates as the new bot certificate, and it does (no second handshake).
    out["join_bound"] = bot.connection_bound
    on_joined = rpc.WorkloadIdentityServiceStub(anonymous)
    try:
        on_joined.Report(pb.HoldingsReport(), timeout=10)
        out["report_on_joined_connection"] = {"code": "OK"}
    except grpc.RpcError as e:
        out["report_on_joined_connection"] = {"code": e.code().name, "details": e.details()}
    # Someone who learnt the used token and the bot's public key (it is in its certificate) repeats
    # the join on a connection of their own: the issuer takes it for a retry whose answer was lost
    # and signs the instance's certificate again, but that proves no hold of the key, so the
    # connection is not bound and cannot act as the instance.
    replay = grpc.secure_channel(
        address,
        grpc.ssl_channel_credentials(root_certificates=ca),
        options=[("grpc.use_local_subchannel_pool", 1)],
    )
    init = pb.ClientInit(token_name=token, join_method="token", public_key=spki, ttl_seconds=3600)
    replayed = next(iter(rpc.JoinServiceStub(replay).Join(iter([pb.JoinRequest(init=init)]), timeout=10))).result
    out["replayed_join_bound"] = replayed.connection_bound
    out["report_after_replayed_join"] = code_of(
        lambda: rpc.WorkloadIdentityServiceStub(replay).Report(pb.HoldingsReport(), timeout=10)
    )
    out["join_claims"] = dict(bot.join)
    # Token refusals that held before this round, kept as regression checks.
    out["used_token"] = code_of(lambda: join("token", token, new_key()[1]))
    out["wrong_token"] = code_of(lambda: join("token", "no-such-token", new_key()[1]))

    # As the bot: its certificate as the TLS client certificate.
    def as_bot(certificate_der, private_key):
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key_pem(private_key), certificate_chain=pem_of(certificate_der)
        )
        return grpc.secure_channel(address, creds)

    channel = as_bot(bot.certificate, key)
    workloads = rpc.WorkloadIdentityServiceStub(channel)
    svid_key, svid_spki = new_key()
    for name, value in [("slash", "0/db"), ("word", "root"), ("signed", "-1"), ("escape", "1\n2")]:
        request = x509_request(identity, "workload.unix.uid", value, svid_spki)
        out[f"uid_{name}"] = code_of(lambda: workloads.IssueX509(request, timeout=10))
    request = x509_request(identity, "workload.unix.uid", "1000", svid_spki)
    granted = workloads.IssueX509(request, timeout=10)
    out["uid_number"] = {"code": "OK", "spiffe_id": granted.spiffe_id}
    # A string attribute: a `/` in the ID's segment, a dot or a wildcard in the DNS SAN's label.
    for name, value in [("slash", "a/db"), ("dot", "admin.prod"), ("wildcard", "*")]:
        request = x509_request(svc_identity, "workload.systemd.service", value, svid_spki)
        out[f"service_{name}"] = code_of(lambda: workloads.IssueX509(request, timeout=10))
    # A point that is not on the curve, as an SVID key.
    off_curve = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200") + b"\x04" + b"\x07" * 64
    request = x509_request(identity, "workload.unix.uid", "1000", off_curve)
    out["off_curve_svid_key"] = code_of(lambda: workloads.IssueX509(request, timeout=10))

    # Keys that are not keys, as SVID keys: a 2-byte P-256 key, a 31-byte Ed25519 key, RSA-1024, the
    # CA's own key.
    ca_key = x509.load_pem_x509_certificate(ca).public_key()
    rsa_1024 = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    not_keys = {
        "short_p256_key": bytes.fromhex("301a301306072a8648ce3d020106082a8648ce3d030107" + "0303000401"),
        "short_ed25519_key": bytes.fromhex("3029300506032b6570032000") + b"\x01" * 31,
        "rsa_1024_key": rsa_1024.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        "ca_own_key": ca_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        # The CA's point compressed, and the CA's whole SubjectPublicKeyInfo inside the bit string:
        # forms a lenient parser takes for the same key.
        "ca_key_compressed": bytes.fromhex("3039301306072a8648ce3d020106082a8648ce3d030107032200")
        + ca_key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint),
        "ca_key_nested": nested_spki(ca_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)),
    }
    for name, spki in not_keys.items():
        request = x509_request(identity, "workload.unix.uid", "1000", spki)
        out[name] = code_of(lambda: workloads.IssueX509(request, timeout=10))

    # Holdings reports an agent never sends: 200 keys, a name of 10 KB; then a real one.
    many = {f"sha256:{i:064x}": 1 for i in range(200)}
    out["report_many_keys"] = code_of(lambda: workloads.Report(pb.HoldingsReport(x509=many), timeout=10))
    out["report_long_name"] = code_of(lambda: workloads.Report(pb.HoldingsReport(jwt={"k" * 10000: 1}), timeout=10))
    try:
        workloads.Report(pb.HoldingsReport(jwt={"some-kid": 2}), timeout=10)
        out["report_plain"] = {"code": "OK"}
    except grpc.RpcError as e:
        out["report_plain"] = {"code": e.code().name, "details": e.details()}
    out["report_anonymous"] = code_of(
        lambda: rpc.WorkloadIdentityServiceStub(stranger).Report(pb.HoldingsReport(), timeout=10)
    )

    # Bytes that are not a protobuf message, as a unary request: the client's fault.
    raw_renew = channel.unary_unary("/tbot.issuer.v1.BotService/Renew")
    out["undecodable_request"] = code_of(lambda: raw_renew(b"\xff\xff\xff\xff", timeout=10))

    # Authentication, kept as regression checks: no client certificate, and a self-signed one named
    # like the bot.
    anonymous_workloads = rpc.WorkloadIdentityServiceStub(stranger)
    request = x509_request(identity, "workload.unix.uid", "1000", svid_spki)
    out["no_client_certificate"] = code_of(lambda: anonymous_workloads.IssueX509(request, timeout=10))
    # The joined connection issues as its bot.
    out["issue_on_joined_connection"] = code_of(lambda: on_joined.IssueX509(request, timeout=10))
    imitator_key = ec.generate_private_key(ec.SECP256R1())
    imitator = as_bot(self_signed(imitator_key, "bot-example-bot"), imitator_key)
    out["self_signed_certificate"] = code_of(
        lambda: rpc.WorkloadIdentityServiceStub(imitator).IssueX509(request, timeout=10)
    )
    out["tls_1_2"] = tls12_handshake(address, ca)

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

    # An Ed25519 bot key joins and renews: the renewal's proof is checked with the key's algorithm.
    if token2:
        ed_key = ed25519.Ed25519PrivateKey.generate()
        ed_spki = ed_key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        ed_bot = join("token", token2, ed_spki)
        # A connection keeps the first certificate it had: a second join on it binds nothing.
        out["second_join_bound"] = ed_bot.connection_bound
        next_key, next_spki = new_key()
        try:
            renewed = rpc.BotServiceStub(as_bot(ed_bot.certificate, ed_key)).Renew(
                pb.RenewRequest(public_key=next_spki, proof=ed_key.sign(next_spki), ttl_seconds=3600), timeout=10
            )
            out["ed25519_bot_renewal"] = {"code": "OK", "generation": renewed.generation}
        except grpc.RpcError as e:
            out["ed25519_bot_renewal"] = {"code": e.code().name, "details": e.details()}

    # Last, as it refuses this address for a while: joins beyond the per-address burst are refused
    # with a limit that names itself.
    burst = {}
    for _ in range(400):
        result = code_of(lambda: join("token", "no-such-token", b""))
        burst[result["code"]] = burst.get(result["code"], 0) + 1
        if result["code"] == "RESOURCE_EXHAUSTED":
            out["join_rate_limit"] = result
            break
    out["join_burst"] = burst
    return out


def main(argv):
    command, args = argv[1], argv[2:]
    watchdog(300)
    if command == "hostile":
        result = hostile(*args)
    else:
        raise SystemExit(f"unknown command {command}; see the usage at the top of this file")
    finish(result)


if __name__ == "__main__":
    main(sys.argv)
