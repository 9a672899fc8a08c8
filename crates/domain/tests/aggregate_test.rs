//! The given/when/then helper: passing checks and the reports of failing ones.
// Test helpers outside #[test] functions panic on failure, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};

use common::{Account, AccountError, AccountEvent, deposit, open, withdraw};
use factline_domain::testing::AggregateTest;

fn opened() -> AccountEvent {
    AccountEvent::AccountOpened {
        owner: "ada".into(),
    }
}

fn deposited(amount_cents: u64) -> AccountEvent {
    AccountEvent::MoneyDeposited { amount_cents }
}

/// The panic message of `check`.
fn failure_report(check: impl FnOnce()) -> String {
    let payload = catch_unwind(AssertUnwindSafe(check)).expect_err("the check should fail");
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| {
            payload
                .downcast_ref::<&str>()
                .map(|text| (*text).to_owned())
        })
        .unwrap_or_default()
}

#[test]
fn passing_checks_chain() {
    AggregateTest::<Account>::given([])
        .when(open("ada"))
        .then_expect_events([opened()])
        .then_expect_state(|account| account.owner.as_deref() == Some("ada"));

    AggregateTest::<Account>::given([opened(), deposited(50)])
        .when(withdraw(20))
        .then_expect_events([AccountEvent::MoneyWithdrawn { amount_cents: 20 }])
        .then_expect_state(|account| account.balance_cents == 30);

    AggregateTest::<Account>::given([opened()])
        .when(open("ada"))
        .then_expect_no_events();

    let outcome = AggregateTest::<Account>::given([opened(), deposited(5)])
        .when(withdraw(6))
        .then_expect_error(|error| {
            matches!(
                error,
                AccountError::InsufficientFunds {
                    balance_cents: 5,
                    requested_cents: 6
                }
            )
        })
        .then_expect_state(|account| account.balance_cents == 5);
    assert!(outcome.decision().is_err());
    assert_eq!(outcome.state().balance_cents, 5);
}

#[test]
fn other_events_report_given_command_expected_and_actual() {
    let report = failure_report(|| {
        AggregateTest::<Account>::given([opened()])
            .when(deposit(7))
            .then_expect_events([deposited(8)]);
    });
    assert!(
        report.starts_with("aggregate test failed: the command decided other events"),
        "{report}"
    );
    assert!(
        report.contains("given:\n  AccountOpened { owner: \"ada\" }\n"),
        "{report}"
    );
    assert!(
        report.contains("when:\n  Deposit { amount_cents: 7 }\n"),
        "{report}"
    );
    assert!(
        report.contains("expected events:\n  MoneyDeposited { amount_cents: 8 }\n"),
        "{report}"
    );
    assert!(
        report.contains("actual events:\n  MoneyDeposited { amount_cents: 7 }\n"),
        "{report}"
    );
}

#[test]
fn an_unexpected_rejection_reports_the_error() {
    let report = failure_report(|| {
        AggregateTest::<Account>::given([])
            .when(deposit(7))
            .then_expect_events([deposited(7)]);
    });
    assert!(report.contains("the command was rejected"), "{report}");
    assert!(report.contains("given:\n  (none)\n"), "{report}");
    assert!(
        report.contains("actual: rejected with\n  NotOpen (the account is not open)"),
        "{report}"
    );
}

#[test]
fn an_unexpected_acceptance_reports_the_events() {
    let report = failure_report(|| {
        AggregateTest::<Account>::given([opened()])
            .when(deposit(1))
            .then_expect_error(|_| true);
    });
    assert!(
        report.contains("accepted, but a rejection was expected"),
        "{report}"
    );
    assert!(
        report.contains("actual events:\n  MoneyDeposited { amount_cents: 1 }"),
        "{report}"
    );
}

#[test]
fn another_error_is_reported() {
    let report = failure_report(|| {
        AggregateTest::<Account>::given([])
            .when(deposit(1))
            .then_expect_error(|error| matches!(error, AccountError::ZeroAmount));
    });
    assert!(report.contains("another error than expected"), "{report}");
    assert!(report.contains("NotOpen"), "{report}");
}

#[test]
fn unexpected_events_and_state_are_reported() {
    let report = failure_report(|| {
        AggregateTest::<Account>::given([opened()])
            .when(deposit(1))
            .then_expect_no_events();
    });
    assert!(report.contains("but none were expected"), "{report}");

    let report = failure_report(|| {
        AggregateTest::<Account>::given([opened()])
            .when(deposit(1))
            .then_expect_state(|account| account.balance_cents == 2);
    });
    assert!(
        report.contains("the state does not pass the given check"),
        "{report}"
    );
    assert!(
        report.contains("Account { owner: Some(\"ada\"), balance_cents: 1 }"),
        "{report}"
    );
}
