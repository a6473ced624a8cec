// An independent SPIFFE Workload API client in JavaScript: @grpc/grpc-js (a gRPC implementation of
// its own, not grpc C-core) with the proto loaded by @grpc/proto-loader from proto/workload.proto.
// Prints one JSON object; tests/peers_node.rs asserts on it.
//
// Usage (scripts/test.sh installs the packages of tests/peers/node/package.json into
// target/test-node; run with NODE_PATH=target/test-node/node_modules):
//   node spiffe_peer.js PROTO_DIR SOCKET AUDIENCE

"use strict";

const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");

const [protoDir, socket, audience] = process.argv.slice(2);
const definition = loader.loadSync("workload.proto", {
  includeDirs: [protoDir],
  keepCase: true,
  longs: String,
  bytes: Buffer,
  defaults: true,
});
const Api = grpc.loadPackageDefinition(definition).SpiffeWorkloadAPI;

// grpc-js's own default on a unix socket, and forms that are not a URI authority.
const AUTHORITIES = {
  default: null,
  "raw-path": socket,
  "percent-encoded-path": socket.replace(/^\//, "").replace(/\//g, "%2F"),
  "weird host:name": "weird host:name",
};

function header() {
  const metadata = new grpc.Metadata();
  metadata.set("workload.spiffe.io", "true");
  return metadata;
}

function firstMessage(client, method, request, metadata) {
  return new Promise((resolve) => {
    const call = client[method](request, metadata);
    let done = false;
    const finish = (value) => {
      if (!done) {
        done = true;
        call.cancel();
        resolve(value);
      }
    };
    call.on("data", (message) => finish({ ok: true, message }));
    call.on("error", (e) => finish({ ok: false, code: grpc.status[e.code], details: e.details }));
    call.on("end", () => finish({ ok: false, code: "ENDED" }));
  });
}

function unary(client, method, request) {
  return new Promise((resolve) => {
    client[method](request, header(), (e, message) =>
      resolve(e ? { ok: false, code: grpc.status[e.code], details: e.details } : { ok: true, message }),
    );
  });
}

async function main() {
  const out = {};
  for (const [form, authority] of Object.entries(AUTHORITIES)) {
    const options = authority === null ? {} : { "grpc.default_authority": authority };
    const client = new Api("unix://" + socket, grpc.credentials.createInsecure(), options);
    const svid = await firstMessage(client, "FetchX509SVID", {}, header());
    const jwt = await unary(client, "FetchJWTSVID", { audience: [audience], spiffe_id: "" });
    const noHeader = await firstMessage(client, "FetchX509SVID", {}, new grpc.Metadata());
    const result = {
      FetchX509SVID: svid.ok
        ? { ok: true, spiffe_id: svid.message.svids[0].spiffe_id, der_bytes: svid.message.svids[0].x509_svid.length }
        : svid,
      FetchJWTSVID: jwt.ok ? { ok: true, spiffe_id: jwt.message.svids[0].spiffe_id } : jwt,
      "no header": noHeader,
    };
    if (jwt.ok) {
      const validated = await unary(client, "ValidateJWTSVID", { audience, svid: jwt.message.svids[0].svid });
      result.ValidateJWTSVID = validated.ok ? { ok: true, spiffe_id: validated.message.spiffe_id } : validated;
    }
    out[form] = result;
    client.close();
  }
  console.log(JSON.stringify(out, null, 1));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
