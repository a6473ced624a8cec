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
    let shown = pins(&common::fleet::wait_for_status(&issuer.daemon, "two pins", |s| pins(s).len() == 2));
    for (pin, token) in shown.iter().zip(["later-1", "later-2"]) {
        drop(joined(port, token, pin));
    }
    let took = until("both agents renew onto CA 2", || both_on("2"));
    timeline.record("CA rotation by hand (3 s grace) → both agents on CA 2", t.elapsed().max(took));

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
    timeline.record("forced activation → both agents on CA 3", until("CA 3", || both_on("3")));
    std::thread::sleep(Duration::from_secs(2).saturating_sub(t.elapsed()));
    let t = Instant::now();
    tbotctl_ok(&issuer.daemon, &["rotate", "ca", "--force"]);
    until("one pin on both agents", || {
        pins(&status(&a)).len() == 1 && pins(&status(&b)).len() == 1
    });
    timeline.record("forced retire 2 s after activation → one CA on both agents", t.elapsed());

    // 4. A JWT key rotation, forced through: the one-shot processes validate every JWT-SVID.
    tbotctl_ok(&issuer.daemon, &["rotate", "jwt", "--grace", "1h"]);
    let t = Instant::now();
    tbotctl_ok(&issuer.daemon, &["rotate", "jwt", "--force"]);
    tbotctl_ok(&issuer.daemon, &["rotate", "jwt", "--force"]);
    std::thread::sleep(Duration::from_secs(2));
    timeline.record("JWT key activated and retired (forced)", t.elapsed());

    // 5. A document edit on the issuer reaches both agents' new processes.
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
    timeline.record("workload_identity edit → new processes on both agents get it", t.elapsed());

    // 6. The issuer SIGKILLed for 3 s: the workloads notice nothing.
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

    // 7. Agent a restarted while the issuer is down: it holds no SVID yet, so its callers get
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
    timeline.record("issuer back after agent a restarted in the outage → a serves", t.elapsed());

    // 8. A new agent with the pin status prints now.
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
