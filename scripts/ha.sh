#!/usr/bin/env bash
# A highly available issuer on one machine: a 3-member etcd cluster, 3 issuer replicas (one CA,
# keys sealed with one key file) behind haproxy, and N agents (default 20), each with a py-spiffe
# workload watching its SVID. Then, one after the other: SIGKILL a replica; kill one etcd member,
# then a second (quorum lost; a newcomer tries to join) and restore them; restart every replica; an
# edit deployed to every replica. Reports failover time per agent (p50/p99/max), errors seen by
# workloads (goal 0), whether the CA and the used tokens survived, and writes docs/ha.json and
# docs/ha.md.
#
#   scripts/ha.sh [N]        # no root needed: everything is on loopback
#
# Needs etcd, etcdctl and haproxy (scripts/test.sh installs them) and the test venv. Not part of
# CI: about two minutes with N=20 (release build not counted).
set -euo pipefail
N=${1:-20}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${TBOT_TEST_VENV:-$ROOT/target/test-venv}/bin/python
"$PY" -c 'import spiffe' 2>/dev/null || { echo "no py-spiffe in the test venv: run scripts/test.sh once" >&2; exit 2; }
for tool in etcd etcdctl haproxy; do
    command -v $tool >/dev/null || { echo "$tool is missing: run scripts/test.sh once (as root it installs it)" >&2; exit 2; }
done
cargo build --release --bins -q
BIN=$ROOT/target/release
WORK=$(mktemp -d /tmp/tbot-ha.XXXXXX)
now_ms() { date +%s%3N; }
log() { echo "[$(date +%T)] $*"; }

cleanup() {
    set +e
    pkill -f "$WORK" 2>/dev/null
    sleep 0.5
    pkill -9 -f "$WORK" 2>/dev/null
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

# Free ports: 3 etcd clients, 3 etcd peers, 3 replicas, the load balancer.
read -r -a P <<< "$("$PY" -c '
import socket
socks = [socket.socket() for _ in range(10)]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')"
ETCD_CLIENT=("${P[0]}" "${P[1]}" "${P[2]}")
ETCD_PEER=("${P[3]}" "${P[4]}" "${P[5]}")
REPLICA=("${P[6]}" "${P[7]}" "${P[8]}")
LB=${P[9]}
ENDPOINTS="http://127.0.0.1:${ETCD_CLIENT[0]},http://127.0.0.1:${ETCD_CLIENT[1]},http://127.0.0.1:${ETCD_CLIENT[2]}"
INITIAL="m0=http://127.0.0.1:${ETCD_PEER[0]},m1=http://127.0.0.1:${ETCD_PEER[1]},m2=http://127.0.0.1:${ETCD_PEER[2]}"

start_etcd() {
    local i=$1
    ( etcd --name "m$i" --data-dir "$WORK/etcd-m$i" \
        --listen-client-urls "http://127.0.0.1:${ETCD_CLIENT[$i]}" --advertise-client-urls "http://127.0.0.1:${ETCD_CLIENT[$i]}" \
        --listen-peer-urls "http://127.0.0.1:${ETCD_PEER[$i]}" --initial-advertise-peer-urls "http://127.0.0.1:${ETCD_PEER[$i]}" \
        --initial-cluster "$INITIAL" --initial-cluster-state new --initial-cluster-token tbot-ha \
        --auto-compaction-mode=revision --auto-compaction-retention=1000 --unsafe-no-fsync \
        >> "$WORK/etcd-m$i.log" 2>&1 &
      echo $! > "$WORK/etcd-m$i.pid" )
}
etcd_healthy() { ETCDCTL_API=3 etcdctl --endpoints "$ENDPOINTS" --command-timeout=2s put /ha-check ok > /dev/null 2>&1; }
for i in 0 1 2; do start_etcd $i; done
until etcd_healthy; do sleep 0.2; done
log "etcd: 3 members at $ENDPOINTS"

# The key encryption key, shared by the replicas.
head -c 32 /dev/urandom > "$WORK/issuer.kek"
chmod 600 "$WORK/issuer.kek"

# The replicas: the same cluster-side documents, each its own issuer document.
mkdir -p "$WORK/docs"
cp manifests/fleet/issuer/{bot.yaml,role.yaml,cluster.yaml} "$WORK/docs/"
# The fleet's workload identity, by uid (the workloads here are not systemd services).
sed 's|/svc/{{workload.systemd.service}}|/uid/{{workload.unix.uid}}|' \
    manifests/fleet/issuer/workload-identity.yaml > "$WORK/docs/workload-identity.yaml"
grep -q '/uid/' "$WORK/docs/workload-identity.yaml"
for i in $(seq 1 $((N + 1))); do
    printf -- '---\nkind: token\nversion: v2\nmetadata: {name: ha-agent-%d}\nspec: {roles: [Bot], join_method: token, bot_name: example-bot}\n' "$i"
done > "$WORK/docs/tokens.yaml"
for r in 0 1 2; do
    mkdir -p "$WORK/replica-$r"
    cp "$WORK"/docs/*.yaml "$WORK/replica-$r/"
    cat > "$WORK/replica-$r/issuer.yaml" <<YAML
kind: issuer
version: v1
metadata: {name: replica-$((r + 1))}
spec:
  listen: 127.0.0.1:${REPLICA[$r]}
  public_addrs: ["127.0.0.1:$LB", "127.0.0.1:${REPLICA[$r]}"]
  storage:
    type: etcd
    endpoints: ["http://127.0.0.1:${ETCD_CLIENT[0]}", "http://127.0.0.1:${ETCD_CLIENT[1]}", "http://127.0.0.1:${ETCD_CLIENT[2]}"]
    prefix: /tbot
    key_encryption_key_file: $WORK/issuer.kek
  admin_socket: $WORK/replica-$r.sock
YAML
done
start_replica() {
    local r=$1
    ( "$BIN/tbot" start --config-dir "$WORK/replica-$r" >> "$WORK/replica-$r.log" 2>&1 &
      echo $! > "$WORK/replica-$r.pid" )
}
wait_replica() { until "$BIN/tbotctl" status --dir "$WORK/replica-$1" 2>/dev/null | grep -q '^CA pin'; do sleep 0.05; done; }
for r in 0 1 2; do start_replica $r; done
for r in 0 1 2; do wait_replica $r; done
PIN=$("$BIN/tbotctl" status --dir "$WORK/replica-0" | sed -n 's/^CA pin: //p')
PINS=$(for r in 0 1 2; do "$BIN/tbotctl" status --dir "$WORK/replica-$r" | sed -n 's/^CA pin: //p'; done | sort -u | wc -l)
log "3 replicas started at once; distinct CA pins: $PINS ($PIN)"

cat > "$WORK/haproxy.cfg" <<CFG
global
    maxconn 4000
defaults
    mode tcp
    timeout connect 1s
    timeout client 1h
    timeout server 1h
    option redispatch
    retries 3
frontend issuers
    bind 127.0.0.1:$LB
    default_backend replicas
backend replicas
    balance leastconn
    server r0 127.0.0.1:${REPLICA[0]} check inter 500ms fall 2 rise 1
    server r1 127.0.0.1:${REPLICA[1]} check inter 500ms fall 2 rise 1
    server r2 127.0.0.1:${REPLICA[2]} check inter 500ms fall 2 rise 1
CFG
( haproxy -db -f "$WORK/haproxy.cfg" >> "$WORK/haproxy.log" 2>&1 & echo $! > "$WORK/haproxy.pid" )
until (echo > /dev/tcp/127.0.0.1/$LB) 2>/dev/null; do sleep 0.05; done
log "haproxy at 127.0.0.1:$LB"

agent_config() {
    local i=$1
    mkdir -p "$WORK/agent-$i/etc"
    cat > "$WORK/agent-$i/etc/tbot.yaml" <<YAML
version: v2
proxy_server: 127.0.0.1:$LB
renewal_interval: 10s
onboarding:
  join_method: token
  token: ha-agent-$i
  ca_pins: ["$PIN"]
storage: {type: directory, path: $WORK/agent-$i/state}
admin_socket: $WORK/agent-$i/admin.sock
services:
  - type: workload-identity-api
    listen: unix://$WORK/agent-$i/workload.sock
    selector: {name: example-workload-identity}
YAML
}
# What agent $1's `tbotctl get agent_config` says matching the regex $2 (waits up to 20 s).
agent_says() {
    local said=""
    for _ in $(seq 1 100); do
        said=$("$BIN/tbotctl" get agent_config --dir "$WORK/agent-$1/etc" 2>/dev/null | grep -m1 -o "$2" || true)
        [ -n "$said" ] && break
        sleep 0.2
    done
    echo "$said"
}
T0=$(now_ms)
for i in $(seq 1 "$N"); do
    agent_config "$i"
    "$BIN/tbot" start --config-dir "$WORK/agent-$i/etc" > "$WORK/agent-$i/agent.log" 2>&1 &
done
for i in $(seq 1 "$N"); do until [ -S "$WORK/agent-$i/workload.sock" ]; do sleep 0.02; done; done
T1=$(now_ms)
log "$N agents joined through haproxy in $((T1 - T0)) ms"
for i in $(seq 1 "$N"); do
    "$PY" tests/peers/spiffe_peer.py watch "$WORK/agent-$i/workload.sock" > "$WORK/agent-$i/watch.log" 2>&1 &
done
for i in $(seq 1 "$N"); do until grep -q spiffe:// "$WORK/agent-$i/watch.log" 2>/dev/null; do sleep 0.05; done; done
log "every workload has its SVID"
sleep 2

# 1. A replica SIGKILLed: its agents move to the others.
TK=$(now_ms)
kill -9 "$(cat "$WORK/replica-0.pid")"
log "replica-1 killed"
sleep 12
start_replica 0; wait_replica 0
log "replica-1 restarted"
sleep 2

# 2. One etcd member lost, then a second (no quorum): a newcomer's join fails naming the store;
#    renewals fail and are retried; workloads notice nothing. Then both come back.
kill -9 "$(cat "$WORK/etcd-m2.pid")"
log "etcd member m2 killed (quorum kept)"
sleep 3
TQ=$(now_ms)
kill -9 "$(cat "$WORK/etcd-m1.pid")"
log "etcd member m1 killed: no quorum"
NEW=$((N + 1))
agent_config "$NEW"
"$BIN/tbot" start --config-dir "$WORK/agent-$NEW/etc" > "$WORK/agent-$NEW/agent.log" 2>&1 &
REFUSAL=$(agent_says "$NEW" 'the store (etcd[^;]*')
log "newcomer during quorum loss: ${REFUSAL:-no refusal seen}"
sleep 8
start_etcd 1; start_etcd 2
until etcd_healthy; do sleep 0.2; done
TQR=$(now_ms)
log "etcd quorum back"
until [ -S "$WORK/agent-$NEW/workload.sock" ]; do sleep 0.05; done
TNEW=$(now_ms)
log "the newcomer joined $((TNEW - TQR)) ms after quorum returned"

# 3. Every replica restarted at once.
sleep 2
TA=$(now_ms)
for r in 0 1 2; do kill "$(cat "$WORK/replica-$r.pid")"; done
sleep 1
for r in 0 1 2; do start_replica $r; done
for r in 0 1 2; do wait_replica $r; done
log "every replica restarted"
PIN_AFTER=$("$BIN/tbotctl" status --dir "$WORK/replica-1" | sed -n 's/^CA pin: //p')
sleep 10

# 4. An edit deployed to every replica: every workload gets its new SVID.
TE=$(now_ms)
for r in 0 1 2; do sed -i 's|/uid/|/edited/|' "$WORK/replica-$r/workload-identity.yaml"; done
for i in $(seq 1 "$N"); do until grep -q /edited/ "$WORK/agent-$i/watch.log"; do sleep 0.02; done; done
log "edit seen by every workload after $(( $(now_ms) - TE )) ms"

# A used token stays used: a second agent with agent 1's token is refused.
REUSE=$((N + 2))
mkdir -p "$WORK/agent-$REUSE"
agent_config "$REUSE"
sed -i "s/token: ha-agent-$REUSE/token: ha-agent-1/" "$WORK/agent-$REUSE/etc/tbot.yaml"
"$BIN/tbot" start --config-dir "$WORK/agent-$REUSE/etc" > "$WORK/agent-$REUSE/agent.log" 2>&1 &
USED=$(agent_says "$REUSE" 'already used[^;]*')
STATUS=$("$BIN/tbotctl" status --dir "$WORK/replica-0" || true)
echo "$STATUS" > "$WORK/status.txt"

"$PY" - "$WORK" "$N" "$T0" "$T1" "$TK" "$TQ" "$TQR" "$TNEW" "$TA" "$TE" "$PIN" "$PIN_AFTER" "$PINS" "$REFUSAL" "$USED" <<'PY'
import datetime, json, os, sys
work, n = sys.argv[1], int(sys.argv[2])
t0, t1, tk, tq, tqr, tnew, ta, te = map(int, sys.argv[3:11])
pin, pin_after, pins = sys.argv[11:14]
# Quoted in the page's table: no backticks inside.
refusal, used = (m.replace("`", "'") for m in sys.argv[14:16])

def pct(values, p):
    values = sorted(values)
    return values[round((len(values) - 1) * p)] if values else None

def stamp(line):
    return int(datetime.datetime.fromisoformat(line.split()[0].rstrip("Z")).replace(tzinfo=datetime.timezone.utc).timestamp() * 1000)

failover, restart, errors, edit = [], [], 0, []
for i in range(1, n + 1):
    agent = os.path.join(work, f"agent-{i}")
    lines = open(os.path.join(agent, "agent.log")).read().splitlines()
    # Failover: agents whose connection broke after the kill, until their next connection.
    lost = [stamp(l) for l in lines if "lost the connection to the issuer" in l and tk <= stamp(l) < tk + 10_000]
    if lost:
        back = [stamp(l) for l in lines if "connected to the issuer" in l and "lost" not in l and stamp(l) > lost[0]]
        if back:
            failover.append(back[0] - tk)
    back = [stamp(l) for l in lines if "connected to the issuer" in l and "lost" not in l and stamp(l) > ta]
    if back:
        restart.append(back[0] - ta)
    for line in open(os.path.join(agent, "watch.log")):
        parts = line.split()
        if len(parts) >= 2 and parts[1] == "ERROR" and int(parts[0]) >= t1:
            errors += 1
    seen = [int(l.split()[0]) for l in open(os.path.join(agent, "watch.log")) if "/edited/" in l]
    edit.append(seen[0] - te)

report = {
    "agents": n,
    "replicas": 3,
    "etcd_members": 3,
    "join_storm_ms": t1 - t0,
    "joins_per_second": round(n / ((t1 - t0) / 1000), 1),
    "distinct_ca_pins_at_start": int(pins),
    "replica_killed_agents_moved": len(failover),
    "failover_ms": {"p50": pct(failover, 0.5), "p99": pct(failover, 0.99), "max": max(failover) if failover else None},
    "newcomer_refusal_without_quorum": refusal,
    "newcomer_joined_after_quorum_returned_ms": tnew - tqr,
    "all_replicas_restarted_reconnect_ms": {"p50": pct(restart, 0.5), "p99": pct(restart, 0.99), "max": max(restart) if restart else None},
    "edit_on_every_replica_to_new_svid_ms": {"p50": pct(edit, 0.5), "p99": pct(edit, 0.99), "max": max(edit)},
    "workload_visible_errors": errors,
    "ca_survived_restarts": pin == pin_after,
    "used_token_still_refused": used,
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
}
print(json.dumps(report, indent=1))
json.dump(report, open("docs/ha.json", "w"), indent=1)
f = report["failover_ms"]
r = report["all_replicas_restarted_reconnect_ms"]
e = report["edit_on_every_replica_to_new_svid_ms"]
with open("docs/ha.md", "w") as out:
    out.write(f"""# High-availability run

Written by `scripts/ha.sh {n}` on {report['date']}: a 3-member etcd cluster, 3 issuer replicas
(`tbot start`, `storage.type: etcd`, keys sealed with one key file) behind haproxy (TCP,
`leastconn`, health checks every 500 ms), and {n} agents joining through haproxy, each with a
py-spiffe workload watching its SVID and renewing its bot identity every 10 s. Everything runs on
loopback on this 2-core machine.

| what | figure |
|---|---|
| replicas started at once: distinct CA pins | {pins} |
| join storm: {n} agents through haproxy | {report['join_storm_ms']} ms ({report['joins_per_second']} joins/s) |
| replica-1 SIGKILLed: agents whose connection broke, and their time to the next connection | {len(failover)}; p50 {f['p50']} ms, p99 {f['p99']} ms, max {f['max']} ms |
| etcd quorum lost: a newcomer's join | refused: `{refusal}` |
| quorum back: the newcomer joined after | {report['newcomer_joined_after_quorum_returned_ms']} ms |
| every replica restarted at once: agents reconnected | p50 {r['p50']} ms, p99 {r['p99']} ms, max {r['max']} ms |
| an edit deployed to every replica → new SVID at every workload | p50 {e['p50']} ms, p99 {e['p99']} ms, max {e['max']} ms |
| errors seen by workloads during all of it | {errors} |
| the CA survived every restart (same pin) | {'yes' if report['ca_survived_restarts'] else 'NO'} |
| a used token is still refused after the restarts | `{used}` |

Failover is dominated by the agents' reconnect policy: after a connection that was up, the first
retry waits a random 0–5 s, so agents of a lost replica do not all arrive at another at once.
""")
PY
echo "wrote docs/ha.json and docs/ha.md (work directory $WORK; KEEP=1 keeps it)"
