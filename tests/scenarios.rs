//! Every lifecycle event on every topology, with workloads running throughout: Rust `spiffe` and
//! py-spiffe streams, a new py-spiffe process every second, and `tbotctl status` twice a second on
//! every agent (see `common::scenario`). Each topology runs its events in sequence; the invariants
//! are checked over everything the workloads saw, and each event's time to convergence is printed
//! (`cargo nextest run --test scenarios --no-capture`).

mod common;

use std::time::{Duration, Instant};

use common::fleet::{Issuer, agent_cas, agent_config, start_agent, token_onboarding, wait_for_socket};
use common::scenario::{Timeline, Workloads, until};
use common::{Daemon, id, open_stream, save, stdout, venv_python};

const TOKEN: &str = "fleet-token-change-me";
const UID_TEMPLATE: &str = "/uid/{{workload.unix.uid}}";

/// The fleet's bot-token document with more single-use tokens after it.
fn more_tokens(names: &[&str]) -> String {
    let mut text = "bot_name: example-bot\n".to_owned();
    for name in names {
        text.push_str(&format!(
            "---\nkind: token\nversion: v2\nmetadata:\n  name: {name}\nspec:\n  roles: [Bot]\n  join_method: token\n  \
             bot_name: example-bot\n"
        ));
    }
    text
}

/// An agent of `issuer` joined with `token`, trusting `pin`; waits until it serves.
fn joined(issuer_port: u16, token: &str, pin: &str) -> Daemon {
    let onboarding = token_onboarding(token, pin);
    let daemon = start_agent(
        |dir| agent_config(dir, issuer_port, &onboarding, "example-workload-identity"),
        &[],
    );
    wait_for_socket(&daemon);
    daemon
}

fn status(daemon: &Daemon) -> String {
    stdout(&daemon.tbotctl(&["status"]))
}

fn pins(status: &str) -> Vec<String> {
    status
        .lines()
        .filter_map(|l| l.strip_prefix("CA pin: ").map(str::to_owned))
        .collect()
}

fn tbotctl_ok(daemon: &Daemon, args: &[&str]) -> String {
    let out = daemon.tbotctl(args);
    assert!(
        out.status.success(),
        "tbotctl {args:?}: {}{}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout(&out)
}

fn edit(daemon: &Daemon, file: &str, from: &str, to: &str) {
    let path = daemon.dir.path().join("etc").join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{file} has no {from:?}");
    save(&path, &text.replace(from, to));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_issuer_and_two_agents_through_rotations_an_outage_restarts_and_new_joins() {
    let Some(python) = venv_python("spiffe") else { return };
    let tokens = more_tokens(&["agent-b", "later-1", "later-2", "later-3", "later-4"]);
    let mut issuer = Issuer::start(UID_TEMPLATE, &[("bot-token.yaml", "bot_name: example-bot\n", &tokens)]);
    let port = issuer.port;
    let timeline = Timeline::default();
    let mut a = joined(port, TOKEN, &issuer.pin);
    let b = joined(port, "agent-b", &issuer.pin);
    let (stream, first) = open_stream(&a).await;
    let mut wa = Workloads::start("agent a", &a, &python, stream).await;
    let (stream, _) = open_stream(&b).await;
    let wb = Workloads::start("agent b", &b, &python, stream).await;
    let start_id = id(&first);
    wa.wait_for_id(&start_id);
    wb.wait_for_id(&start_id);
    let both_on = |ca: &str| {
        let cas = agent_cas(&status(&issuer.daemon));
        cas.len() == 2 && cas.iter().all(|c| c == ca)
    };

    // 1. A CA rotation by hand, activated by the schedule after a 3 s grace; meanwhile a new agent
    // joins with each pin status prints.
    let t = Instant::now();
    tbotctl_ok(&issuer.daemon, &["rotate", "ca", "--grace", "3s"]);
    let shown = pins(&common::fleet::wait_for_status(&issuer.daemon, "two pins", |s| {
        pins(s).len() == 2
    }));
    for (pin, token) in shown.iter().zip(["later-1", "later-2"]) {
        drop(joined(port, token, pin));
    }
    let took = until("both agents renew onto CA 2", || both_on("2"));
    timeline.record(
        "CA rotation by hand (3 s grace) → both agents on CA 2",
        t.elapsed().max(took),
    );

    // 2. The retiring CA withdrawn at once: nobody holds a certificate of it, so nobody is stranded.
    let t = Instant::now();
    tbotctl_ok(&issuer.daemon, &["rotate", "ca", "--force"]);
    until("one pin on both agents", || {
        pins(&status(&a)).len() == 1 && pins(&status(&b)).len() == 1
    });
    timeline.record("forced retire → one CA on both agents", t.elapsed());

    // 3. Forced activation, then forced retire two seconds later.
    tbotctl_ok(&issuer.daemon, &["rotate", "ca", "--grace", "1h"]);
    until("the prepared CA on both agents", || {
        pins(&status(&a)).len() == 2 && pins(&status(&b)).len() == 2
    });
    let t = Instant::now();
    tbotctl_ok(&issuer.daemon, &["rotate", "ca", "--force"]);
    timeline.record(
        "forced activation → both agents on CA 3",
        until("CA 3", || both_on("3")),
    );
    std::thread::sleep(Duration::from_secs(2).saturating_sub(t.elapsed()));
    let t = Instant::now();
    tbotctl_ok(&issuer.daemon, &["rotate", "ca", "--force"]);
    until("one pin on both agents", || {
        pins(&status(&a)).len() == 1 && pins(&status(&b)).len() == 1
    });
    timeline.record(
        "forced retire 2 s after activation → one CA on both agents",
        t.elapsed(),
    );

    // 4. A JWT key rotation, forced through: the one-shot processes validate every JWT-SVID.
    tbotctl_ok(&issuer.daemon, &["rotate", "jwt", "--grace", "1h"]);
    let t = Instant::now();
    tbotctl_ok(&issuer.daemon, &["rotate", "jwt", "--force"]);
    tbotctl_ok(&issuer.daemon, &["rotate", "jwt", "--force"]);
    std::thread::sleep(Duration::from_secs(2));
    timeline.record("JWT key activated and retired (forced)", t.elapsed());

    // 5. Two CA rotations and two JWT key rotations in a row, each with a grace of seconds: the
    // second is prepared while the first key still retires (no --force). Then a compromise of
    // both: the replaced keys tainted (the agents move off them), then revoked.
    let t = Instant::now();
    for (key, ids) in [("ca", ["4", "5"]), ("jwt", ["3", "4"])] {
        for id in ids {
            tbotctl_ok(&issuer.daemon, &["rotate", key, "--grace", "2s"]);
            let row = format!("{key} {id} ");
            until_long(&format!("{key} {id} active"), || {
                status(&issuer.daemon)
                    .lines()
                    .any(|l| l.trim_start().starts_with(&row) && l.contains(" active "))
            });
        }
    }
    timeline.record("two CA and two JWT rotations in a row (2 s graces)", t.elapsed());
    until("both agents renew onto CA 5", || both_on("5"));
    let t = Instant::now();
    for key in ["ca", "jwt"] {
        tbotctl_ok(&issuer.daemon, &["rotate", key, "--taint-old"]);
        until(&format!("nothing depends on a tainted {key} key"), || {
            let now = status(&issuer.daemon);
            let tainted: Vec<&str> = now.lines().filter(|l| l.contains(" tainted ")).collect();
            !tainted.is_empty() && tainted.iter().all(|l| l.contains(" 0/0 "))
        });
        tbotctl_ok(&issuer.daemon, &["rotate", key, "--revoke-old"]);
    }
    until("one pin on both agents", || {
        pins(&status(&a)).len() == 1 && pins(&status(&b)).len() == 1
    });
    timeline.record(
        "CA and JWT key tainted, then revoked → one CA on both agents",
        t.elapsed(),
    );

    // 6. A document edit on the issuer reaches both agents' new processes.
    let t = Instant::now();
    edit(
        &issuer.daemon,
        "workload-identity.yaml",
        UID_TEMPLATE,
        "/edited/{{workload.unix.uid}}",
    );
    let edited = start_id.replace("/uid/", "/edited/");
    wa.wait_for_id(&edited);
    wb.wait_for_id(&edited);
    timeline.record(
        "workload_identity edit → new processes on both agents get it",
        t.elapsed(),
    );

    // 7. The issuer SIGKILLed for 3 s: the workloads notice nothing.
    let (dir, admin) = issuer.daemon.crash();
    let t = Instant::now();
    until("both agents see the outage", || {
        status(&a).contains("NOT connected") && status(&b).contains("NOT connected")
    });
    timeline.record("issuer SIGKILL → both agents report it", t.elapsed());
    std::thread::sleep(Duration::from_secs(3));
    let _ = std::fs::remove_file(&admin);
    let t = Instant::now();
    issuer = Issuer {
        daemon: Daemon::start(dir, admin),
        port,
        pin: issuer.pin,
    };
    until("both agents reconnect", || {
        status(&a).contains("(connected)") && status(&b).contains("(connected)")
    });
    timeline.record("issuer restarted → both agents connected", t.elapsed());

    // 8. Agent a restarted while the issuer is down: it holds no SVID yet, so its callers get
    // `Unavailable` (declared) and its status says so, until the issuer is back.
    let (dir, admin) = issuer.daemon.crash();
    wa.begin_window();
    a = a.restart();
    // Long enough for new processes to ask it while it holds nothing.
    std::thread::sleep(Duration::from_secs(3));
    let t = Instant::now();
    let _ = std::fs::remove_file(&admin);
    issuer = Issuer {
        daemon: Daemon::start(dir, admin),
        port,
        pin: issuer.pin,
    };
    wa.wait_for_id(&edited);
    wa.end_window();
    let (stream, _) = open_stream(&a).await;
    wa.restarted(stream);
    timeline.record(
        "issuer back after agent a restarted in the outage → a serves",
        t.elapsed(),
    );

    // 9. A new agent with the pin status prints now.
    let now = pins(&status(&issuer.daemon));
    let t = Instant::now();
    for (pin, token) in now.iter().zip(["later-3", "later-4"]) {
        drop(joined(port, token, pin));
    }
    timeline.record("a new agent joins with the pin shown now", t.elapsed());

    let (sa, sb) = (wa.finish(), wb.finish());
    timeline.print("issuer + two agents");
    println!("  agent a: {sa:?}\n  agent b: {sb:?}");
    // Every rotation re-signed what the streams hold: each saw many messages.
    assert!(sa.fetches > 10 && sb.fetches > 10, "{sa:?} {sb:?}");
    assert!(sb.stream_messages >= 4, "{sb:?}");
    // Agent a's callers were refused only while it held nothing (the declared window), with
    // `Unavailable`, while its status said so: the invariants above checked that.
    assert!(sa.failed > 0, "the window was exercised: {sa:?}");
    assert_eq!(sb.failed, 0, "{sb:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_single_host_through_scheduled_and_forced_rotations_an_edit_and_a_restart() {
    let Some(python) = venv_python("spiffe") else { return };
    // The CA lives 40 s: a successor is prepared 20 s and activated 10 s before its end.
    let schedule =
        "key_algorithm: ecdsa-p256\n    validity: 40s\n    rotation: {prepare_before: 20s, activate_before: 10s}";
    let mut edits = common::QUICKSTART_ON_DISK.to_vec();
    edits.push(("cluster.yaml", "key_algorithm: ecdsa-p256", schedule));
    let (dir, socket) = common::copy_manifests("manifests/quickstart", &edits);
    let mut daemon = Daemon::start(dir, socket);
    let timeline = Timeline::default();
    let (stream, first) = open_stream(&daemon).await;
    let mut w = Workloads::start("single host", &daemon, &python, stream).await;
    let start_id = id(&first);
    w.wait_for_id(&start_id);
    let key_phase = |daemon: &Daemon, key: &str| {
        status(daemon)
            .lines()
            .find(|l| l.trim_start().starts_with(key))
            .map(|l| l.split_whitespace().nth(2).unwrap_or_default().to_owned())
            .unwrap_or_default()
    };

    // 1. While the schedule prepares the next CA: a JWT key rotation by hand, forced through.
    tbotctl_ok(&daemon, &["rotate", "jwt", "--grace", "1h"]);
    let t = Instant::now();
    tbotctl_ok(&daemon, &["rotate", "jwt", "--force"]);
    tbotctl_ok(&daemon, &["rotate", "jwt", "--force"]);
    std::thread::sleep(Duration::from_secs(2));
    timeline.record("JWT key activated and retired (forced)", t.elapsed());

    // 2. A document edit.
    let t = Instant::now();
    edit(
        &daemon,
        "workload-identity.yaml",
        "/user/{{workload.unix.uid}}",
        "/edited/{{workload.unix.uid}}",
    );
    let edited = start_id.replace("/user/", "/edited/");
    w.wait_for_id(&edited);
    timeline.record("workload_identity edit → a new process gets it", t.elapsed());

    // 3. The scheduled activation of CA 2 (about 30 s after start).
    until_long("the schedule activates CA 2", || key_phase(&daemon, "ca 2") == "active");
    let t = Instant::now();
    let client = spiffe::WorkloadApiClient::connect_to(daemon.endpoint()).await.unwrap();
    loop {
        let ctx = client.fetch_x509_context().await.unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(ctx.svids()[0].leaf().as_ref()).unwrap();
        if leaf.issuer().to_string().contains("CA 2") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "no SVID of CA 2");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    timeline.record("scheduled CA activation → a fetch gets an SVID of CA 2", t.elapsed());

    // 4. The retiring CA withdrawn by hand.
    let t = Instant::now();
    tbotctl_ok(&daemon, &["rotate", "ca", "--force"]);
    until("one pin", || pins(&status(&daemon)).len() == 1);
    timeline.record("forced retire → one CA", t.elapsed());

    // 5. A restart (SIGTERM, start): the window while the daemon is down is declared.
    w.begin_window();
    let t = Instant::now();
    daemon = daemon.restart();
    w.wait_for_id(&edited);
    w.end_window();
    timeline.record("restart → a new process is served", t.elapsed());
    let (stream, _) = open_stream(&daemon).await;
    w.restarted(stream);
    std::thread::sleep(Duration::from_secs(2));

    let summary = w.finish();
    timeline.print("single host");
    println!("  {summary:?}");
    assert!(summary.stream_messages >= 3, "{summary:?}");
}

/// Waits until `f` holds (60 s): for the schedule's own steps.
fn until_long(what: &str, mut f: impl FnMut() -> bool) {
    common::wait_until(what, Duration::from_secs(60), || f().then_some(()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_behind_haproxy_and_two_agents_through_a_replica_kill_an_etcd_member_loss_and_a_rotation() {
    let Some(python) = venv_python("spiffe") else { return };
    let Some(mut set) = common::ha::Replicas::start_with(3, false) else {
        return;
    };
    if set.start_haproxy().is_none() {
        return;
    }
    let pin = pins(&set.status(0)).remove(0);
    let lb = set.lb_port;
    let timeline = Timeline::default();
    let a = joined(lb, TOKEN, &pin);
    let b = joined(lb, "second-token", &pin);
    let (stream, first) = open_stream(&a).await;
    let wa = Workloads::start("agent a", &a, &python, stream).await;
    let (stream, _) = open_stream(&b).await;
    let wb = Workloads::start("agent b", &b, &python, stream).await;
    let start_id = id(&first);
    wa.wait_for_id(&start_id);
    wb.wait_for_id(&start_id);
    // How many agents replica `i` has connected.
    let connected_to = |set: &common::ha::Replicas, i: usize| -> usize {
        set.status(i)
            .split(" connected)")
            .next()
            .and_then(|head| head.rsplit('(').next())
            .and_then(|n| n.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    until("both agents connected", || {
        (0..3).map(|i| connected_to(&set, i)).sum::<usize>() == 2
    });
    let victim = (0..3).max_by_key(|i| connected_to(&set, *i)).unwrap();
    let live: Vec<usize> = (0..3).filter(|i| *i != victim).collect();
    let on_live = |set: &common::ha::Replicas| -> usize { live.iter().map(|i| connected_to(set, *i)).sum() };

    // 1. The replica with agents on it SIGKILLed: they reconnect through haproxy to another.
    let (dir, admin) = set.kill(victim);
    let t = Instant::now();
    until("both agents on the live replicas", || on_live(&set) == 2);
    timeline.record(
        "replica SIGKILL → both agents connected to the live replicas",
        t.elapsed(),
    );

    // 2. An etcd member lost while a CA rotation runs by hand on another replica.
    set.etcd.kill_member(0);
    let t = Instant::now();
    tbotctl_ok(&set.get(live[0]).daemon, &["rotate", "ca", "--grace", "3s"]);
    until("the new CA on both agents", || {
        pins(&status(&a)).len() == 2 && pins(&status(&b)).len() == 2
    });
    timeline.record(
        "CA prepared with an etcd member down → both agents have it",
        t.elapsed(),
    );
    // Activated by the schedule of whichever replica gets there first. The retire is forced on the
    // replica with fewer agents: it must wait for the other replica's agents to renew too.
    let on = *live.iter().min_by_key(|i| connected_to(&set, **i)).unwrap();
    until_long("CA 2 active", || {
        status(&set.get(on).daemon)
            .lines()
            .any(|l| l.trim_start().starts_with("ca 2") && l.contains("active"))
    });
    let t = Instant::now();
    tbotctl_ok(&set.get(on).daemon, &["rotate", "ca", "--force"]);
    until("one pin on both agents", || {
        pins(&status(&a)).len() == 1 && pins(&status(&b)).len() == 1
    });
    timeline.record(
        "forced retire (on the other replica) → one CA on both agents",
        t.elapsed(),
    );
    for agent in [&a, &b] {
        let now = status(agent);
        assert!(
            now.contains("(connected)") && !now.contains("REFUSES"),
            "nobody stranded: {now}"
        );
    }

    // 3. A key compromise across the replicas: the successor prepared on one, the old CA tainted
    // on the other (activating the successor), and revoked on the replica with fewer agents once
    // every agent moved off it (the other replica's agents count through its heartbeats).
    let t = Instant::now();
    tbotctl_ok(&set.get(live[0]).daemon, &["rotate", "ca", "--grace", "1h"]);
    until("CA 3 on both agents", || {
        pins(&status(&a)).len() == 2 && pins(&status(&b)).len() == 2
    });
    tbotctl_ok(&set.get(live[1]).daemon, &["rotate", "ca", "--taint-old"]);
    tbotctl_ok(&set.get(on).daemon, &["rotate", "ca", "--revoke-old"]);
    until("one pin on both agents and both live replicas", || {
        pins(&status(&a)).len() == 1
            && pins(&status(&b)).len() == 1
            && live.iter().all(|i| pins(&set.status(*i)).len() == 1)
    });
    timeline.record(
        "CA tainted on one replica, revoked on another → one CA everywhere",
        t.elapsed(),
    );

    // 4. The member and the replica come back.
    set.etcd.start_member(0);
    let t = Instant::now();
    set.restart(victim, dir, admin);
    timeline.record("killed replica restarted → ready", t.elapsed());

    // 5. A rollout of an edit to every replica.
    let t = Instant::now();
    for i in 0..3 {
        edit(
            &set.get(i).daemon,
            "workload-identity.yaml",
            "/uid/{{workload.unix.uid}}",
            "/rolled/{{workload.unix.uid}}",
        );
    }
    let rolled = start_id.replace("/uid/", "/rolled/");
    wa.wait_for_id(&rolled);
    wb.wait_for_id(&rolled);
    timeline.record(
        "edit rolled out to 3 replicas → new processes on both agents",
        t.elapsed(),
    );

    // 6. A new agent with the pin a replica shows now.
    let now = pins(&set.status(victim)).remove(0);
    let t = Instant::now();
    drop(joined(lb, "third-token", &now));
    timeline.record("a new agent joins through haproxy with the pin shown now", t.elapsed());

    let (sa, sb) = (wa.finish(), wb.finish());
    timeline.print("3 replicas on etcd behind haproxy + two agents");
    println!("  agent a: {sa:?}\n  agent b: {sb:?}");
    assert_eq!((sa.failed, sb.failed), (0, 0));
}
