//! The library example of README.md, kept compiling and passing. Keep the two in sync.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use factline::InMemoryStore;
use factline::domain::{Aggregate, DomainEvent, ExecuteOptions, Repository};
use serde::{Deserialize, Serialize};

#[derive(Debug, PartialEq, Serialize, Deserialize, DomainEvent)]
enum AccountEvent {
    Opened { owner: String },
    Deposited { amount_cents: u64 },
}

#[derive(Debug, thiserror::Error)]
enum AccountError {
    #[error("the account is not open")]
    NotOpen,
}

enum AccountCommand {
    Open { owner: String },
    Deposit { amount_cents: u64 },
}

#[derive(Debug, Default)]
struct Account {
    open: bool,
    balance_cents: u64,
}

impl Aggregate for Account {
    type Command = AccountCommand;
    type Event = AccountEvent;
    type Error = AccountError;
    const CATEGORY: &'static str = "account"; // streams are "account-{id}"

    // Pure: looks at the state and the command, returns the facts to record.
    fn decide(&self, command: &AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        match command {
            AccountCommand::Open { owner } => Ok(vec![AccountEvent::Opened {
                owner: owner.clone(),
            }]),
            AccountCommand::Deposit { .. } if !self.open => Err(AccountError::NotOpen),
            AccountCommand::Deposit { amount_cents } => Ok(vec![AccountEvent::Deposited {
                amount_cents: *amount_cents,
            }]),
        }
    }

    fn evolve(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::Opened { .. } => self.open = true,
            AccountEvent::Deposited { amount_cents } => self.balance_cents += amount_cents,
        }
    }
}

#[tokio::test]
async fn readme_example_runs() -> Result<(), Box<dyn std::error::Error>> {
    let accounts = Repository::<Account>::new(Arc::new(InMemoryStore::new()));
    let options = ExecuteOptions::new()
        .with_correlation_id("req-1")
        .with_conflict_retries(3);
    accounts
        .execute(
            "7",
            AccountCommand::Open {
                owner: "ada".into(),
            },
            options.clone(),
        )
        .await?;
    let done = accounts
        .execute("7", AccountCommand::Deposit { amount_cents: 500 }, options)
        .await?;
    assert_eq!(done.state.balance_cents, 500);
    assert_eq!(done.recorded[0].event_type, "Deposited");
    Ok(())
}

#[test]
fn readme_example_matches_this_file() {
    let readme = include_str!("../../../README.md");
    let block = readme
        .split("```rust\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .unwrap()
        .replace(
            "#[tokio::main]\nasync fn main()",
            "#[tokio::test]\nasync fn readme_example_runs()",
        );
    let this_file = include_str!("readme.rs");
    assert!(
        this_file.contains(&block),
        "README.md's example and crates/factline/tests/readme.rs differ; update both"
    );
}
