"""A stand-in for a kubelet's `GET /pods`, for tbot's kubernetes attestor tests. No kubelet can run on
these test machines (it needs a cluster and images from the internet), so this serves what one
would: a PodList serialized by the official Kubernetes Python client's own models, over TLS, with a
bearer token check. What is real around it: the container is a real podman container placed in a
kubelet-shaped cgroup (`--cgroup-parent=/kubepods/besteffort/pod<uid>`).

Usage: kubelet_standin.py DIR TOKEN
       kubelet_standin.py DIR --read-only
    Writes DIR/ca.pem (the CA of its certificate for 127.0.0.1, which tbot's `ca_path` trusts)
    and DIR/port once listening. Answers GET /pods with:
      401 unless `Authorization: Bearer TOKEN`;
      (with --read-only, as a kubelet's read-only port: plain HTTP and no authentication, and 400
      to a request that carries a token anyway, which would have crossed the network in the clear;)
      the status code in DIR/status, when that file exists;
      else the pods of DIR/pods.json (read on every request, so a test can list a pod late):
      [{"uid", "name", "namespace", "service_account", "labels": {}, "containers": [{"name", "id",
        "image", "image_id"}], "init_containers": [{... , "restart_policy"}]}]
"""

import datetime
import http.server
import json
import os
import ssl
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from kubernetes import client


def certificate(directory):
    """A cluster CA (DIR/ca.pem, what tbot's `ca_path` names) and the kubelet's serving certificate
    for 127.0.0.1 signed by it, as a kubelet has."""
    import ipaddress

    now = datetime.datetime.now(datetime.timezone.utc)

    def build(subject, issuer, public_key, signing_key, ca):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, issuer)]))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
            ).add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        return builder.sign(signing_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = build("kubernetes-ca", "kubernetes-ca", ca_key.public_key(), ca_key, True)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = build("kubelet", "kubernetes-ca", key.public_key(), ca_key, False)
    pem = serialization.Encoding.PEM
    with open(os.path.join(directory, "ca.pem"), "wb") as f:
        f.write(ca.public_bytes(pem))
    with open(os.path.join(directory, "server.pem"), "wb") as f:
        f.write(leaf.public_bytes(pem) + ca.public_bytes(pem))
    with open(os.path.join(directory, "server.key"), "wb") as f:
        f.write(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return os.path.join(directory, "server.pem"), os.path.join(directory, "server.key")


def status_of(c):
    return client.V1ContainerStatus(
        name=c["name"],
        container_id="containerd://" + c["id"],
        image=c["image"],
        image_id=c["image_id"],
        ready=True,
        restart_count=0,
    )


def pod_list(directory):
    try:
        with open(os.path.join(directory, "pods.json")) as f:
            specs = json.load(f)
    except FileNotFoundError:
        specs = []
    pods = []
    for p in specs:
        inits = p.get("init_containers", [])
        pods.append(
            client.V1Pod(
                metadata=client.V1ObjectMeta(uid=p["uid"], name=p["name"], namespace=p["namespace"], labels=p.get("labels")),
                spec=client.V1PodSpec(
                    service_account_name=p["service_account"],
                    containers=[client.V1Container(name=c["name"], image=c["image"]) for c in p["containers"]],
                    init_containers=[
                        client.V1Container(name=c["name"], image=c["image"], restart_policy=c.get("restart_policy"))
                        for c in inits
                    ]
                    or None,
                ),
                status=client.V1PodStatus(
                    phase="Running",
                    container_statuses=[status_of(c) for c in p["containers"]],
                    init_container_statuses=[status_of(c) for c in inits] or None,
                ),
            )
        )
    body = client.ApiClient().sanitize_for_serialization(client.V1PodList(items=pods))
    body["kind"] = "PodList"
    body["apiVersion"] = "v1"
    return body


def main(directory, token):
    read_only = token == "--read-only"
    cert, key = certificate(directory)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/pods":
                return self.answer(404, {"message": "not found"})
            if read_only:
                if self.headers.get("Authorization") is not None:
                    return self.answer(400, {"message": "a token was sent over plain HTTP"})
            elif self.headers.get("Authorization") != "Bearer " + token:
                return self.answer(401, {"message": "Unauthorized"})
            forced = os.path.join(directory, "status")
            if os.path.exists(forced):
                with open(forced) as f:
                    return self.answer(int(f.read().strip()), {"message": "forced"})
            return self.answer(200, pod_list(directory))

        def answer(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if not read_only:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    with open(os.path.join(directory, "port.tmp"), "w") as f:
        f.write(str(server.server_address[1]))
    os.rename(os.path.join(directory, "port.tmp"), os.path.join(directory, "port"))
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
