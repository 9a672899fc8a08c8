//! The reference model (filled in below).
