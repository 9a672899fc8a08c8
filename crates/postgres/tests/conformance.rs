//! The PostgreSQL store under the shared conformance suite and the reference model, each test on
//! its own schema.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use factline_core::testkit::model::check_against_model;

factline_core::event_store_conformance!(
    #[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
    common::fresh_store()
);

#[test]
#[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
fn agrees_with_the_model() {
    check_against_model(common::fresh_store, 48);
}
