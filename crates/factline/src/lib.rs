//! factline facade (work in progress).
