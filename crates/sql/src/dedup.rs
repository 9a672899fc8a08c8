//! What the SQL deduplication stores share.

use std::time::Duration;

/// Settings of the SQL deduplication stores ([`crate::postgres::PgDedupStore`],
/// [`crate::mysql::MySqlDedupStore`], [`crate::sqlite::SqliteDedupStore`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DedupConfig {
    /// How long a done key is remembered; a redelivery after that is handled again.
    /// Default 7 days.
    pub ttl: Duration,
    /// How long a claim holds without being completed or released before the next `begin`
    /// takes it over (it must outlast the handler and its retries). Default 5 minutes.
    pub claim_ttl: Duration,
}

impl Default for DedupConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(7 * 24 * 3_600),
            claim_ttl: Duration::from_secs(5 * 60),
        }
    }
}

impl DedupConfig {
    /// Builder: see [`DedupConfig::ttl`].
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Builder: see [`DedupConfig::claim_ttl`].
    #[must_use]
    pub fn claim_ttl(mut self, ttl: Duration) -> Self {
        self.claim_ttl = ttl;
        self
    }
}

/// The form of `text` a store keeps in its key columns: as it is, unless it is longer than
/// `bytes_max` (a column's limit), holds a NUL (PostgreSQL's text cannot) or starts with the
/// hash marker; then `~sha256:` + the hex SHA-256 of its bytes (72 bytes).
pub(crate) fn stored_key(text: &str, bytes_max: usize) -> std::borrow::Cow<'_, str> {
    const MARKER: &str = "~sha256:";
    if text.len() <= bytes_max && !text.starts_with(MARKER) && !text.contains('\0') {
        return std::borrow::Cow::Borrowed(text);
    }
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(text.as_bytes());
    let mut hashed = String::with_capacity(MARKER.len() + 64);
    hashed.push_str(MARKER);
    for byte in digest {
        use std::fmt::Write as _;
        let _ = write!(hashed, "{byte:02x}");
    }
    std::borrow::Cow::Owned(hashed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_keys_are_hashed_and_short_ones_kept() {
        assert_eq!(stored_key("order-42", 255), "order-42");
        let long = "k".repeat(300);
        let hashed = stored_key(&long, 255);
        assert!(
            hashed.starts_with("~sha256:") && hashed.len() == 8 + 64,
            "{hashed}"
        );
        assert_ne!(stored_key(&"k".repeat(301), 255), hashed);
        assert!(stored_key("a\0b", usize::MAX).starts_with("~sha256:"));
        // A key that looks hashed is hashed too, so it cannot collide with a hashed one.
        assert_ne!(stored_key(&hashed, 255), hashed);
        assert_eq!(stored_key(&long, usize::MAX), long, "no limit, no hash");
    }
}
