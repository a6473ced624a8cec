"""An independent view of tbot's trust lifecycle: py-spiffe (and PyJWT inside it) plus Python
`cryptography`. Prints one JSON object; the Rust tests assert on it.

Usage (the test venv from scripts/test.sh has the packages):
    trust_peer.py rotation SOCKET SECONDS AUDIENCE
        Streams X509 contexts for SECONDS and checks every SVID received against the bundle
        received with it; validates a JWT-SVID fetched at the start (offline against the JWT bundle
        and through ValidateJWTSVID) until it expires, and a fresh one every second.
    trust_peer.py federation SOCKET_A SOCKET_B AUDIENCE
        Checks, with A's bundles only, an X509-SVID and a JWT-SVID that B's socket hands out.
    trust_peer.py bundle FILE
        Checks a SPIFFE bundle document (SPIFFE Trust Domain and Bundle §4).
"""

import base64
import json
import sys
import threading
import time

from cryptography import x509

from peer_exit import finish, watchdog


def verifies(leaf, cas):
    """Whether one of `cas` issued `leaf` (name and signature) and `leaf` is valid now."""
    now = time.time()
    if not (leaf.not_valid_before_utc.timestamp() <= now + 1 and now - 1 <= leaf.not_valid_after_utc.timestamp()):
        return False
    for ca in cas:
        try:
            leaf.verify_directly_issued_by(ca)
            return True
        except Exception:
            continue
    return False


def rotation(socket, seconds, audience):
    from spiffe import JwtSvid, WorkloadApiClient

    out = {"updates": 0, "failures": [], "ca_subjects": [], "kids": [], "jwt_checks": 0, "jwt_failures": []}
    lock = threading.Lock()
    subjects = set()

    def on_success(context):
        with lock:
            out["updates"] += 1
            for svid in context.x509_svids:
                bundle = context.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
                cas = list(bundle.x509_authorities) if bundle else []
                for ca in cas:
                    subjects.add(ca.subject.rfc4514_string())
                if not verifies(svid.leaf, cas):
                    out["failures"].append(
                        f"update {out['updates']}: {svid.spiffe_id} issued by {svid.leaf.issuer.rfc4514_string()} "
                        f"does not verify against {[c.subject.rfc4514_string() for c in cas]}"
                    )

    closing = threading.Event()

    def on_error(error):
        if closing.is_set():
            return  # closing the client cancels the stream
        with lock:
            out["failures"].append(f"stream error: {type(error).__name__}: {error}")

    client = WorkloadApiClient(socket_path="unix://" + socket)
    client.stream_x509_contexts(on_success, on_error)
    early = client.fetch_jwt_svid(audience={audience})
    kids = set()
    deadline = time.time() + seconds
    while time.time() < deadline:
        bundles = client.fetch_jwt_bundles()
        bundle = bundles.get_bundle_for_trust_domain(early.spiffe_id.trust_domain)
        kids.update(bundle.jwt_authorities.keys())
        fresh = client.fetch_jwt_svid(audience={audience})
        tokens = [("fresh", fresh)]
        if time.time() < early.expiry - 1:
            tokens.append(("early", early))
        for name, svid in tokens:
            try:
                JwtSvid.parse_and_validate(svid.token, bundle, {audience})
                client.validate_jwt_svid(svid.token, audience)
                out["jwt_checks"] += 1
            except Exception as e:
                out["jwt_failures"].append(f"{name} token (exp {svid.expiry}) at {time.time():.0f}: {e}")
        time.sleep(1)
    closing.set()
    client.close()
    with lock:
        out["ca_subjects"] = sorted(subjects)
        out["kids"] = sorted(kids)
        out["early_expiry"] = early.expiry
        return dict(out)


def federation(socket_a, socket_b, audience):
    from spiffe import JwtSvid, WorkloadApiClient

    out = {}
    with WorkloadApiClient(socket_path="unix://" + socket_b) as b:
        svid = b.fetch_x509_svid()
        token = b.fetch_jwt_svid(audience={audience})
    with WorkloadApiClient(socket_path="unix://" + socket_a) as a:
        context = a.fetch_x509_context()
        td = svid.spiffe_id.trust_domain
        out["a_trust_domains"] = sorted(str(t) for t in context.x509_bundle_set._bundles.keys())
        bundle = context.x509_bundle_set.get_bundle_for_trust_domain(td)
        out["b_x509_verifies_with_a_bundles"] = bool(bundle) and verifies(svid.leaf, list(bundle.x509_authorities))
        jwt_bundles = a.fetch_jwt_bundles()
        out["a_jwt_trust_domains"] = sorted(str(t) for t in jwt_bundles._bundles.keys())
        try:
            JwtSvid.parse_and_validate(token.token, jwt_bundles.get_bundle_for_trust_domain(td), {audience})
            out["b_jwt_offline"] = "ok"
        except Exception as e:
            out["b_jwt_offline"] = f"{type(e).__name__}: {e}"
        try:
            out["b_jwt_validated_by_a"] = str(a.validate_jwt_svid(token.token, audience).spiffe_id)
        except Exception as e:
            out["b_jwt_validated_by_a"] = f"{type(e).__name__}: {e}"
        out["b_spiffe_id"] = str(svid.spiffe_id)
    return out


def bundle(path):
    doc = json.load(open(path))
    problems = []
    if not isinstance(doc.get("keys"), list):
        problems.append("no keys array")
    uses = []
    for i, key in enumerate(doc.get("keys", [])):
        use = key.get("use")
        uses.append(use)
        if not key.get("kty"):
            problems.append(f"keys[{i}] has no kty")
        if use == "x509-svid":
            x5c = key.get("x5c", [])
            if len(x5c) != 1:
                problems.append(f"keys[{i}] x5c has {len(x5c)} certificates")
                continue
            cert = x509.load_der_x509_certificate(base64.b64decode(x5c[0]))
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            if not bc.ca:
                problems.append(f"keys[{i}] is not a CA")
            if key["kty"] == "EC":
                numbers = cert.public_key().public_numbers()
                x = base64.urlsafe_b64decode(key["x"] + "==")
                if int.from_bytes(x, "big") != numbers.x:
                    problems.append(f"keys[{i}] x does not match the certificate's key")
        elif use == "jwt-svid":
            if not key.get("kid"):
                problems.append(f"keys[{i}] has no kid")
        else:
            problems.append(f"keys[{i}] has use {use!r}")
    for field in ("spiffe_sequence", "spiffe_refresh_hint"):
        if not isinstance(doc.get(field), int):
            problems.append(f"{field} is not an integer")
    return {"problems": problems, "uses": uses, "refresh_hint": doc.get("spiffe_refresh_hint")}


def main(argv):
    command, args = argv[1], argv[2:]
    watchdog(300)
    if command == "rotation":
        result = rotation(args[0], float(args[1]), args[2])
    elif command == "federation":
        result = federation(*args)
    elif command == "bundle":
        result = bundle(args[0])
    else:
        raise SystemExit(f"unknown command {command}; see the usage at the top of this file")
    finish(result)


if __name__ == "__main__":
    main(sys.argv)
