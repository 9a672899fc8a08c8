//! Exchange and queue names: how topics and groups become AMQP names.
//!
//! AMQP names are short strings of at most 255 bytes; RabbitMQ takes any UTF-8 in them, and a
//! fanout exchange ignores routing keys, so no wildcard or hierarchy syntax applies. A topic is
//! used as it is; only the joint of a topic and a group needs a separator that cannot be
//! confused, and only a name over 255 bytes needs shortening.

use uuid::Uuid;

/// Longest AMQP exchange or queue name, in bytes.
pub const NAME_BYTES_MAX: usize = 255;

/// Longest consumer group name, in bytes.
pub const GROUP_BYTES_MAX: usize = 120;

/// Marks a shortened name (see [`exchange_name`]).
const HASHED_MARK: &str = "~h~";

/// Namespace of the UUID v5 that shortens long names.
const NAMESPACE: Uuid = Uuid::from_u128(0x6c1e_5a2f_4d0b_4c7e_9a51_0f3e_8b2d_7c19);

/// The fanout exchange of `topic`: `{prefix}{topic}`, or, when that exceeds 255 bytes,
/// `{prefix}~h~{uuid v5 of the topic}~{the topic's first bytes}` (distinct topics keep distinct
/// names unless SHA-1 collides).
pub fn exchange_name(prefix: &str, topic: &str) -> String {
    let plain = format!("{prefix}{topic}");
    if plain.len() <= NAME_BYTES_MAX {
        return plain;
    }
    shortened(prefix, "x", topic, "")
}

/// The durable queue of `group` on `topic`: `{prefix}{topic}.{group}` (group names have no
/// `.`, so the last `.` separates them: distinct pairs give distinct names), or, when that
/// exceeds 255 bytes, a shortened form like [`exchange_name`]'s that ends in `.{group}`.
pub fn group_queue_name(prefix: &str, topic: &str, group: &str) -> String {
    let plain = format!("{prefix}{topic}.{group}");
    if plain.len() <= NAME_BYTES_MAX {
        return plain;
    }
    shortened(prefix, "q", topic, &format!(".{group}"))
}

fn shortened(prefix: &str, kind: &str, topic: &str, suffix: &str) -> String {
    let hash = Uuid::new_v5(&NAMESPACE, format!("{kind}\u{0}{topic}").as_bytes()).simple();
    let mut name = format!("{prefix}{HASHED_MARK}{hash}~");
    let room = NAME_BYTES_MAX.saturating_sub(name.len() + suffix.len());
    let mut cut = room.min(topic.len());
    while !topic.is_char_boundary(cut) {
        cut -= 1;
    }
    name.push_str(&topic[..cut]);
    name.push_str(suffix);
    name
}

/// Why a group name cannot be used: 1..=120 bytes, no `.` and no control characters.
pub(crate) fn check_group(group: &str) -> Result<(), String> {
    if group.is_empty() || group.len() > GROUP_BYTES_MAX {
        return Err(format!(
            "a group name must be 1..={GROUP_BYTES_MAX} bytes, not {}",
            group.len()
        ));
    }
    if group.contains('.') {
        return Err(
            "a group name must not contain '.' (it separates topic and group in queue names)"
                .into(),
        );
    }
    if group.chars().any(char::is_control) {
        return Err("a group name must not contain control characters".into());
    }
    Ok(())
}

/// Why a prefix cannot be used: at most 64 bytes, no control characters.
pub(crate) fn check_prefix(prefix: &str) -> Result<(), String> {
    if prefix.len() > 64 {
        return Err(format!("must be at most 64 bytes, not {}", prefix.len()));
    }
    if prefix.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    if prefix.starts_with("amq.") {
        return Err("must not start with \"amq.\" (reserved by the broker)".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_and_stay_distinct() {
        assert_eq!(exchange_name("fl.", "orders"), "fl.orders");
        assert_eq!(
            group_queue_name("fl.", "orders", "billing"),
            "fl.orders.billing"
        );
        // a.b + c and a + b.c cannot both exist: groups have no '.'.
        assert!(check_group("b.c").is_err());
        let long = "t".repeat(255);
        let other = format!("{}u", "t".repeat(254));
        let a = exchange_name("factline.", &long);
        let b = exchange_name("factline.", &other);
        assert!(a.len() <= NAME_BYTES_MAX && b.len() <= NAME_BYTES_MAX);
        assert_ne!(a, b);
        let q = group_queue_name("factline.", &long, &"g".repeat(GROUP_BYTES_MAX));
        assert!(q.len() <= NAME_BYTES_MAX, "{}", q.len());
        assert!(q.ends_with(&format!(".{}", "g".repeat(GROUP_BYTES_MAX))));
        let unicode = "日".repeat(85);
        assert!(exchange_name("factline.", &unicode).len() <= NAME_BYTES_MAX);
        assert!(check_group("").is_err() && check_group("fl_x_0123").is_ok());
        assert!(check_prefix("amq.x").is_err() && check_prefix("fltest.").is_ok());
    }
}
