//! The embedded storage engine (work in progress; see docs/design/log-format.md).
