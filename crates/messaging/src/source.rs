//! The event store as a message source.
