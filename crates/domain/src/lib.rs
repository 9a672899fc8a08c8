//! factline domain layer (work in progress).
