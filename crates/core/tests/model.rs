//! Property test: the in-memory store against the reference model.

#[test]
fn in_memory_store_agrees_with_the_model() {
    factline_core::testkit::model::check_against_model(
        || async { factline_core::InMemoryStore::new() },
        512,
    );
}
