//! SQL names: schema names the caller gives, and the table name derived from each topic.
//!
//! A topic is any text of 1..=255 bytes without control characters; a PostgreSQL identifier
//! holds at most 63 bytes. So a topic's table is named by a readable prefix plus a hash of the
//! whole topic: `t_{up to 40 of a-z0-9_}_{16 hex digits}`, at most 59 bytes, always a plain
//! lower-case identifier that needs no quoting. Two topics share a table only if their prefixes
//! and the first 64 bits of their SHA-256 agree; the topic registry refuses that collision
//! instead of mixing the topics (see `PgPubSub`).

use sha2::{Digest, Sha256};

/// Longest schema name accepted, in bytes (PostgreSQL's identifier limit).
pub const SCHEMA_NAME_BYTES_MAX: usize = 63;

/// Bytes of the readable part of a topic's table name.
const TABLE_PREFIX_BYTES_MAX: usize = 40;

/// A schema name refused by [`check_schema_name`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid schema name {name:?}: {reason}")]
pub struct InvalidSchemaName {
    /// The name (shortened).
    pub name: String,
    /// What was wrong.
    pub reason: &'static str,
}

/// Checks that `name` is a plain identifier: 1..=63 bytes of `a-z`, `0-9` and `_`, not starting
/// with a digit nor with `pg_` (PostgreSQL reserves those).
pub fn check_schema_name(name: &str) -> Result<(), InvalidSchemaName> {
    let refuse = |reason| {
        Err(InvalidSchemaName {
            name: name.chars().take(64).collect(),
            reason,
        })
    };
    if name.is_empty() || name.len() > SCHEMA_NAME_BYTES_MAX {
        return refuse("a schema name must have 1..=63 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return refuse("a schema name may only hold a-z, 0-9 and _");
    }
    if name.as_bytes()[0].is_ascii_digit() || name.starts_with("pg_") {
        return refuse("a schema name may not start with a digit or pg_");
    }
    Ok(())
}

/// The table that holds `topic`'s messages (see the module documentation).
pub fn table_for_topic(topic: &str) -> String {
    let mut readable = String::with_capacity(TABLE_PREFIX_BYTES_MAX);
    for c in topic.chars() {
        if readable.len() >= TABLE_PREFIX_BYTES_MAX {
            break;
        }
        let c = c.to_ascii_lowercase();
        readable.push(if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '_'
        });
    }
    let digest = Sha256::digest(topic.as_bytes());
    let mut hash = String::with_capacity(16);
    for byte in &digest[..8] {
        hash.push_str(&format!("{byte:02x}"));
    }
    format!("t_{readable}_{hash}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn table_names_are_readable_and_distinct() {
        let name = table_for_topic("Orders.Placed");
        assert!(name.starts_with("t_orders_placed_"), "{name}");
        assert_eq!(name.len(), "t_orders_placed_".len() + 16);
        assert_ne!(table_for_topic("a.b"), table_for_topic("a-b"));
        assert_ne!(table_for_topic("A"), table_for_topic("a"));
    }

    #[test]
    fn schema_names() {
        assert!(check_schema_name("factline").is_ok());
        assert!(check_schema_name("f_1").is_ok());
        for bad in ["", "1a", "pg_x", "Upper", "a-b", "a b", &"a".repeat(64)] {
            assert!(check_schema_name(bad).is_err(), "{bad:?} was accepted");
        }
    }

    proptest! {
        /// Every topic gets a plain identifier of at most 59 bytes that needs no quoting.
        #[test]
        fn every_topic_gets_a_plain_identifier(topic in "\\PC{1,255}") {
            let name = table_for_topic(&topic);
            prop_assert!(name.len() <= 59, "{} bytes: {}", name.len(), name);
            prop_assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
            prop_assert!(name.starts_with("t_"));
            prop_assert_eq!(name.clone(), table_for_topic(&topic));
        }
    }
}
