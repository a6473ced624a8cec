#!/usr/bin/env bash
# The guide's topology on one machine: one issuer host and N agents, each agent in its own network
# namespace (veth on a bridge, its own address), each with one workload watching its SVID through
# py-spiffe. Reports joins/s, X509-SVIDs/s through the issuer, edit → new SVID on every agent (p50,
# p99, max), and how the agents come back after the issuer is killed and restarted (spread, peak
# over mean per second, workload-visible errors).
#
#   sudo scripts/fleet.sh [N]          # N agents (default 50); writes docs/fleet.json and docs/fleet.md
#
# Needs root (ip netns), `ip`, and the test venv (scripts/test.sh makes it). Not part of CI: with
# N=50 it runs about two minutes here, N=100 about three (release build not counted).
set -euo pipefail
N=${1:-50}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
[ "$(id -u)" = 0 ] || { echo "run as root: network namespaces need it" >&2; exit 2; }
PY=${TBOT_TEST_VENV:-$ROOT/target/test-venv}/bin/python
"$PY" -c 'import spiffe' 2>/dev/null || { echo "no py-spiffe in the test venv: run scripts/test.sh once" >&2; exit 2; }
cargo build --release --bins -q
BIN=$ROOT/target/release
WORK=$(mktemp -d /tmp/tbot-fleet.XXXXXX)
BRIDGE=tbfleet0
ISSUER_IP=10.77.0.1
PORT=3025
now_ms() { date +%s%3N; }

cleanup() {
    set +e
    pkill -f "$WORK" 2>/dev/null
    sleep 0.5
    pkill -9 -f "$WORK" 2>/dev/null
    for i in $(seq 1 "$N"); do ip netns del "$(printf h%03d "$i")" 2>/dev/null; done
    ip link del "$BRIDGE" 2>/dev/null
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

# The network: a bridge in the root namespace holds the issuer's address; each agent namespace gets
# a veth into it.
ip link add "$BRIDGE" type bridge
ip addr add "$ISSUER_IP/16" dev "$BRIDGE"
ip link set "$BRIDGE" up
for i in $(seq 1 "$N"); do
    ns=$(printf h%03d "$i")
    ip netns add "$ns"
    ip link add "v$ns" type veth peer name eth0 netns "$ns"
    ip link set "v$ns" master "$BRIDGE" up
    ip -n "$ns" addr add "10.77.$((1 + i / 250)).$((i % 250 + 1))/16" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
done

# The issuer host.
mkdir -p "$WORK/issuer"
cp manifests/fleet/issuer/{bot.yaml,role.yaml} "$WORK/issuer/"
cat > "$WORK/issuer/cluster.yaml" <<YAML
kind: cluster
version: v1
metadata: {name: example.teleport.sh}
YAML
cat > "$WORK/issuer/issuer.yaml" <<YAML
kind: issuer
version: v1
metadata: {name: issuer-1}
spec:
  listen: $ISSUER_IP:$PORT
  public_addrs: ["$ISSUER_IP"]
  storage: {type: directory, path: $WORK/issuer-state}
  admin_socket: $WORK/issuer.sock
YAML
cat > "$WORK/issuer/workload-identity.yaml" <<'YAML'
kind: workload_identity
version: v1
metadata:
  name: example-workload-identity
  labels: {example: getting-started}
spec:
  spiffe: {id: "/uid/{{workload.unix.uid}}"}
YAML
for i in $(seq 1 "$N"); do
    printf -- '---\nkind: token\nversion: v2\nmetadata: {name: fleet-agent-%d}\nspec: {roles: [Bot], join_method: token, bot_name: example-bot}\n' "$i"
done > "$WORK/issuer/tokens.yaml"
start_issuer() {
    # In a subshell: not a job of this shell, which would report its SIGKILL below.
    ( "$BIN/tbot" start --config-dir "$WORK/issuer" --diag-addr 127.0.0.1:3099 >> "$WORK/issuer.log" 2>&1 &
      echo $! > "$WORK/issuer.pid" )
    until "$BIN/tbotctl" status --dir "$WORK/issuer" > /dev/null 2>&1; do sleep 0.05; done
}
start_issuer
PIN=$("$BIN/tbotctl" status --dir "$WORK/issuer" | sed -n 's/^CA pin: //p')
echo "issuer at $ISSUER_IP:$PORT, CA pin $PIN"

# The agents: only a tbot.yaml each, started at once (the join storm).
for i in $(seq 1 "$N"); do
    ns=$(printf h%03d "$i")
    mkdir -p "$WORK/$ns/etc"
    cat > "$WORK/$ns/etc/tbot.yaml" <<YAML
version: v2
proxy_server: $ISSUER_IP:$PORT
onboarding:
  join_method: token
  token: fleet-agent-$i
  ca_pins: ["$PIN"]
storage: {type: directory, path: $WORK/$ns/state}
admin_socket: $WORK/$ns/admin.sock
services:
  - type: workload-identity-api
    listen: unix://$WORK/$ns/workload.sock
    selector: {name: example-workload-identity}
YAML
done
T0=$(now_ms)
for i in $(seq 1 "$N"); do
    ns=$(printf h%03d "$i")
    ip netns exec "$ns" "$BIN/tbot" start --config-dir "$WORK/$ns/etc" > "$WORK/$ns/agent.log" 2>&1 &
done
for i in $(seq 1 "$N"); do
    ns=$(printf h%03d "$i")
    until [ -S "$WORK/$ns/workload.sock" ]; do sleep 0.02; done
done
T1=$(now_ms)
echo "$N agents joined in $((T1 - T0)) ms"

# One workload per agent, watching its SVID.
for i in $(seq 1 "$N"); do
    ns=$(printf h%03d "$i")
    "$PY" tests/peers/spiffe_peer.py watch "$WORK/$ns/workload.sock" > "$WORK/$ns/watch.log" 2>&1 &
done
for i in $(seq 1 "$N"); do
    ns=$(printf h%03d "$i")
    until grep -q spiffe:// "$WORK/$ns/watch.log" 2>/dev/null; do sleep 0.05; done
done
T2=$(now_ms)
ISSUED=$(curl -s 127.0.0.1:3099/metrics | awk '/^tbot_issuer_api_x509_svids_issued_total/ {print $2}')
echo "$N workloads (Python start-up included) had their first SVID after $((T2 - T1)) ms; the issuer signed $ISSUED"

# An edit on the issuer: every agent's workload sees its new SVID.
sleep 1
TE=$(now_ms)
sed -i 's|/uid/|/edited/|' "$WORK/issuer/workload-identity.yaml"
for i in $(seq 1 "$N"); do
    ns=$(printf h%03d "$i")
    until grep -q /edited/ "$WORK/$ns/watch.log"; do sleep 0.02; done
done
echo "edit seen by every workload after $(( $(now_ms) - TE )) ms"

# The issuer killed and restarted: agents keep serving, then come back by themselves.
sleep 2
kill -9 "$(cat "$WORK/issuer.pid")"
TK=$(now_ms)
sleep 5
TR=$(now_ms)
start_issuer
for i in $(seq 1 "$N"); do
    ns=$(printf h%03d "$i")
    until [ "$(grep -c 'connected to the issuer' "$WORK/$ns/agent.log")" -ge 2 ]; do sleep 0.05; done
done
sleep 1

"$PY" - "$WORK" "$N" "$T0" "$T1" "$T2" "$ISSUED" "$TE" "$TK" "$TR" <<'PY'
import datetime, json, os, statistics, sys
work, n, t0, t1, t2, issued, te, tk, tr = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:5]), int(sys.argv[5]), int(float(sys.argv[6] or 0)), *map(int, sys.argv[7:10])

def pct(values, p):
    values = sorted(values)
    return values[round((len(values) - 1) * p)]

edit, reconnect, errors = [], [], 0
for i in range(1, n + 1):
    ns = f"h{i:03d}"
    for line in open(os.path.join(work, ns, "watch.log")):
        parts = line.split()
        if len(parts) >= 2 and parts[1] == "ERROR" and int(parts[0]) >= tk:
            errors += 1
    seen = [int(l.split()[0]) for l in open(os.path.join(work, ns, "watch.log")) if "/edited/" in l]
    edit.append(seen[0] - te)
    # The agent's log: the first "connected to the issuer" after the restart (RFC 3339 UTC stamps).
    for line in open(os.path.join(work, ns, "agent.log")):
        if "connected to the issuer" not in line:
            continue
        stamp = line.split()[0].rstrip("Z")
        ms = int(datetime.datetime.fromisoformat(stamp).replace(tzinfo=datetime.timezone.utc).timestamp() * 1000)
        if ms >= tr:
            reconnect.append(ms - tr)
            break
per_second, per_tenth = {}, {}
for r in reconnect:
    per_second[r // 1000] = per_second.get(r // 1000, 0) + 1
    per_tenth[r // 100] = per_tenth.get(r // 100, 0) + 1
span = max(reconnect) // 1000 + 1
report = {
    "agents": n,
    "joins_per_second": round(n / ((t1 - t0) / 1000), 1),
    "join_storm_ms": t1 - t0,
    "x509_svids_signed_for_first_fetches": issued,
    "first_svid_at_every_workload_ms": t2 - t1,
    "edit_to_new_svid_ms": {"p50": pct(edit, 0.5), "p99": pct(edit, 0.99), "max": max(edit)},
    "issuer_down_ms": tr - tk,
    "reconnect_after_restart_ms": {"p50": pct(reconnect, 0.5), "p99": pct(reconnect, 0.99), "max": max(reconnect)},
    "reconnects_busiest_second": max(per_second.values()),
    "reconnects_busiest_100ms": max(per_tenth.values()),
    "reconnects_peak_per_second_over_mean": round(max(per_second.values()) / (len(reconnect) / span), 2),
    "workload_visible_errors_during_outage": errors,
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
}
print(json.dumps(report, indent=1))
json.dump(report, open("docs/fleet.json", "w"), indent=1)
with open("docs/fleet.md", "w") as f:
    f.write(f"""# Fleet run

Written by `sudo scripts/fleet.sh {n}` on {report['date']}: one issuer host (`tbot start` on an issuer
directory) and {n} agents, each `tbot start` on only a `tbot.yaml` in its own network namespace
(veth on a bridge, its own address), each with one py-spiffe workload watching its SVID.

| what | figure |
|---|---|
| join storm: {n} agents started at once until every workload socket answers | {report['join_storm_ms']} ms ({report['joins_per_second']} joins/s) |
| {n} py-spiffe workloads started at once until each has its first SVID (Python start-up included; the issuer signed {issued}) | {t2 - t1} ms |
| edit on the issuer → new SVID at every workload | p50 {report['edit_to_new_svid_ms']['p50']} ms, p99 {report['edit_to_new_svid_ms']['p99']} ms, max {report['edit_to_new_svid_ms']['max']} ms |
| issuer killed (SIGKILL), down for | {report['issuer_down_ms']} ms |
| agents reconnected after the restart | p50 {report['reconnect_after_restart_ms']['p50']} ms, p99 {report['reconnect_after_restart_ms']['p99']} ms, max {report['reconnect_after_restart_ms']['max']} ms |
| reconnects in the busiest second / the busiest 100 ms | {report['reconnects_busiest_second']} / {report['reconnects_busiest_100ms']} of {n} (busiest second over the mean until the last: {report['reconnects_peak_per_second_over_mean']}x) |
| errors seen by workloads while the issuer was down | {errors} |

Agents keep serving the SVIDs they hold while the issuer is down. They try it again on a steady
5 s period, each agent with its own random phase (the first try waits a random 0–5 s, each next one
5 s ±10%), so a restarted issuer meets the fleet spread evenly over 5 s (about a fifth of the
agents in any second, with the noise of a random draw) and every agent is back within about one
period, however long the outage was. After a minute down the period doubles, up to 60 s. A stream
that drops within 5 s of coming up does not count as a recovery: an issuer that answers and drops
again and again slows its agents down as an outage does.

The issuer holds one open file per agent. `tbot start` raises its soft open-file limit to the hard
one when it starts, up to the installed unit's `LimitNOFILE=524288`; by hand, `ulimit -Hn` is the
ceiling.

Everything here shares the machine's cores: the issuer, every agent and every Python workload (and
the script's own polling, every 20 ms). The edit figure is the time until the last of them has
reacted, under that contention; `cargo bench --bench report -- --only fleet` times one remote agent
alone (docs/benchmarks.md).
""")
PY
echo "wrote docs/fleet.json and docs/fleet.md (work directory $WORK; KEEP=1 keeps it)"
