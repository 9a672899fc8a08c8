//! Derive macros for factline (work in progress).
