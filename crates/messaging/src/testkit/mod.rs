//! The pub/sub conformance suite (feature `testkit`).
