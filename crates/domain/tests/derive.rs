//! `#[derive(DomainEvent)]`: names, versions, encoding and decoding.
// Test helpers outside #[test] functions panic on failure, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use factline_core::{
    ContentType, EventData, Metadata, Position, RecordedEvent, Revision, StreamId, Timestamp,
};
use factline_domain::{DecodeError, DomainEvent};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Payment {
    amount_cents: u64,
    method: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[serde(deny_unknown_fields)]
enum OrderEvent {
    OrderPlaced {
        #[serde(rename = "customer")]
        customer_id: String,
        total_cents: u64,
        #[serde(default)]
        note: Option<String>,
    },
    #[event(version = 3)]
    PaymentReceived(Payment),
    OrderShipped,
    #[event(name = "OrderCancelled", version = 2)]
    OrderCanceled {
        reason: String,
    },
}

fn placed() -> OrderEvent {
    OrderEvent::OrderPlaced {
        customer_id: "c-7".into(),
        total_cents: 2_500,
        note: None,
    }
}

fn paid() -> OrderEvent {
    OrderEvent::PaymentReceived(Payment {
        amount_cents: 2_500,
        method: "card".into(),
    })
}

fn canceled() -> OrderEvent {
    OrderEvent::OrderCanceled {
        reason: "changed my mind".into(),
    }
}

fn all_events() -> Vec<OrderEvent> {
    vec![placed(), paid(), OrderEvent::OrderShipped, canceled()]
}

#[test]
fn event_types_default_to_the_variant_name_and_can_be_overridden() {
    let names: Vec<&str> = all_events().iter().map(DomainEvent::event_type).collect();
    assert_eq!(
        names,
        [
            "OrderPlaced",
            "PaymentReceived",
            "OrderShipped",
            "OrderCancelled"
        ]
    );
    assert_eq!(
        OrderEvent::event_types(),
        [
            "OrderPlaced",
            "PaymentReceived",
            "OrderShipped",
            "OrderCancelled"
        ]
    );
    let versions: Vec<u32> = all_events()
        .iter()
        .map(DomainEvent::schema_version)
        .collect();
    assert_eq!(versions, [1, 3, 1, 2]);
}

#[test]
fn encoding_keeps_only_the_variant_data() {
    assert_eq!(
        placed().encode().unwrap(),
        json!({"customer": "c-7", "total_cents": 2500, "note": null})
    );
    assert_eq!(
        paid().encode().unwrap(),
        json!({"amount_cents": 2500, "method": "card"})
    );
    assert_eq!(OrderEvent::OrderShipped.encode().unwrap(), Value::Null);
    assert_eq!(
        canceled().encode().unwrap(),
        json!({"reason": "changed my mind"})
    );
}

#[test]
fn every_variant_round_trips() {
    for event in all_events() {
        let data = event.encode().unwrap();
        let decoded = OrderEvent::decode(event.event_type(), event.schema_version(), data).unwrap();
        assert_eq!(decoded, event);
    }
}

#[test]
fn field_level_serde_attributes_apply_to_the_data() {
    let decoded = OrderEvent::decode(
        "OrderPlaced",
        1,
        json!({"customer": "c-1", "total_cents": 100}),
    )
    .unwrap();
    assert_eq!(
        decoded,
        OrderEvent::OrderPlaced {
            customer_id: "c-1".into(),
            total_cents: 100,
            note: None
        }
    );
}

#[test]
fn unknown_event_types_are_reported_by_name() {
    let error = OrderEvent::decode("OrderLost", 1, json!({})).unwrap_err();
    assert_eq!(
        error,
        DecodeError::UnknownEventType {
            event_type: "OrderLost".into()
        }
    );
    assert_eq!(error.event_type(), "OrderLost");
    // The overridden name replaces the variant name: the variant name is not an event type.
    assert!(matches!(
        OrderEvent::decode("OrderCanceled", 1, json!({"reason": "x"})),
        Err(DecodeError::UnknownEventType { .. })
    ));
}

#[test]
fn malformed_data_is_reported_with_type_and_serde_message() {
    let error = OrderEvent::decode("OrderPlaced", 1, json!({"total_cents": 5})).unwrap_err();
    let DecodeError::MalformedData {
        event_type,
        message,
    } = &error
    else {
        panic!("expected MalformedData, got {error:?}");
    };
    assert_eq!(event_type, "OrderPlaced");
    assert!(message.contains("missing field `customer`"), "{message}");
    assert!(error.to_string().contains("OrderPlaced"), "{error}");

    let wrong_type = OrderEvent::decode(
        "PaymentReceived",
        3,
        json!({"amount_cents": "lots", "method": "card"}),
    );
    assert!(
        matches!(wrong_type, Err(DecodeError::MalformedData { ref event_type, .. }) if event_type == "PaymentReceived")
    );

    // A unit variant carries no data.
    assert!(matches!(
        OrderEvent::decode("OrderShipped", 1, json!({"carrier": "x"})),
        Err(DecodeError::MalformedData { .. })
    ));
}

#[test]
fn newer_schema_versions_are_refused_and_older_ones_decoded() {
    assert_eq!(
        OrderEvent::decode("OrderCancelled", 3, json!({"reason": "r"})),
        Err(DecodeError::UnsupportedSchemaVersion {
            event_type: "OrderCancelled".into(),
            found: 3,
            supported: 2
        })
    );
    assert_eq!(
        OrderEvent::decode("OrderCancelled", 1, json!({"reason": "r"})),
        Ok(OrderEvent::OrderCanceled { reason: "r".into() })
    );
}

fn recorded(event: EventData) -> RecordedEvent {
    RecordedEvent::new(
        StreamId::new("order-1").unwrap(),
        Revision(0),
        Position(0),
        Timestamp::now(),
        event,
    )
}

#[test]
fn event_data_carries_type_json_schema_version_and_metadata() {
    let metadata = Metadata::new()
        .with(Metadata::CORRELATION_ID, "corr-1")
        .with(Metadata::SCHEMA_VERSION, "99");
    let data = paid().to_event_data(metadata).unwrap();
    assert_eq!(data.event_type, "PaymentReceived");
    assert_eq!(data.content_type, ContentType::Json);
    assert_eq!(data.id.get_version_num(), 7);
    assert_eq!(data.metadata.correlation_id(), Some("corr-1"));
    assert_eq!(data.metadata.schema_version(), Some(3));
    assert_eq!(
        serde_json::from_slice::<Value>(&data.data).unwrap(),
        json!({"amount_cents": 2500, "method": "card"})
    );

    for event in all_events() {
        let stored = recorded(event.to_event_data(Metadata::new()).unwrap());
        assert_eq!(OrderEvent::from_recorded(&stored).unwrap(), event);
    }
}

#[test]
fn from_recorded_reads_the_schema_version_from_metadata() {
    let v1 = EventData::json("OrderShipped", &Value::Null).unwrap();
    assert_eq!(
        OrderEvent::from_recorded(&recorded(v1.clone())).unwrap(),
        OrderEvent::OrderShipped
    );

    let newer = v1.clone().with_metadata(Metadata::SCHEMA_VERSION, "2");
    assert!(matches!(
        OrderEvent::from_recorded(&recorded(newer)),
        Err(DecodeError::UnsupportedSchemaVersion { found: 2, .. })
    ));

    let garbled = v1.with_metadata(Metadata::SCHEMA_VERSION, "two");
    assert_eq!(
        OrderEvent::from_recorded(&recorded(garbled)),
        Err(DecodeError::InvalidSchemaVersion {
            event_type: "OrderShipped".into(),
            value: "two".into()
        })
    );
}

#[test]
fn from_recorded_refuses_non_json_payloads() {
    let binary = EventData::binary("OrderShipped", &b"\x00\x01"[..]);
    assert!(matches!(
        OrderEvent::from_recorded(&recorded(binary)),
        Err(DecodeError::NotJson { .. })
    ));
    let mut not_json = EventData::json("OrderShipped", &Value::Null).unwrap();
    not_json.data = "{oops".into();
    assert!(matches!(
        OrderEvent::from_recorded(&recorded(not_json)),
        Err(DecodeError::MalformedData { .. })
    ));
}

#[derive(Debug, PartialEq, Serialize, Deserialize, DomainEvent)]
struct UserRegistered {
    email: String,
}

#[derive(Debug, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(name = "user.renamed", version = 2)]
struct UserRenamed(String);

#[test]
fn structs_are_one_event_type() {
    let registered = UserRegistered {
        email: "a@example.com".into(),
    };
    assert_eq!(registered.event_type(), "UserRegistered");
    assert_eq!(registered.schema_version(), 1);
    assert_eq!(UserRegistered::event_types(), ["UserRegistered"]);
    let data = registered.encode().unwrap();
    assert_eq!(data, json!({"email": "a@example.com"}));
    assert_eq!(
        UserRegistered::decode("UserRegistered", 1, data).unwrap(),
        registered
    );
    assert!(matches!(
        UserRegistered::decode("UserRenamed", 1, json!({})),
        Err(DecodeError::UnknownEventType { .. })
    ));

    let renamed = UserRenamed("Ada".into());
    assert_eq!(renamed.event_type(), "user.renamed");
    assert_eq!(renamed.schema_version(), 2);
    assert_eq!(renamed.encode().unwrap(), json!("Ada"));
    assert_eq!(
        UserRenamed::decode("user.renamed", 2, json!("Ada")).unwrap(),
        renamed
    );
}

#[derive(Debug, PartialEq, Serialize, Deserialize, DomainEvent)]
enum Wrapped<T: Send + Sync + 'static> {
    Happened(T),
    Ended,
}

#[test]
fn generic_enums_are_supported() {
    let event = Wrapped::Happened(7u32);
    assert_eq!(event.encode().unwrap(), json!(7));
    assert_eq!(
        Wrapped::<u32>::decode("Happened", 1, json!(7)).unwrap(),
        event
    );
    assert_eq!(
        Wrapped::<u32>::decode("Ended", 1, Value::Null).unwrap(),
        Wrapped::Ended
    );
}
