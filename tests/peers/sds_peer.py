"""An independent Envoy SDS v3 client: the xDS protos of the grpc project (PyPI xds-protos) over grpcio.

Usage:
  sds_peer.py fields                       the field numbers of the Envoy messages tbot declares
  sds_peer.py protocol SOCKET SPIFFE_ID    the StreamSecrets state machine, step by step
  sds_peer.py fetch SOCKET NAME...         FetchSecrets, summarised
  sds_peer.py old-envoy SOCKET             a node of Envoy 1.17 (no SPIFFE validator)
  sds_peer.py rotation SOCKET SECONDS      waits on an open stream for a pushed new certificate

Prints one JSON object. Nothing here is tbot code: it is what Envoy's own message definitions say.
"""

import queue
import sys
import threading

import grpc
from cryptography import x509
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_spiffe_validator_config_pb2 as spiffe_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from envoy.type.v3 import semantic_version_pb2
from google.rpc import status_pb2

from peer_exit import finish, watchdog

SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
QUIET = 1.0
STREAM_DEADLINE = 60


def node(major=1, minor=40):
    return base_pb2.Node(
        id="sds-peer",
        cluster="tests",
        user_agent_name="envoy",
        user_agent_build_version=base_pb2.BuildVersion(
            version=semantic_version_pb2.SemanticVersion(major_number=major, minor_number=minor, patch=0)
        ),
    )


def stub(socket):
    return sds_pb2_grpc.SecretDiscoveryServiceStub(grpc.insecure_channel("unix://" + socket))


def pem_blocks(data, label):
    return data.count(b"-----BEGIN " + label.encode() + b"-----")


def summarise(response):
    """Each secret: its kind and what it holds, checked with `cryptography`."""
    out = {}
    for any_ in response.resources:
        assert any_.type_url == SECRET, any_.type_url
        secret = secret_pb2.Secret()
        any_.Unpack(secret)
        kind = secret.WhichOneof("type")
        if kind == "tls_certificate":
            chain = secret.tls_certificate.certificate_chain.inline_bytes
            certs = x509.load_pem_x509_certificates(chain)
            leaf = certs[0]
            uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            out[secret.name] = {
                "kind": kind,
                "certificates": len(certs),
                "pem_blocks": pem_blocks(chain, "CERTIFICATE"),
                "spiffe_id": uris.get_values_for_type(x509.UniformResourceIdentifier)[0],
                "serial": format(leaf.serial_number, "x"),
                "key_is_pkcs8": secret.tls_certificate.private_key.inline_bytes.startswith(b"-----BEGIN PRIVATE KEY-----"),
            }
        elif kind == "validation_context":
            context = secret.validation_context
            if context.HasField("custom_validator_config"):
                config = spiffe_pb2.SPIFFECertValidatorConfig()
                assert context.custom_validator_config.typed_config.Unpack(config)
                out[secret.name] = {
                    "kind": kind,
                    "validator": context.custom_validator_config.name,
                    "trust_domains": [
                        {
                            "name": td.name,
                            "cas": len(x509.load_pem_x509_certificates(td.trust_bundle.inline_bytes)),
                        }
                        for td in config.trust_domains
                    ],
                }
            else:
                cas = x509.load_pem_x509_certificates(context.trusted_ca.inline_bytes)
                out[secret.name] = {"kind": kind, "trusted_ca": len(cas)}
        else:
            out[secret.name] = {"kind": kind}
    return out


class Stream:
    """A StreamSecrets call fed from a queue, its responses read by a thread."""

    def __init__(self, socket):
        self.requests = queue.Queue()
        self.responses = queue.Queue()
        # A deadline, so that no step can wait forever: longer than any step's own wait (10 s reads;
        # tests/sds.rs's rotation waits 20 s).
        self.call = stub(socket).StreamSecrets(iter(self.requests.get, None), timeout=STREAM_DEADLINE)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for response in self.call:
                self.responses.put(response)
        except grpc.RpcError as e:
            self.responses.put(e)

    def send(self, **fields):
        fields.setdefault("type_url", SECRET)
        self.requests.put(discovery_pb2.DiscoveryRequest(**fields))

    def next(self, timeout):
        try:
            return self.responses.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self):
        self.requests.put(None)
        self.call.cancel()


def outcome(item):
    if item is None:
        return {"response": None}
    if isinstance(item, grpc.RpcError):
        return {"error": item.code().name, "message": item.details()}
    return {"version": item.version_info, "nonce": item.nonce, "secrets": summarise(item)}


def protocol(socket, spiffe_id):
    steps = {}
    s = Stream(socket)
    s.send(node=node(), resource_names=["default", "ROOTCA"])
    first = s.next(10)
    steps["first"] = outcome(first)
    # ACK: same names, the version and nonce just received. Nothing more is owed.
    s.send(version_info=first.version_info, response_nonce=first.nonce, resource_names=["ROOTCA", "default"])
    steps["after_ack"] = outcome(s.next(QUIET))
    # A stale nonce is ignored, even with other names.
    s.send(version_info=first.version_info, response_nonce="stale", resource_names=["ALL"])
    steps["after_stale_nonce"] = outcome(s.next(QUIET))
    # NACK: the previous version, the nonce, and why. Not answered with the same secrets again.
    s.send(
        version_info="",
        response_nonce=first.nonce,
        resource_names=["default", "ROOTCA"],
        error_detail=status_pb2.Status(code=3, message="sds_peer rejects this on purpose"),
    )
    steps["after_nack"] = outcome(s.next(QUIET))
    # A change of names is answered at once.
    s.send(version_info=first.version_info, response_nonce=first.nonce, resource_names=["ALL", spiffe_id])
    second = s.next(10)
    steps["names_changed"] = outcome(second)
    # An unknown name ends the stream with an error (not a hang).
    s.send(version_info=second.version_info, response_nonce=second.nonce, resource_names=["spiffe://elsewhere.test/x"])
    steps["unknown_name"] = outcome(s.next(10))
    s.close()
    # The empty list: everything.
    s = Stream(socket)
    s.send(node=node(), resource_names=[])
    steps["everything"] = outcome(s.next(10))
    s.close()
    # DeltaSecrets is not served.
    try:
        call = stub(socket).DeltaSecrets(iter([discovery_pb2.DeltaDiscoveryRequest(type_url=SECRET)]), timeout=10)
        next(call)
        steps["delta"] = {"error": None}
    except grpc.RpcError as e:
        steps["delta"] = {"error": e.code().name}
    return steps


def fetch(socket, names):
    try:
        response = stub(socket).FetchSecrets(
            discovery_pb2.DiscoveryRequest(node=node(), resource_names=names, type_url=SECRET), timeout=10
        )
        return {"version": response.version_info, "secrets": summarise(response)}
    except grpc.RpcError as e:
        return {"error": e.code().name, "message": e.details()}


def old_envoy(socket):
    out = {}
    for names in (["ROOTCA"], ["ALL"]):
        s = Stream(socket)
        s.send(node=node(1, 17), resource_names=names)
        out[names[0]] = outcome(s.next(10))
        s.close()
    return out


def rotation(socket, seconds):
    s = Stream(socket)
    s.send(node=node(), resource_names=["default"])
    first = s.next(10)
    s.send(version_info=first.version_info, response_nonce=first.nonce, resource_names=["default"])
    pushed = s.next(seconds)
    s.close()
    return {"first": outcome(first), "pushed": outcome(pushed)}


def fields():
    from envoy.config.core.v3 import extension_pb2
    from envoy.extensions.transport_sockets.tls.v3 import common_pb2

    messages = [
        discovery_pb2.DiscoveryRequest,
        discovery_pb2.DiscoveryResponse,
        status_pb2.Status,
        base_pb2.Node,
        base_pb2.BuildVersion,
        semantic_version_pb2.SemanticVersion,
        secret_pb2.Secret,
        common_pb2.TlsCertificate,
        base_pb2.DataSource,
        common_pb2.CertificateValidationContext,
        extension_pb2.TypedExtensionConfig,
        spiffe_pb2.SPIFFECertValidatorConfig,
        spiffe_pb2.SPIFFECertValidatorConfig.TrustDomain,
    ]
    return {m.DESCRIPTOR.full_name: {f.name: f.number for f in m.DESCRIPTOR.fields} for m in messages}


def main():
    # The longest wait here is a rotation's (its SECONDS, 20 in tests/sds.rs) plus a few 10 s reads.
    watchdog(120)
    command, args = sys.argv[1], sys.argv[2:]
    if command == "fields":
        result = fields()
    elif command == "protocol":
        result = protocol(args[0], args[1])
    elif command == "fetch":
        result = fetch(args[0], args[1:])
    elif command == "old-envoy":
        result = old_envoy(args[0])
    elif command == "rotation":
        result = rotation(args[0], float(args[1]))
    else:
        raise SystemExit(f"unknown command {command}")
    finish(result)


if __name__ == "__main__":
    main()
