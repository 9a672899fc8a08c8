//! The orders example (work in progress).
