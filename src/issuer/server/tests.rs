use super::*;
use crate::issuer::Issuer;
use crate::issuer::keys::rotation::ByHand;
use crate::store::Store;
use crate::testing::examples::{EXAMPLE_DOCUMENTS, policy_from_text};

/// A `Watch` stream's state for an agent of bot `b` with `certificate`, as the API opens it.
fn watching(issuer: &Arc<LocalIssuer>, certificate: Vec<u8>) -> WatchState {
    let sessions = Arc::new(Sessions::default());
    let guard = sessions.open(AgentSession {
        bot: "b".into(),
        instance: "i".into(),
        address: "127.0.0.1:1".parse().unwrap(),
        generation: 1,
        connected_at: OffsetDateTime::now_utc(),
        certificate: CertDigest::of(&certificate),
        ca: 1,
        held: None,
    });
    WatchState {
        bundles: issuer.bundles(),
        events: issuer.policy_events(),
        locks: issuer.locks(),
        issuer: issuer.clone(),
        certificate: Arc::from(certificate),
        base: 0,
        sent: None,
        seen_revision: 0,
        until: tokio::time::Instant::now() + Duration::from_secs(3600),
        ended: false,
        last_bundle: issuer.current_bundles(),
        sessions,
        _guard: guard,
    }
}

async fn next(state: &mut WatchState) -> proto::WatchUpdate {
    tokio::time::timeout(Duration::from_secs(5), state.next())
        .await
        .expect("a message")
        .expect("the stream goes on")
        .expect("no refusal")
}

fn cas(update: &proto::WatchUpdate) -> Option<usize> {
    update.bundle.as_ref().map(|b| b.x509_authorities.len())
}

async fn issuer() -> Arc<LocalIssuer> {
    Arc::new(
        LocalIssuer::open(Store::memory(), policy_from_text(EXAMPLE_DOCUMENTS))
            .await
            .unwrap(),
    )
}

/// A bot instance joined with the token `t`.
async fn joined(issuer: &LocalIssuer) -> crate::issuer::BotCertificate {
    let key = rcgen::KeyPair::generate().unwrap();
    issuer
        .join(JoinRequest {
            token: "t".into(),
            public_key: rcgen::PublicKeyData::subject_public_key_info(&key),
            proof: JoinProof::Token,
            ttl: Duration::from_secs(3600),
            current: None,
            address: String::new(),
        })
        .await
        .unwrap()
}

const PREPARE: ByHand = ByHand::Rotate {
    grace: Duration::from_secs(3600),
    force: false,
};
const FORCE: ByHand = ByHand::Rotate {
    grace: Duration::from_secs(3600),
    force: true,
};

#[tokio::test]
async fn an_edit_is_sent_without_the_bundle_unless_the_bundle_changed_since_last_sent() {
    let issuer = issuer().await;
    let mut state = watching(&issuer, Vec::new());
    assert_eq!(
        cas(&next(&mut state).await),
        Some(1),
        "the first message has the bundle"
    );

    // An edit that leaves the bundle as it was: a few bytes, not the whole bundle again.
    issuer.announce(["wi".to_owned()].into());
    let edit = next(&mut state).await;
    assert_eq!(
        (cas(&edit), edit.identities.as_slice()),
        (None, ["wi".to_owned()].as_slice())
    );

    // A bundle change is sent with the bundle.
    issuer.rotate_by_hand(false, PREPARE).await.unwrap();
    assert_eq!(cas(&next(&mut state).await), Some(2));

    // An edit while a newer bundle waits to be sent carries it: the agent never re-decides for
    // an edit before it has the bundle the issuer had then. Its own message still follows.
    issuer.rotate_by_hand(true, PREPARE).await.unwrap();
    let last = state.sent.unwrap();
    let event = PolicyEvent {
        revision: last + 1,
        identities: ["db".to_owned()].into(),
        all: false,
    };
    let edit = state.policy_update(last, &event);
    assert!(edit.bundle.as_ref().is_some_and(|b| b.jwt_keys.len() == 2), "{edit:?}");
    let bundle = next(&mut state).await;
    assert!(
        bundle.bundle.as_ref().is_some_and(|b| b.jwt_keys.len() == 2),
        "{bundle:?}"
    );
    let event = PolicyEvent {
        revision: last + 2,
        ..event
    };
    assert_eq!(state.policy_update(last + 1, &event).bundle, None, "then no more");
}

#[tokio::test]
async fn a_ca_withdrawn_between_a_streams_opening_and_its_first_message_ends_it() {
    let issuer = issuer().await;
    let bot = joined(&issuer).await;
    // The stream is opened (its certificate checked) with the first CA in the bundle...
    let mut state = watching(&issuer, bot.der.clone());
    // ...which a forced retire withdraws before the first message.
    issuer.rotate_by_hand(false, PREPARE).await.unwrap();
    issuer.rotate_by_hand(false, FORCE).await.unwrap();
    issuer.rotate_by_hand(false, FORCE).await.unwrap();
    assert_eq!(issuer.current_bundles().x509_authorities.len(), 1);
    let refused = tokio::time::timeout(Duration::from_secs(5), state.next())
        .await
        .unwrap()
        .expect("an answer")
        .expect_err("the certificate's CA is gone");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(state.next().await.is_none(), "the stream has ended");
    assert_eq!(state.sessions.refusals().len(), 1, "the instance is listed as refused");
}

#[tokio::test]
async fn an_instance_locked_between_a_streams_opening_and_its_first_message_hears_nothing() {
    let issuer = issuer().await;
    let bot = joined(&issuer).await;
    let mut state = watching(&issuer, bot.der.clone());
    issuer
        .set_lock(&bot.bot, &bot.instance, Some("a leaked key".into()))
        .await
        .unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(5), state.next())
        .await
        .unwrap()
        .expect("an answer")
        .expect_err("the instance is locked");
    assert!(refused.message().contains("a leaked key"), "{refused:?}");
    assert!(state.next().await.is_none(), "the stream has ended");
    assert_eq!(state.sessions.refusals().len(), 1);
}
