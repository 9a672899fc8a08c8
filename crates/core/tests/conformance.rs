//! The in-memory store runs the whole conformance suite.

factline_core::event_store_conformance!(async { factline_core::InMemoryStore::new() });
