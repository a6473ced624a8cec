"""An independent SPIFFE client for tbot's tests: py-spiffe and raw grpcio (grpc C-core), plus
Python `cryptography` as a strict DER parser. Prints one JSON object; the Rust tests assert on it.

Usage (the test venv from scripts/test.sh has the packages):
    spiffe_peer.py authorities SOCKET [ADMIN_SOCKET]
    spiffe_peer.py pyspiffe SOCKET AUDIENCE
    spiffe_peer.py sequential SOCKET COUNT
    spiffe_peer.py once SOCKET [AUDIENCE]   (one fetch in a new process, a JWT-SVID too with an
                                             audience: {"spiffe_id", "jwt"} or {"error", "details"})
    spiffe_peer.py bundles SOCKET
    spiffe_peer.py der FILE...       (each file: DER or PEM certificates)
    spiffe_peer.py watch SOCKET      (one line per update, until killed: scripts/fleet.sh)
    spiffe_peer.py crl SOCKET        (the CRLs of FetchX509SVID's and FetchX509Bundles' first messages,
                                      parsed by `cryptography` and checked against the bundle's CAs)
    spiffe_peer.py jwt_check SOCKET TOKEN AUDIENCE
                                     (PyJWT's verdict on TOKEN with the JWT bundle the socket serves now)
"""

import sys

import grpc

from peer_exit import finish, watchdog

HEADER = (("workload.spiffe.io", "true"),)
# The `:authority` values gRPC clients send on a unix socket: grpcio's default (the percent-encoded
# path), what grpc-java sends (the raw path), and others that are not a URI authority.
AUTHORITY_FORMS = ["default", "localhost", "raw-path", "percent-encoded-path", "empty", "weird host:name"]


def authority_value(form, socket):
    return {
        "localhost": "localhost",
        "raw-path": socket,
        "percent-encoded-path": socket.lstrip("/").replace("/", "%2F"),
        "empty": "",
        "weird host:name": "weird host:name",
    }.get(form)


def channel(socket, form="default"):
    options = []
    value = authority_value(form, socket)
    if value is not None:
        options.append(("grpc.default_authority", value))
    return grpc.insecure_channel("unix://" + socket, options=options)


def raw_call(chan, method, request=b"", stream=False, header=True):
    """Calls `method` with serialized `request` bytes; returns the first response's bytes."""
    metadata = HEADER if header else ()
    if stream:
        call = chan.unary_stream(method)(request, metadata=metadata, timeout=10)
        for message in call:
            call.cancel()
            return message
        return b""
    return chan.unary_unary(method)(request, metadata=metadata, timeout=10)


def outcome(fn):
    try:
        value = fn()
        return {"ok": True, "bytes": len(value)}
    except grpc.RpcError as e:
        return {"ok": False, "code": e.code().name, "details": e.details()}


def authorities(socket, admin=None):
    from spiffe._proto import workload_pb2

    jwt_request = workload_pb2.JWTSVIDRequest(audience=["peer"]).SerializeToString()
    out = {}
    for form in AUTHORITY_FORMS:
        with channel(socket, form) as chan:
            out[form] = {
                "FetchX509SVID": outcome(lambda: raw_call(chan, "/SpiffeWorkloadAPI/FetchX509SVID", stream=True)),
                "FetchJWTSVID": outcome(lambda: raw_call(chan, "/SpiffeWorkloadAPI/FetchJWTSVID", jwt_request)),
                "FetchX509Bundles": outcome(
                    lambda: raw_call(chan, "/SpiffeWorkloadAPI/FetchX509Bundles", stream=True)
                ),
                "no header": outcome(
                    lambda: raw_call(chan, "/SpiffeWorkloadAPI/FetchX509SVID", stream=True, header=False)
                ),
            }
        if admin:
            with channel(admin, form) as chan:
                out[form]["admin Status"] = outcome(lambda: raw_call(chan, "/tbot.admin.v1.Admin/Status", header=False))
    return out


def pyspiffe(socket, audience):
    from spiffe import WorkloadApiClient, X509Source

    out = {}
    with WorkloadApiClient(socket_path="unix://" + socket) as client:
        svid = client.fetch_x509_svid()
        out["x509_spiffe_id"] = str(svid.spiffe_id)
        out["x509_chain_len"] = len(svid.cert_chain)
        out["x509_not_after"] = svid.leaf.not_valid_after_utc.isoformat()
        context = client.fetch_x509_context()
        out["context_svids"] = [str(s.spiffe_id) for s in context.x509_svids]
        out["context_trust_domains"] = sorted(str(td) for td in context.x509_bundle_set._bundles.keys())
        bundles = client.fetch_x509_bundles()
        out["x509_bundle_trust_domains"] = sorted(str(td) for td in bundles._bundles.keys())
        jwt = client.fetch_jwt_svid(audience={audience})
        out["jwt_spiffe_id"] = str(jwt.spiffe_id)
        jwt_bundles = client.fetch_jwt_bundles()
        out["jwt_bundle_trust_domains"] = sorted(str(td) for td in jwt_bundles._bundles.keys())
        validated = client.validate_jwt_svid(jwt.token, audience)
        out["validated_spiffe_id"] = str(validated.spiffe_id)
        # Offline validation with the fetched JWT bundle (signature, kid, audience, expiry).
        from spiffe import JwtSvid

        td = jwt.spiffe_id.trust_domain
        offline = JwtSvid.parse_and_validate(jwt.token, jwt_bundles.get_bundle_for_trust_domain(td), {audience})
        out["offline_validated_spiffe_id"] = str(offline.spiffe_id)
    source = X509Source(socket_path="unix://" + socket, timeout_in_seconds=10)
    try:
        out["source_spiffe_id"] = str(source.svid.spiffe_id)
    finally:
        source.close()
    return out


def sequential(socket, count):
    """`count` one-shot fetches, each on a new connection, as a cron job would make them."""
    from spiffe import WorkloadApiClient

    serials = set()
    for _ in range(count):
        with WorkloadApiClient(socket_path="unix://" + socket) as client:
            serials.add(client.fetch_x509_svid().leaf.serial_number)
    return {"fetches": count, "distinct_serials": len(serials)}


def once(socket, audience=None):
    """One X509-SVID fetch on a new connection, from a new process: what a one-shot client does.
    With an audience, also a JWT-SVID, validated offline against the JWT bundle fetched beside it."""
    from spiffe import JwtSvid, WorkloadApiClient

    try:
        with WorkloadApiClient(socket_path="unix://" + socket) as client:
            out = {"spiffe_id": str(client.fetch_x509_svid().spiffe_id)}
            if audience:
                jwt = client.fetch_jwt_svid(audience={audience})
                bundle = client.fetch_jwt_bundles().get_bundle_for_trust_domain(jwt.spiffe_id.trust_domain)
                JwtSvid.parse_and_validate(jwt.token, bundle, {audience})
                out["jwt"] = "validated"
            return out
    except Exception as e:  # py-spiffe wraps the gRPC error; keep its words
        return {"error": type(e).__name__, "details": str(e).replace("\n", " ")}


def jwt_check(socket, token, audience):
    """Whether PyJWT accepts `token` for `audience` with the key of its `kid` from the JWT bundle
    the socket serves now (fetched with py-spiffe): what a relying party holding the JWKS decides."""
    import jwt as pyjwt
    from spiffe import TrustDomain, WorkloadApiClient

    kid = pyjwt.get_unverified_header(token).get("kid")
    with WorkloadApiClient(socket_path="unix://" + socket) as client:
        bundles = client.fetch_jwt_bundles()
    claims = pyjwt.decode(token, options={"verify_signature": False})
    bundle = bundles.get_bundle_for_trust_domain(TrustDomain(claims["sub"].split("/")[2]))
    key = bundle.get_jwt_authority(kid) if bundle else None
    if key is None:
        return {"kid": kid, "valid": False, "error": "no key with this kid in the JWT bundle"}
    try:
        pyjwt.decode(token, key=key, algorithms=["ES256", "ES384", "RS256", "PS256"], audience=audience)
        return {"kid": kid, "valid": True}
    except Exception as e:
        return {"kid": kid, "valid": False, "error": f"{type(e).__name__}: {e}"}


def bundles(socket):
    """The bundle streams, for a caller the socket may or may not have an identity for."""
    with channel(socket) as chan:
        return {
            "FetchX509Bundles": outcome(lambda: raw_call(chan, "/SpiffeWorkloadAPI/FetchX509Bundles", stream=True)),
            "FetchJWTBundles": outcome(lambda: raw_call(chan, "/SpiffeWorkloadAPI/FetchJWTBundles", stream=True)),
            "FetchX509SVID": outcome(lambda: raw_call(chan, "/SpiffeWorkloadAPI/FetchX509SVID", stream=True)),
        }


def crl(socket):
    """What the `crl` fields of the first X509-SVID and X509 bundles messages hold: for each CRL its
    issuer, whether one of the bundle's CAs signed it, and the revoked serials (lower-case hex);
    and the serials of the SVIDs."""
    from cryptography import x509
    from spiffe._proto import workload_pb2

    def described(crls, cas):
        out = []
        for der in crls:
            parsed = x509.load_der_x509_crl(der)
            out.append(
                {
                    "issuer": parsed.issuer.rfc4514_string(),
                    "signed_by_bundle_ca": any(parsed.is_signature_valid(ca.public_key()) for ca in cas),
                    "revoked": sorted(format(r.serial_number, "x") for r in parsed),
                    "next_update_after_last_update": parsed.next_update_utc > parsed.last_update_utc,
                }
            )
        return out

    with channel(socket) as chan:
        svid = workload_pb2.X509SVIDResponse.FromString(
            raw_call(chan, "/SpiffeWorkloadAPI/FetchX509SVID", stream=True)
        )
        bundles = workload_pb2.X509BundlesResponse.FromString(
            raw_call(chan, "/SpiffeWorkloadAPI/FetchX509Bundles", stream=True)
        )
    cas = [x509.load_der_x509_certificate(c) for c in certificates(svid.svids[0].bundle)]
    return {
        "svid_serials": [
            format(x509.load_der_x509_certificate(certificates(s.x509_svid)[0]).serial_number, "x") for s in svid.svids
        ],
        "svid_crls": described(svid.crl, cas),
        "bundle_crls": described(bundles.crl, cas),
    }


def certificates(data):
    """Splits DER (concatenated) or PEM data into single DER certificates."""
    if data.lstrip().startswith(b"-----BEGIN"):
        import base64
        import re

        return [
            base64.b64decode(b"".join(block.split()))
            for block in re.findall(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", data, re.S)
        ]
    out = []
    while data:
        # One DER SEQUENCE: tag 0x30, then a definite length.
        if data[0] != 0x30:
            raise ValueError("not a DER SEQUENCE")
        first = data[1]
        if first < 0x80:
            length, header = first, 2
        else:
            n = first & 0x7F
            length, header = int.from_bytes(data[2 : 2 + n], "big"), 2 + n
        out.append(data[: header + length])
        data = data[header + length :]
    return out


def der(paths):
    """Parses every certificate strictly (Python `cryptography` rejects what DER forbids) and reads
    every extension, which is where the lenient parsers stop looking."""
    from cryptography import x509

    out = {}
    for path in paths:
        results = []
        for blob in certificates(open(path, "rb").read()):
            try:
                cert = x509.load_der_x509_certificate(blob)
                extensions = {}
                for ext in cert.extensions:
                    value = ext.value
                    extensions[ext.oid.dotted_string] = {"critical": ext.critical, "value": repr(value)}
                bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
                results.append(
                    {
                        "ok": True,
                        "subject": cert.subject.rfc4514_string(),
                        "ca": bc.value.ca,
                        "basic_constraints_critical": bc.critical,
                        "extensions": extensions,
                    }
                )
            except Exception as e:  # noqa: BLE001 - the error is the result
                results.append({"ok": False, "error": f"{type(e).__name__}: {e}"})
        out[path] = results
    return out


def watch(socket):
    """Prints `<unix ms> <SPIFFE ID> verified|UNVERIFIED` for every X509 context the stream delivers
    (whether Python `cryptography` finds the SVID signed by a CA of the bundle delivered with it), and
    `<unix ms> ERROR <what>` for every error, until killed (scripts/fleet.sh runs one per agent; the
    scenario tests check every line)."""
    import threading
    import time

    from spiffe import WorkloadApiClient

    def now():
        return int(time.time() * 1000)

    def verified(context):
        svid = context.default_svid
        bundle = context.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        for ca in (bundle.x509_authorities if bundle else []):
            try:
                svid.leaf.verify_directly_issued_by(ca)
                return "verified"
            except Exception:  # another CA of the bundle, or none signed it
                continue
        return "UNVERIFIED"

    def on_success(context):
        print(now(), context.default_svid.spiffe_id, verified(context), flush=True)

    def on_error(error):
        print(now(), "ERROR", type(error).__name__, str(error).replace("\n", " "), flush=True)

    client = WorkloadApiClient(socket_path="unix://" + socket)
    client.stream_x509_contexts(on_success, on_error)
    threading.Event().wait()


def main(argv):
    command, args = argv[1], argv[2:]
    if command == "watch":  # until it is killed
        watch(args[0])
        return
    watchdog(300)
    if command == "authorities":
        result = authorities(*args)
    elif command == "pyspiffe":
        result = pyspiffe(*args)
    elif command == "sequential":
        result = sequential(args[0], int(args[1]))
    elif command == "bundles":
        result = bundles(args[0])
    elif command == "once":
        result = once(*args)
    elif command == "der":
        result = der(args)
    elif command == "crl":
        result = crl(args[0])
    elif command == "jwt_check":
        result = jwt_check(*args)
    else:
        raise SystemExit(f"unknown command {command}; see the usage at the top of this file")
    finish(result)


if __name__ == "__main__":
    main(sys.argv)
