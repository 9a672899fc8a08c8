//! The conformance cases, one per rule of `docs/specs/pubsub-adapter.md`.
//!
//! Each case takes the fixture, works on topics and groups named only for it, and panics with a
//! message naming the broken rule. A case about a feature the fixture does not declare returns
//! [`Verdict::Skipped`] before touching the broker.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::future::join_all;
use tokio::time::Instant;

use super::support::{
    AckingConsumer, Env, RUN_KEY, SEQ_KEY, ack, assert_exactly, assert_in_order, assert_no_errors,
    duplicate_ids, numbered, seqs, unique_name, wait_for_total,
};
use super::{Features, PubSubFixture, Verdict};
use crate::message::{Message, MessageId, Metadata, Outcome};
use crate::pubsub::{MessageStream, PublishError, Publisher, SubscribeError, Subscriber};

/// Returns [`Verdict::Skipped`] unless every named feature is declared.
macro_rules! require {
    ($env:expr, $($feature:ident),+ $(,)?) => {
        $(
            if !$env.features().$feature {
                return Verdict::Skipped { missing: stringify!($feature) };
            }
        )+
    };
}

/// Publishes `messages` in chunks of `chunk` (one publish call each).
async fn publish_in_chunks(
    env: &Env,
    publisher: &dyn Publisher,
    topic: &str,
    messages: &[Message],
    chunk: usize,
) {
    for part in messages.chunks(chunk.max(1)) {
        env.publish(publisher, topic, part.to_vec()).await;
    }
}

/// Receives (acking) until every message of `expected` arrived. A message from `acked_before`
/// arriving again is a violation when the adapter declares `exactly_once` and tolerated (acked
/// again) otherwise; anything else unexpected, or an expected message twice, is a violation.
/// Returns the expected messages in arrival order.
async fn receive_expected(
    env: &Env,
    stream: &mut MessageStream,
    expected: &[Message],
    acked_before: &HashSet<MessageId>,
    what: &str,
) -> Vec<Message> {
    let wanted: HashSet<&MessageId> = expected.iter().map(|m| &m.id).collect();
    let mut got: Vec<Message> = Vec::new();
    let mut seen: HashSet<MessageId> = HashSet::new();
    let mut redelivered_acked = 0usize;
    while seen.len() < wanted.len() {
        assert!(
            redelivered_acked <= 10 * acked_before.len() + 10,
            "{what}: {redelivered_acked} redeliveries of acked messages: a redelivery loop"
        );
        let message = env
            .next(
                stream,
                &format!("{what} (received {} of {})", seen.len(), wanted.len()),
            )
            .await;
        ack(&message, what);
        if wanted.contains(&message.id) {
            assert!(
                seen.insert(message.id.clone()),
                "{what}: message {} (seq {:?}) was delivered twice although it was acked",
                message.id,
                message.metadata.get(SEQ_KEY)
            );
            got.push(message);
        } else if acked_before.contains(&message.id) {
            assert!(
                !env.features().exactly_once,
                "{what}: message {} (seq {:?}) was acked before but delivered again, and the \
                 adapter declares exactly_once",
                message.id,
                message.metadata.get(SEQ_KEY)
            );
            redelivered_acked += 1;
        } else {
            panic!(
                "{what}: unexpected message {} (metadata {:?})",
                message.id, message.metadata
            );
        }
    }
    assert_exactly(&got, expected, what);
    got
}

/// Rule: a subscription receives every message published to its topic after `subscribe`
/// returned, with the same id (UUID or text), metadata (standard keys, case-sensitive keys of
/// `[A-Za-z0-9_.-]`, unicode, empty and space-padded values) and payload (empty, binary, large),
/// each with a pending delivery.
pub async fn round_trip_keeps_id_metadata_and_payload(fixture: Arc<dyn PubSubFixture>) -> Verdict {
    let env = Env::new(fixture);
    let topic = unique_name("round_trip");
    let (_subscriber, mut stream) = env.subscription(None, &topic).await;
    let publisher = env.publisher().await;

    let large_size_bytes = env
        .features()
        .payload_size_bytes_max
        .min(Features::LARGE_PAYLOAD_BYTES);
    let large: Vec<u8> = (0..large_size_bytes)
        .map(|i| u8::try_from(i % 251).unwrap_or(0))
        .collect();
    let text_id = MessageId::parse(&format!("conformance-{}", uuid::Uuid::new_v4().simple()))
        .unwrap_or_else(|error| panic!("a valid text id: {error}"));
    let sent = vec![
        Message::new("order 42 placed")
            .with_metadata(Metadata::CORRELATION_ID, "corr-1")
            .with_metadata(Metadata::CAUSATION_ID, "cause-1")
            .with_metadata(Metadata::MESSAGE_TYPE, "OrderPlaced")
            .with_metadata(Metadata::CONTENT_TYPE, "text/plain; charset=utf-8")
            .with_metadata(Metadata::PARTITION_KEY, "order-42"),
        Message::new(Bytes::new()),
        Message::new(Bytes::from_static(&[0, 159, 146, 150, 255, 0]))
            .with_metadata("tenant", "ünïcødé ✓ 日本語 🦀")
            .with_metadata("empty_value", "")
            .with_metadata("x-trace.id", "  padded value  ")
            .with_metadata("MixedCase_Key", "keys are case-sensitive"),
        Message::with_id(text_id, "a message with a text id"),
        Message::new(Bytes::from(large))
            .with_metadata(Metadata::CONTENT_TYPE, "application/octet-stream"),
    ];
    env.publish(&*publisher, &topic, sent.clone()).await;

    let received = env.receive(&mut stream, sent.len(), "round trip").await;
    for message in &received {
        assert!(
            message.has_delivery() && message.outcome().is_none(),
            "round trip: message {} arrived without a pending delivery ({:?})",
            message.id,
            message.outcome()
        );
    }
    assert_exactly(&received, &sent, "round trip");
    // No order check here: these messages have different partition keys (and none), and §7
    // promises order only within one key (a partitioned broker spreads the rest); the
    // ordering cases check it.
    for message in &received {
        ack(message, "round trip");
    }
    env.assert_quiet(&mut stream, "round trip, after acking everything")
        .await;
    Verdict::Passed
}

/// Rule: publishing an empty batch succeeds and delivers nothing; publishing to a topic nobody
/// subscribes to succeeds (and does not hang).
pub async fn publishing_nothing_or_to_nobody_succeeds(fixture: Arc<dyn PubSubFixture>) -> Verdict {
    let env = Env::new(fixture);
    let publisher = env.publisher().await;
    let nobody = unique_name("nobody_listens");
    env.publish(&*publisher, &nobody, numbered(&nobody, 0, 3))
        .await;

    let topic = unique_name("empty_publish");
    let (_subscriber, mut stream) = env.subscription(None, &topic).await;
    env.publish(&*publisher, &topic, Vec::new()).await;
    env.assert_quiet(&mut stream, "after publishing an empty batch")
        .await;
    let one = numbered(&topic, 0, 1);
    env.publish(&*publisher, &topic, one.clone()).await;
    let got = env
        .receive_acking(&mut stream, 1, "a message after an empty publish")
        .await;
    assert_exactly(&got, &one, "a message after an empty publish");
    Verdict::Passed
}

/// Rule: a subscription receives only its topic's messages, also when one topic's name is a
/// prefix of another's.
pub async fn topics_are_isolated(fixture: Arc<dyn PubSubFixture>) -> Verdict {
    let env = Env::new(fixture);
    let short = unique_name("isolated");
    let long = format!("{short}_more");
    let (_s1, mut short_stream) = env.subscription(None, &short).await;
    let (_s2, mut long_stream) = env.subscription(None, &long).await;
    let publisher = env.publisher().await;
    let to_long = numbered(&long, 0, 3);
    let to_short = numbered(&short, 0, 2);
    env.publish(&*publisher, &long, to_long.clone()).await;
    env.publish(&*publisher, &short, to_short.clone()).await;

    let got_short = env
        .receive_acking(&mut short_stream, to_short.len(), "the shorter topic")
        .await;
    assert_exactly(&got_short, &to_short, "the shorter topic");
    let got_long = env
        .receive_acking(&mut long_stream, to_long.len(), "the longer topic")
        .await;
    assert_exactly(&got_long, &to_long, "the longer topic");
    env.assert_quiet(
        &mut short_stream,
        "the shorter topic gets nothing of the longer one",
    )
    .await;
    env.assert_quiet(
        &mut long_stream,
        "the longer topic gets nothing of the shorter one",
    )
    .await;
    Verdict::Passed
}

/// Rule (`ordering`): messages one publisher publishes to one topic, in single publishes and in
/// batches, reach a subscription that acks each in turn in publish order.
pub async fn ordering_follows_publish_order(fixture: Arc<dyn PubSubFixture>) -> Verdict {
    let env = Env::new(fixture);
    require!(env, ordering);
    let topic = unique_name("ordering");
    let (_subscriber, mut stream) = env.subscription(None, &topic).await;
    let publisher = env.publisher().await;
    let sent = numbered(&topic, 0, 100);
    publish_in_chunks(&env, &*publisher, &topic, &sent[..10], 1).await;
    env.publish(&*publisher, &topic, sent[10..60].to_vec())
        .await;
    publish_in_chunks(&env, &*publisher, &topic, &sent[60..70], 1).await;
    publish_in_chunks(&env, &*publisher, &topic, &sent[70..], 10).await;

    let got = env
        .receive_acking(&mut stream, sent.len(), "ordered messages")
        .await;
    assert_in_order(&got, &sent, "ordering");
    assert_exactly(&got, &sent, "ordering");
    env.assert_quiet(&mut stream, "ordering, after everything arrived")
        .await;
    Verdict::Passed
}

/// Rule: several publishers publishing to one topic at once lose nothing; with `ordering`, each
/// publisher's messages stay in its publish order.
pub async fn concurrent_publishers_lose_nothing(fixture: Arc<dyn PubSubFixture>) -> Verdict {
    const PUBLISHERS: usize = 8;
    const EACH: usize = 25;
    let env = Env::new(fixture);
    let topic = unique_name("concurrent_publishers");
    let (_subscriber, stream) = env.subscription(None, &topic).await;
    let consumer = AckingConsumer::spawn(stream);

    let mut runs: Vec<(Arc<dyn Publisher>, Vec<Message>)> = Vec::new();
    for p in 0..PUBLISHERS {
        let run = format!("{topic}_p{p}");
        runs.push((env.publisher().await, numbered(&run, 0, EACH)));
    }
    join_all(runs.iter().map(|(publisher, messages)| {
        let (env, topic) = (&env, &topic);
        async move {
            for message in messages {
                env.publish(&**publisher, topic, vec![message.clone()])
                    .await;
            }
        }
    }))
    .await;

    let all: Vec<Message> = runs.iter().flat_map(|(_, m)| m.iter().cloned()).collect();
    let complete = wait_for_total(&[&consumer], all.len(), env.timeout()).await;
    tokio::time::sleep(env.quiet()).await;
    assert_no_errors(&[&consumer], "concurrent publishers");
    let received = consumer.received();
    assert!(
        complete,
        "concurrent publishers: {} of {} messages arrived",
        received.len(),
        all.len()
    );
    assert_exactly(&received, &all, "concurrent publishers");
    if env.features().ordering {
        for (_, sent) in &runs {
            let run = sent[0].metadata.get(RUN_KEY);
            let of_run: Vec<Message> = received
                .iter()
                .filter(|m| m.metadata.get(RUN_KEY) == run)
                .cloned()
                .collect();
            assert_in_order(&of_run, sent, "one of several concurrent publishers");
        }
    }
    Verdict::Passed
}

/// Rule: while nothing fails, an acked message is not delivered again.
pub async fn acked_message_is_not_redelivered(fixture: Arc<dyn PubSubFixture>) -> Verdict {
    let env = Env::new(fixture);
    let topic = unique_name("acked_stays_acked");
    let (_subscriber, mut stream) = env.subscription(None, &topic).await;
    let publisher = env.publisher().await;
    let sent = numbered(&topic, 0, 10);
    env.publish(&*publisher, &topic, sent.clone()).await;
    let got = env.receive(&mut stream, sent.len(), "acked messages").await;
    assert_exactly(&got, &sent, "acked messages");
    // Some processing time before the acks.
    tokio::time::sleep(env.quiet() / 2).await;
    for message in &got {
        ack(message, "acked messages");
    }
    env.assert_quiet_for(
        &mut stream,
        env.quiet() * 2,
        "acked messages must not be delivered again",
    )
    .await;
    Verdict::Passed
}

/// Rule (`exactly_once`): with every delivery acked, no message reaches a group twice, also when
/// a member leaves mid-stream and its share moves to another member, and when a new member
/// joins afterwards.
pub async fn no_duplicates_when_everything_is_acked(fixture: Arc<dyn PubSubFixture>) -> Verdict {
    const COUNT: usize = 300;
    let env = Env::new(fixture);
    require!(env, exactly_once);
    let topic = unique_name("exactly_once");
    let publisher = env.publisher().await;
    let sent = numbered(&topic, 0, COUNT);

    if !env.features().consumer_groups {
        let (_subscriber, stream) = env.subscription(None, &topic).await;
        let consumer = AckingConsumer::spawn(stream);
        publish_in_chunks(&env, &*publisher, &topic, &sent, 30).await;
        wait_for_total(&[&consumer], COUNT, env.timeout()).await;
        tokio::time::sleep(env.quiet() * 2).await;
        assert_no_errors(&[&consumer], "exactly once");
        assert_exactly(&consumer.received(), &sent, "exactly once");
        return Verdict::Passed;
    }

    let group = unique_name("exactly_once_group");
    let (_a_subscriber, a_stream) = env.subscription(Some(&group), &topic).await;
    let (_b_subscriber, b_stream) = env.subscription(Some(&group), &topic).await;
    let a = AckingConsumer::spawn(a_stream);
    let b = AckingConsumer::spawn(b_stream);
    publish_in_chunks(&env, &*publisher, &topic, &sent[..COUNT / 2], 30).await;
    wait_for_total(&[&a, &b], COUNT / 3, env.timeout()).await;
    assert_no_errors(&[&a, &b], "exactly once");
    // Member A leaves with part of the stream behind it.
    let from_a = a.stop().await;
    publish_in_chunks(&env, &*publisher, &topic, &sent[COUNT / 2..], 30).await;
    let complete = wait_for_total(&[&b], COUNT.saturating_sub(from_a.len()), env.timeout()).await;
    // A member joining now must get nothing: everything is acked.
    let (_c_subscriber, c_stream) = env.subscription(Some(&group), &topic).await;
    let c = AckingConsumer::spawn(c_stream);
    tokio::time::sleep(env.quiet() * 2).await;
    assert_no_errors(&[&b, &c], "exactly once");
    let from_b = b.received();
    let from_c = c.received();
    let duplicates = duplicate_ids(&[&from_a, &from_b, &from_c]);
    assert!(
        duplicates.is_empty(),
        "exactly once: {} messages reached the group twice (first: {:?})",
        duplicates.len(),
        duplicates.first()
    );
    let all: Vec<Message> = [from_a, from_b, from_c].concat();
    assert!(
        complete,
        "exactly once: the group received {} of {COUNT} messages",
        all.len()
    );
    assert_exactly(&all, &sent, "exactly once across a handover");
    Verdict::Passed
}

/// Rule (`redelivery_on_nack`): a nacked message is delivered again, with the same id, metadata
/// and payload, on a fresh pending delivery; again after a second nack.
pub async fn nack_redelivers_the_same_message(fixture: Arc<dyn PubSubFixture>) -> Verdict {
    let env = Env::new(fixture);
    require!(env, redelivery_on_nack);
    let topic = unique_name("nack");
    let (_subscriber, mut stream) = env.subscription(None, &topic).await;
    let publisher = env.publisher().await;
    let sent = numbered(&topic, 0, 1);
    env.publish(&*publisher, &topic, sent.clone()).await;

    let mut delivery = env.next(&mut stream, "the message to nack").await;
    assert_exactly(std::slice::from_ref(&delivery), &sent, "before the nack");
    for round in 1..=2 {
        assert!(
            delivery.nack(),
            "nack {round}: the delivery was already settled"
        );
        assert_eq!(delivery.outcome(), Some(Outcome::Nacked { delay: None }));
        let again = env
            .next(&mut stream, &format!("redelivery after nack {round}"))
            .await;
        assert!(
            again.same_content(&sent[0]),
            "redelivery after nack {round}: a different message arrived: {again:?}"
        );
        assert!(
            again.has_delivery() && again.outcome().is_none(),
            "redelivery after nack {round}: not a fresh pending delivery ({:?})",
            again.outcome()
        );
        delivery = again;
    }
    ack(&delivery, "the redelivered message");
    env.assert_quiet(&mut stream, "after acking the redelivered message")
        .await;
    Verdict::Passed
}

/// Rule (`redelivery_on_nack`): `nack_with_delay(d)` redelivers no sooner than `d` after the
/// nack (within timer slack), and does redeliver.
pub async fn nack_with_delay_redelivers_no_sooner(fixture: Arc<dyn PubSubFixture>) -> Verdict {
    let env = Env::new(fixture);
    require!(env, redelivery_on_nack);
    let delay = env.scaled(Duration::from_millis(300));
    let slack = (delay / 20).max(Duration::from_millis(10));
    let topic = unique_name("nack_delay");
    let (_subscriber, mut stream) = env.subscription(None, &topic).await;
    let publisher = env.publisher().await;
    let sent = numbered(&topic, 0, 1);
    env.publish(&*publisher, &topic, sent.clone()).await;

    let first = env
        .next(&mut stream, "the message to nack with a delay")
        .await;
    let nacked_at = Instant::now();
    assert!(first.nack_with_delay(delay));
    let again = match tokio::time::timeout(delay + env.timeout(), stream.next()).await {
        Ok(Some(Ok(message))) => message,
        other => panic!(
            "nack with delay: no redelivery within {:?} after a nack with a delay of {delay:?} \
             ({other:?})",
            delay + env.timeout()
        ),
    };
    let elapsed = nacked_at.elapsed();
    assert!(
        elapsed + slack >= delay,
        "nack with delay: redelivered after {elapsed:?}, sooner than the delay of {delay:?}"
    );
    assert!(
        again.same_content(&sent[0]),
        "nack with delay: a different message arrived: {again:?}"
    );
    ack(&again, "the delayed redelivery");
    env.assert_quiet(&mut stream, "after acking the delayed redelivery")
        .await;
    Verdict::Passed
}

/// Rule: the first settlement wins. Ack then nack: acked, never delivered again. With
/// `redelivery_on_nack`, nack then ack: nacked, delivered again.
pub async fn first_settlement_wins(fixture: Arc<dyn PubSubFixture>) -> Verdict {
    let env = Env::new(fixture);
    let topic = unique_name("first_wins");
    let (_subscriber, mut stream) = env.subscription(None, &topic).await;
    let publisher = env.publisher().await;
    let sent = numbered(&topic, 0, 2);
    let (acked_id, nacked_id) = (sent[0].id.clone(), sent[1].id.clone());
    env.publish(&*publisher, &topic, sent.clone()).await;
    let got = env.receive(&mut stream, 2, "first settlement wins").await;
    assert_exactly(&got, &sent, "first settlement wins");
    let acked = got.iter().find(|m| m.id == acked_id);
    let nacked = got.iter().find(|m| m.id == nacked_id);
    let (Some(acked), Some(nacked)) = (acked, nacked) else {
        unreachable!("assert_exactly checked that both messages arrived");
    };

    assert!(acked.ack(), "the first ack settles");
    let copy = acked.clone();
    assert!(!copy.nack(), "a nack after an ack has no effect");
    assert!(!acked.nack_with_delay(Duration::from_millis(1)));
    assert!(!acked.ack(), "a second ack has no effect");
    assert_eq!(acked.outcome(), Some(Outcome::Acked));

    if env.features().redelivery_on_nack {
        assert!(nacked.nack(), "the first nack settles");
        assert!(!nacked.ack(), "an ack after a nack has no effect");
        assert_eq!(nacked.outcome(), Some(Outcome::Nacked { delay: None }));
        let again = env
            .next(
                &mut stream,
                "the nacked-then-acked message, delivered again",
            )
            .await;
        assert_eq!(
            again.id, nacked_id,
            "first settlement wins: the acked-then-nacked message was delivered again"
        );
        ack(&again, "the redelivered message");
    } else {
        ack(nacked, "the second message");
    }
    env.assert_quiet(
        &mut stream,
        "first settlement wins: the acked-then-nacked message must not come again",
    )
    .await;
    Verdict::Passed
}

/// Rule (`redelivery_on_nack`): a delivery dropped unsettled (the message and every clone
/// dropped) counts as a nack: the message is delivered again. A clone keeps it pending.
pub async fn dropped_delivery_is_redelivered(fixture: Arc<dyn PubSubFixture>) -> Verdict {
    let env = Env::new(fixture);
    require!(env, redelivery_on_nack);
    let topic = unique_name("dropped");
    let (_subscriber, mut stream) = env.subscription(None, &topic).await;
    let publisher = env.publisher().await;
    let sent = numbered(&topic, 0, 1);
    env.publish(&*publisher, &topic, sent.clone()).await;

    let message = env.next(&mut stream, "the message to drop").await;
    let clone = message.clone();
    drop(message);
    env.assert_quiet(
        &mut stream,
        "a clone still holds the delivery: nothing is redelivered yet",
    )
    .await;
    drop(clone);
    let again = env
        .next(&mut stream, "redelivery of a dropped delivery")
        .await;
    assert!(
        again.same_content(&sent[0]),
        "dropped delivery: a different message arrived: {again:?}"
    );
    ack(&again, "the redelivered message");
    env.assert_quiet(&mut stream, "after acking the redelivered message")
        .await;
    Verdict::Passed
}

/// Rule (`persistent`): messages published before anyone subscribed reach a later subscription.
pub async fn late_subscriber_receives_retained_messages(
    fixture: Arc<dyn PubSubFixture>,
) -> Verdict {
    let env = Env::new(fixture);
    require!(env, persistent);
    let topic = unique_name("retained");
    let publisher = env.publisher().await;
    let sent = numbered(&topic, 0, 5);
    env.publish(&*publisher, &topic, sent.clone()).await;

    let (_subscriber, mut stream) = env.subscription(None, &topic).await;
    let got = env
        .receive_acking(&mut stream, sent.len(), "a late subscriber")
        .await;
    assert_exactly(&got, &sent, "a late subscriber");
    if env.features().ordering {
        assert_in_order(&got, &sent, "a late subscriber (ordering declared)");
    }
    env.assert_quiet(
        &mut stream,
        "a late subscriber, after the retained messages",
    )
    .await;
    Verdict::Passed
}

/// Rule (`consumer_groups`, `durable_groups`): a named group whose only member closed resumes
/// with its next member: the messages it acked stay handled, the ones left unsettled and the
/// ones published while it was offline arrive.
pub async fn group_resumes_where_it_left_off(fixture: Arc<dyn PubSubFixture>) -> Verdict {
    let env = Env::new(fixture);
    require!(env, consumer_groups, durable_groups);
    let topic = unique_name("resume");
    let group = unique_name("resume_group");
    let (first_subscriber, mut first_stream) = env.subscription(Some(&group), &topic).await;
    let publisher = env.publisher().await;
    let before = numbered(&topic, 0, 10);
    env.publish(&*publisher, &topic, before.clone()).await;

    let got = env
        .receive(&mut first_stream, 6, "the group's first member")
        .await;
    let acked: HashSet<MessageId> = got[..4].iter().map(|m| m.id.clone()).collect();
    for message in &got[..4] {
        ack(message, "the group's first member");
    }
    drop(got); // The other two go back unsettled.
    env.close_subscriber(&*first_subscriber).await;
    drop(env.until_end(&mut first_stream, "the closed member").await);
    drop(first_stream);

    let offline = numbered(&topic, 10, 5);
    env.publish(&*publisher, &topic, offline.clone()).await;

    let (_second_subscriber, mut second_stream) = env.subscription(Some(&group), &topic).await;
    let expected: Vec<Message> = before
        .iter()
        .chain(&offline)
        .filter(|m| !acked.contains(&m.id))
        .cloned()
        .collect();
    receive_expected(
        &env,
        &mut second_stream,
        &expected,
        &acked,
        "the group's next member",
    )
    .await;
    env.assert_quiet(
        &mut second_stream,
        "the group's next member, after the rest",
    )
    .await;
    Verdict::Passed
}

/// Rule (`consumer_groups`): two members of one group together receive every message, none of
/// them twice (each message goes to one member).
pub async fn group_members_share_messages_without_duplicates(
    fixture: Arc<dyn PubSubFixture>,
) -> Verdict {
    const COUNT: usize = 200;
    let env = Env::new(fixture);
    require!(env, consumer_groups);
    let topic = unique_name("group_share");
    let group = unique_name("share_group");
    let (_a_subscriber, a_stream) = env.subscription(Some(&group), &topic).await;
    let (_b_subscriber, b_stream) = env.subscription(Some(&group), &topic).await;
    let a = AckingConsumer::spawn(a_stream);
    let b = AckingConsumer::spawn(b_stream);
    let publisher = env.publisher().await;
    let sent = numbered(&topic, 0, COUNT);
    publish_in_chunks(&env, &*publisher, &topic, &sent, 20).await;

    let complete = wait_for_total(&[&a, &b], COUNT, env.timeout()).await;
    tokio::time::sleep(env.quiet()).await;
    assert_no_errors(&[&a, &b], "group members");
    let (from_a, from_b) = (a.received(), b.received());
    let duplicates = duplicate_ids(&[&from_a, &from_b]);
    assert!(
        duplicates.is_empty(),
        "group members: {} messages were delivered to both members or twice (first: {:?})",
        duplicates.len(),
        duplicates.first()
    );
    assert!(
        complete,
        "group members: together they received {} of {COUNT} messages",
        from_a.len() + from_b.len()
    );
    assert_exactly(&[from_a, from_b].concat(), &sent, "group members together");
    Verdict::Passed
}

/// Rule (`consumer_groups`): distinct groups each receive every message.
pub async fn each_group_receives_every_message(fixture: Arc<dyn PubSubFixture>) -> Verdict {
    let env = Env::new(fixture);
    require!(env, consumer_groups);
    let topic = unique_name("two_groups");
    let (g1, g2) = (unique_name("group_one"), unique_name("group_two"));
    let (_s1, mut one) = env.subscription(Some(&g1), &topic).await;
    let (_s2, mut two) = env.subscription(Some(&g2), &topic).await;
    let publisher = env.publisher().await;
    let sent = numbered(&topic, 0, 50);
    publish_in_chunks(&env, &*publisher, &topic, &sent, 10).await;
    for (stream, name) in [
        (&mut one, "the first group"),
        (&mut two, "the second group"),
    ] {
        let got = env.receive_acking(stream, sent.len(), name).await;
        assert_exactly(&got, &sent, name);
    }
    env.assert_quiet(&mut one, "the first group, after everything")
        .await;
    env.assert_quiet(&mut two, "the second group, after everything")
        .await;
    Verdict::Passed
}

/// Rule (`fan_out`): two subscribers without a group each receive every message.
pub async fn plain_subscribers_each_receive_every_message(
    fixture: Arc<dyn PubSubFixture>,
) -> Verdict {
    let env = Env::new(fixture);
    require!(env, fan_out);
    let topic = unique_name("fan_out");
    let (_s1, mut one) = env.subscription(None, &topic).await;
    let (_s2, mut two) = env.subscription(None, &topic).await;
    let publisher = env.publisher().await;
    let sent = numbered(&topic, 0, 50);
    publish_in_chunks(&env, &*publisher, &topic, &sent, 10).await;
    for (stream, name) in [
        (&mut one, "the first subscriber"),
        (&mut two, "the second subscriber"),
    ] {
        let got = env.receive_acking(stream, sent.len(), name).await;
        assert_exactly(&got, &sent, name);
    }
    env.assert_quiet(&mut one, "the first subscriber, after everything")
        .await;
    env.assert_quiet(&mut two, "the second subscriber, after everything")
        .await;
    Verdict::Passed
}

/// Rule (`fan_out` or `consumer_groups`): a subscription nobody reads does not hold back another
/// subscription of the topic, and loses nothing meanwhile.
pub async fn stalled_subscription_does_not_block_others(
    fixture: Arc<dyn PubSubFixture>,
) -> Verdict {
    let env = Env::new(fixture);
    let features = env.features();
    if !features.fan_out && !features.consumer_groups {
        return Verdict::Skipped {
            missing: "fan_out or consumer_groups",
        };
    }
    let topic = unique_name("stalled");
    let (stalled_group, active_group) = if features.consumer_groups {
        (
            Some(unique_name("stalled_group")),
            Some(unique_name("active_group")),
        )
    } else {
        (None, None)
    };
    let (_s1, mut stalled) = env.subscription(stalled_group.as_deref(), &topic).await;
    let (_s2, mut active) = env.subscription(active_group.as_deref(), &topic).await;
    let publisher = env.publisher().await;
    let sent = numbered(&topic, 0, 20);
    publish_in_chunks(&env, &*publisher, &topic, &sent, 1).await;

    let got = env
        .receive_acking(&mut active, sent.len(), "the active subscription")
        .await;
    assert_exactly(&got, &sent, "the active subscription");
    let got = env
        .receive_acking(
            &mut stalled,
            sent.len(),
            "the stalled subscription, read late",
        )
        .await;
    assert_exactly(&got, &sent, "the stalled subscription, read late");
    env.assert_quiet(&mut stalled, "the stalled subscription, after everything")
        .await;
    Verdict::Passed
}

/// Rule (`concurrent_subscribe`): 16 subscribes started at once (half on one shared subscriber,
/// each to its own topic; half to one common topic, each in its own group or fan-out) all
/// succeed and all receive.
pub async fn concurrent_subscribes_all_receive(fixture: Arc<dyn PubSubFixture>) -> Verdict {
    const TASKS: usize = 16;
    let env = Env::new(fixture);
    require!(env, concurrent_subscribe);
    let features = env.features();
    let independent = features.fan_out || features.consumer_groups;
    let common_topic = unique_name("concurrent_common");
    let shared_subscriber = env.subscriber(None).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
    let mut tasks = Vec::new();
    for i in 0..TASKS {
        let (topic, subscriber) = if independent && i % 2 == 0 {
            let group = features
                .consumer_groups
                .then(|| unique_name(&format!("concurrent_group_{i}")));
            (common_topic.clone(), env.subscriber(group.as_deref()).await)
        } else {
            (
                unique_name(&format!("concurrent_{i}")),
                shared_subscriber.clone(),
            )
        };
        let barrier = barrier.clone();
        let timeout = env.timeout();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let result = tokio::time::timeout(timeout, subscriber.subscribe(&topic)).await;
            (topic, subscriber, result)
        }));
    }
    let mut subscriptions: Vec<(String, Arc<dyn Subscriber>, MessageStream)> = Vec::new();
    for task in join_all(tasks).await {
        match task {
            Ok((topic, subscriber, Ok(Ok(stream)))) => {
                subscriptions.push((topic, subscriber, stream))
            }
            Ok((topic, _, Ok(Err(error)))) => {
                panic!("concurrent subscribe to {topic} failed: {error}")
            }
            Ok((topic, _, Err(_))) => panic!(
                "concurrent subscribe to {topic} did not return within {:?}",
                env.timeout()
            ),
            Err(error) => panic!("a concurrent subscribe task failed: {error}"),
        }
    }

    let publisher = env.publisher().await;
    let common = numbered(&common_topic, 0, 3);
    env.publish(&*publisher, &common_topic, common.clone())
        .await;
    let mut expected = Vec::new();
    let topics: Vec<String> = subscriptions.iter().map(|(t, _, _)| t.clone()).collect();
    for topic in &topics {
        if *topic == common_topic {
            expected.push(common.clone());
        } else {
            let own = numbered(topic, 0, 2);
            env.publish(&*publisher, topic, own.clone()).await;
            expected.push(own);
        }
    }
    join_all(
        subscriptions
            .iter_mut()
            .zip(&expected)
            .map(|((topic, _, stream), expected)| {
                let env = &env;
                async move {
                    let what = format!("a concurrent subscription to {topic}");
                    let got = env.receive_acking(stream, expected.len(), &what).await;
                    assert_exactly(&got, expected, &what);
                    env.assert_quiet(stream, &what).await;
                }
            }),
    )
    .await;
    Verdict::Passed
}

/// Rule (`close_while_in_flight`, `consumer_groups`): closing a subscriber while it holds
/// unsettled messages (and has more buffered) ends its streams and loses nothing: another
/// member of the group receives every message the closed one did not ack.
pub async fn close_with_messages_in_flight_loses_nothing(
    fixture: Arc<dyn PubSubFixture>,
) -> Verdict {
    let env = Env::new(fixture);
    require!(env, close_while_in_flight, consumer_groups);
    let topic = unique_name("close_in_flight");
    let group = unique_name("close_group");
    let (closing, mut closing_stream) = env.subscription(Some(&group), &topic).await;
    let publisher = env.publisher().await;
    let sent = numbered(&topic, 0, 10);
    env.publish(&*publisher, &topic, sent.clone()).await;

    let got = env
        .receive(&mut closing_stream, 5, "the member about to close")
        .await;
    let acked: HashSet<MessageId> = got[..2].iter().map(|m| m.id.clone()).collect();
    for message in &got[..2] {
        ack(message, "the member about to close");
    }
    let held: Vec<Message> = got[2..].to_vec();
    drop(got);

    let (_successor, mut successor_stream) = env.subscription(Some(&group), &topic).await;
    env.close_subscriber(&*closing).await;
    // The closed member's stream ends; whatever it still yields is dropped unsettled.
    drop(
        env.until_end(&mut closing_stream, "the closed member's stream")
            .await,
    );
    drop(held);
    drop(closing_stream);

    let expected: Vec<Message> = sent
        .iter()
        .filter(|m| !acked.contains(&m.id))
        .cloned()
        .collect();
    receive_expected(
        &env,
        &mut successor_stream,
        &expected,
        &acked,
        "the successor after a close with messages in flight",
    )
    .await;
    env.assert_quiet(&mut successor_stream, "the successor, after the rest")
        .await;
    Verdict::Passed
}

/// Rule: closing a subscriber ends its streams; it then refuses `subscribe` with
/// `SubscribeError::Closed`; closing again succeeds; other subscribers are unaffected.
pub async fn subscriber_close_ends_streams_and_refuses_subscribe(
    fixture: Arc<dyn PubSubFixture>,
) -> Verdict {
    let env = Env::new(fixture);
    let (t1, t2) = (unique_name("close_one"), unique_name("close_two"));
    let subscriber = env.subscriber(None).await;
    let mut s1 = env.subscribe(&*subscriber, &t1).await;
    let mut s2 = env.subscribe(&*subscriber, &t2).await;
    let (_other, mut other_stream) = env.subscription(None, &t1).await;

    env.close_subscriber(&*subscriber).await;
    for (stream, topic) in [(&mut s1, &t1), (&mut s2, &t2)] {
        let yielded = env
            .until_end(
                stream,
                &format!("the closed subscriber's stream of {topic}"),
            )
            .await;
        assert!(
            yielded.is_empty(),
            "a stream of a closed subscriber yielded {} messages nobody published",
            yielded.len()
        );
    }
    match tokio::time::timeout(env.timeout(), subscriber.subscribe(&t1)).await {
        Ok(Err(SubscribeError::Closed)) => {}
        Ok(Err(other)) => panic!("subscribe after close: expected Closed, got {other}"),
        Ok(Ok(_)) => panic!("subscribe after close: expected Closed, but it succeeded"),
        Err(_) => panic!("subscribe after close did not return"),
    }
    env.close_subscriber(&*subscriber).await;

    let publisher = env.publisher().await;
    let sent = numbered(&t1, 0, 1);
    env.publish(&*publisher, &t1, sent.clone()).await;
    let got = env
        .receive_acking(&mut other_stream, 1, "another subscriber, after one closed")
        .await;
    assert_exactly(&got, &sent, "another subscriber, after one closed");
    Verdict::Passed
}

/// Rule: what a publisher published before `close` is delivered; after `close` it refuses to
/// publish with `PublishError::Closed`; closing again succeeds; other publishers keep working.
pub async fn publisher_close_flushes_and_refuses_publish(
    fixture: Arc<dyn PubSubFixture>,
) -> Verdict {
    let env = Env::new(fixture);
    let topic = unique_name("publisher_close");
    let (_subscriber, mut stream) = env.subscription(None, &topic).await;
    let publisher = env.publisher().await;
    let sent = numbered(&topic, 0, 3);
    env.publish(&*publisher, &topic, sent.clone()).await;
    env.close_publisher(&*publisher).await;
    env.close_publisher(&*publisher).await;
    let refused = numbered(&topic, 3, 1);
    match tokio::time::timeout(env.timeout(), publisher.publish(&topic, refused)).await {
        Ok(Err(PublishError::Closed)) => {}
        Ok(Err(other)) => panic!("publish after close: expected Closed, got {other}"),
        Ok(Ok(())) => panic!("publish after close: expected Closed, but it succeeded"),
        Err(_) => panic!("publish after close did not return"),
    }
    let got = env
        .receive_acking(&mut stream, sent.len(), "messages published before close")
        .await;
    assert_exactly(&got, &sent, "messages published before close");
    env.assert_quiet(
        &mut stream,
        "the message refused after close must not arrive",
    )
    .await;

    let other = env.publisher().await;
    let later = numbered(&topic, 4, 1);
    env.publish(&*other, &topic, later.clone()).await;
    let got = env
        .receive_acking(&mut stream, 1, "another publisher, after one closed")
        .await;
    assert_exactly(&got, &later, "another publisher, after one closed");
    Verdict::Passed
}

/// Rule: topics `check_topic` refuses (empty, control characters, over 255 bytes) are refused
/// by publish and subscribe with `InvalidTopic`, promptly; the publisher and subscriber stay
/// usable.
pub async fn invalid_topics_are_refused(fixture: Arc<dyn PubSubFixture>) -> Verdict {
    let env = Env::new(fixture);
    let publisher = env.publisher().await;
    let subscriber = env.subscriber(None).await;
    let too_long = "t".repeat(crate::pubsub::TOPIC_BYTES_MAX + 1);
    for bad in [
        "",
        "line\nbreak",
        "tab\there",
        "nul\u{0}byte",
        "del\u{7f}",
        &too_long,
    ] {
        let shown = bad.escape_debug().to_string();
        let shown: String = shown.chars().take(40).collect();
        match tokio::time::timeout(
            env.timeout(),
            publisher.publish(bad, vec![Message::new("x")]),
        )
        .await
        {
            Ok(Err(PublishError::InvalidTopic(_))) => {}
            Ok(Err(other)) => panic!("publish to {shown:?}: expected InvalidTopic, got {other}"),
            Ok(Ok(())) => panic!("publish to the invalid topic {shown:?} succeeded"),
            Err(_) => panic!("publish to the invalid topic {shown:?} did not return"),
        }
        match tokio::time::timeout(env.timeout(), subscriber.subscribe(bad)).await {
            Ok(Err(SubscribeError::InvalidTopic(_))) => {}
            Ok(Err(other)) => panic!("subscribe to {shown:?}: expected InvalidTopic, got {other}"),
            Ok(Ok(_)) => panic!("subscribe to the invalid topic {shown:?} succeeded"),
            Err(_) => panic!("subscribe to the invalid topic {shown:?} did not return"),
        }
    }
    let topic = unique_name("after_invalid");
    let mut stream = env.subscribe(&*subscriber, &topic).await;
    let sent = numbered(&topic, 0, 1);
    env.publish(&*publisher, &topic, sent.clone()).await;
    let got = env
        .receive_acking(&mut stream, 1, "after refusing invalid topics")
        .await;
    assert_exactly(&got, &sent, "after refusing invalid topics");
    Verdict::Passed
}

/// Rule: 10,000 messages published in batches of 100 while a subscription consumes all arrive,
/// once each (in order, with `ordering`).
pub async fn many_messages_arrive_without_loss(fixture: Arc<dyn PubSubFixture>) -> Verdict {
    const COUNT: usize = 10_000;
    let env = Env::new(fixture);
    let topic = unique_name("many");
    let (_subscriber, stream) = env.subscription(None, &topic).await;
    let consumer = AckingConsumer::spawn(stream);
    let publisher = env.publisher().await;
    let sent = numbered(&topic, 0, COUNT);
    publish_in_chunks(&env, &*publisher, &topic, &sent, 100).await;

    let complete = wait_for_total(&[&consumer], COUNT, env.timeout()).await;
    tokio::time::sleep(env.quiet()).await;
    assert_no_errors(&[&consumer], "many messages");
    let received = consumer.received();
    if !complete {
        let got: HashSet<usize> = seqs(&received).into_iter().collect();
        let missing: Vec<usize> = (0..COUNT)
            .filter(|seq| !got.contains(seq))
            .take(10)
            .collect();
        panic!(
            "many messages: {} of {COUNT} arrived; missing seqs include {missing:?}",
            received.len()
        );
    }
    assert_exactly(&received, &sent, "many messages");
    if env.features().ordering {
        assert_in_order(&received, &sent, "many messages (ordering declared)");
    }
    Verdict::Passed
}

/// Publishes, retrying transport errors (with the same message ids) until the timeout: right
/// after a broker restart a publish may fail once the connection is found dead.
async fn publish_retrying(env: &Env, publisher: &dyn Publisher, topic: &str, messages: &[Message]) {
    let deadline = Instant::now() + env.timeout();
    loop {
        let attempt =
            tokio::time::timeout_at(deadline, publisher.publish(topic, messages.to_vec()));
        match attempt.await {
            Ok(Ok(())) => return,
            Ok(Err(_)) if Instant::now() < deadline => {
                tokio::time::sleep(env.scaled(Duration::from_millis(50))).await;
            }
            Ok(Err(error)) => panic!("publishing after a broker restart failed: {error}"),
            Err(_) => panic!(
                "publishing after a broker restart did not succeed within {:?}",
                env.timeout()
            ),
        }
    }
}

/// Rule (`reconnect`): after a broker restart, publishing works again and a subscription either
/// keeps delivering or ends (and a new one receives); the message published after the restart
/// arrives, and so does the one published before it but not yet received, when the broker keeps
/// messages (`persistent`, or `durable_groups` for a group). An acked message may come again only
/// without `exactly_once`.
pub async fn reconnect_after_broker_restart_loses_nothing(
    fixture: Arc<dyn PubSubFixture>,
) -> Verdict {
    let env = Env::new(fixture);
    require!(env, reconnect);
    let features = env.features();
    let topic = unique_name("reconnect");
    let group = features
        .consumer_groups
        .then(|| unique_name("reconnect_group"));
    let keeps_messages = features.persistent || (group.is_some() && features.durable_groups);
    let (subscriber, mut stream) = env.subscription(group.as_deref(), &topic).await;
    let mut subscribers = vec![subscriber];
    let publisher = env.publisher().await;

    let first = numbered(&topic, 0, 1);
    env.publish(&*publisher, &topic, first.clone()).await;
    let got = env
        .receive_acking(&mut stream, 1, "before the restart")
        .await;
    assert_exactly(&got, &first, "before the restart");
    let pending = numbered(&topic, 1, 1);
    env.publish(&*publisher, &topic, pending.clone()).await;

    if let Err(error) = env.fixture().restart_broker().await {
        panic!("restart_broker failed: {error}");
    }

    let after = numbered(&topic, 2, 1);
    publish_retrying(&env, &*publisher, &topic, &after).await;
    let mut wanted: Vec<MessageId> = vec![after[0].id.clone()];
    if keeps_messages {
        wanted.push(pending[0].id.clone());
    }
    let mut known: HashSet<MessageId> = [&pending[0], &after[0]]
        .into_iter()
        .map(|m| m.id.clone())
        .collect();
    let mut seen: HashSet<MessageId> = HashSet::new();
    let mut resubscribed = false;
    let mut items = 0usize;
    while !wanted.iter().all(|id| seen.contains(id)) {
        items += 1;
        assert!(
            items <= 1_000,
            "after the restart: 1,000 deliveries without the expected messages: a redelivery loop"
        );
        match tokio::time::timeout(env.timeout(), stream.next()).await {
            Ok(Some(Ok(message))) => {
                ack(&message, "after the restart");
                if message.id == first[0].id {
                    assert!(
                        !features.exactly_once,
                        "after the restart: the acked message {} came again, and the adapter \
                         declares exactly_once",
                        message.id
                    );
                    continue;
                }
                assert!(
                    known.contains(&message.id),
                    "after the restart: unexpected message {} ({:?})",
                    message.id,
                    message.metadata
                );
                assert!(
                    seen.insert(message.id.clone()) || !features.exactly_once,
                    "after the restart: message {} arrived twice, and the adapter declares \
                     exactly_once",
                    message.id
                );
            }
            Ok(Some(Err(_))) => {} // A transient error; the stream may go on.
            Ok(None) if !resubscribed => {
                // The subscription ended with the connection: subscribe again. What was
                // published before the new subscription reaches it only where kept.
                resubscribed = true;
                let (subscriber, again) = env.subscription(group.as_deref(), &topic).await;
                subscribers.push(subscriber);
                stream = again;
                if !keeps_messages {
                    wanted.retain(|id| *id != after[0].id);
                }
                let fresh = numbered(&topic, 3, 1);
                publish_retrying(&env, &*publisher, &topic, &fresh).await;
                wanted.push(fresh[0].id.clone());
                known.insert(fresh[0].id.clone());
            }
            Ok(None) => panic!("after the restart: the new subscription ended too"),
            Err(_) => panic!(
                "after the restart: the subscription went silent: within {:?} it neither \
                 delivered {:?} nor ended",
                env.timeout(),
                wanted
                    .iter()
                    .filter(|id| !seen.contains(*id))
                    .collect::<Vec<_>>()
            ),
        }
    }
    env.assert_quiet(&mut stream, "after the restart, once everything arrived")
        .await;
    drop(subscribers);
    Verdict::Passed
}
