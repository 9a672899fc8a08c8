//! Given/when/then tests for aggregates, without a store.
//!
//! ```
//! # use factline_domain::{Aggregate, DomainEvent, testing::AggregateTest};
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Debug, PartialEq, Serialize, Deserialize, DomainEvent)]
//! # enum LampEvent { SwitchedOn, SwitchedOff }
//! # #[derive(Debug)]
//! # enum LampCommand { SwitchOn }
//! # #[derive(Debug, thiserror::Error)]
//! # #[error("the lamp is already on")]
//! # struct AlreadyOn;
//! # #[derive(Debug, Default)]
//! # struct Lamp { on: bool }
//! # impl Aggregate for Lamp {
//! #     type Command = LampCommand;
//! #     type Event = LampEvent;
//! #     type Error = AlreadyOn;
//! #     const CATEGORY: &'static str = "lamp";
//! #     fn decide(&self, _: &LampCommand) -> Result<Vec<LampEvent>, AlreadyOn> {
//! #         if self.on { Err(AlreadyOn) } else { Ok(vec![LampEvent::SwitchedOn]) }
//! #     }
//! #     fn evolve(&mut self, event: &LampEvent) { self.on = matches!(event, LampEvent::SwitchedOn) }
//! # }
//! AggregateTest::<Lamp>::given([])
//!     .when(LampCommand::SwitchOn)
//!     .then_expect_events([LampEvent::SwitchedOn])
//!     .then_expect_state(|lamp| lamp.on);
//!
//! AggregateTest::<Lamp>::given([LampEvent::SwitchedOn])
//!     .when(LampCommand::SwitchOn)
//!     .then_expect_error(|error| matches!(error, AlreadyOn));
//! ```

use std::fmt::{self, Debug, Write as _};

use crate::Aggregate;

/// The "given" part of an aggregate test: a state built from past events.
pub struct AggregateTest<A: Aggregate> {
    given: Vec<A::Event>,
    state: A,
}

impl<A: Aggregate> AggregateTest<A> {
    /// Starts from the default state with `events` applied in order.
    pub fn given(events: impl IntoIterator<Item = A::Event>) -> Self {
        let given: Vec<A::Event> = events.into_iter().collect();
        let mut state = A::default();
        for event in &given {
            state.evolve(event);
        }
        Self { given, state }
    }

    /// Runs `command` through [`Aggregate::decide`] and, when it is accepted, applies the
    /// decided events to the state.
    pub fn when(self, command: A::Command) -> AggregateTestOutcome<A> {
        let Self { given, mut state } = self;
        let decision = state.decide(&command);
        if let Ok(events) = &decision {
            for event in events {
                state.evolve(event);
            }
        }
        AggregateTestOutcome {
            given,
            command,
            decision,
            state,
        }
    }
}

impl<A> Debug for AggregateTest<A>
where
    A: Aggregate + Debug,
    A::Event: Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AggregateTest")
            .field("given", &self.given)
            .field("state", &self.state)
            .finish()
    }
}

/// The "then" part of an aggregate test: what the command decided, ready to be checked. Every
/// check panics with the given events, the command, the expectation and what happened.
pub struct AggregateTestOutcome<A: Aggregate> {
    given: Vec<A::Event>,
    command: A::Command,
    decision: Result<Vec<A::Event>, A::Error>,
    /// The state after the decided events (unchanged when the command was rejected).
    state: A,
}

impl<A> Debug for AggregateTestOutcome<A>
where
    A: Aggregate + Debug,
    A::Command: Debug,
    A::Event: Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AggregateTestOutcome")
            .field("given", &self.given)
            .field("command", &self.command)
            .field("decision", &self.decision)
            .field("state", &self.state)
            .finish()
    }
}

impl<A> AggregateTestOutcome<A>
where
    A: Aggregate,
    A::Command: Debug,
    A::Event: Debug,
{
    /// Checks that the command was accepted with exactly `expected`, in order.
    #[track_caller]
    pub fn then_expect_events(self, expected: impl IntoIterator<Item = A::Event>) -> Self
    where
        A::Event: PartialEq,
    {
        let expected: Vec<A::Event> = expected.into_iter().collect();
        match &self.decision {
            Ok(actual) if *actual == expected => self,
            Ok(_) => self.fail(
                "the command decided other events than expected",
                &list("expected events", &expected),
            ),
            Err(_) => self.fail(
                "the command was rejected, but events were expected",
                &list("expected events", &expected),
            ),
        }
    }

    /// Checks that the command was accepted and decided nothing.
    #[track_caller]
    pub fn then_expect_no_events(self) -> Self {
        match &self.decision {
            Ok(actual) if actual.is_empty() => self,
            Ok(_) => self.fail(
                "the command decided events, but none were expected",
                "expected events:\n  (none)\n",
            ),
            Err(_) => self.fail(
                "the command was rejected, but it was expected to be accepted with no events",
                "expected events:\n  (none)\n",
            ),
        }
    }

    /// Checks that the command was rejected with an error that passes `is_expected`.
    #[track_caller]
    pub fn then_expect_error(self, is_expected: impl FnOnce(&A::Error) -> bool) -> Self {
        match &self.decision {
            Err(error) if is_expected(error) => self,
            Err(_) => self.fail(
                "the command was rejected with another error than expected",
                "expected: an error that passes the given check\n",
            ),
            Ok(_) => self.fail(
                "the command was accepted, but a rejection was expected",
                "expected: an error that passes the given check\n",
            ),
        }
    }

    /// Checks that the state after the command passes `is_expected`. The state is the one after
    /// the decided events, or the unchanged state when the command was rejected.
    #[track_caller]
    pub fn then_expect_state(self, is_expected: impl FnOnce(&A) -> bool) -> Self
    where
        A: Debug,
    {
        if is_expected(&self.state) {
            return self;
        }
        let state = format!("state after the command:\n  {:?}\n", self.state);
        self.fail("the state does not pass the given check", &state)
    }

    /// The decision: the events, or the aggregate's error.
    pub fn decision(&self) -> Result<&[A::Event], &A::Error> {
        self.decision.as_deref()
    }

    /// The state after the decided events (unchanged when the command was rejected).
    pub fn state(&self) -> &A {
        &self.state
    }

    #[track_caller]
    fn fail(&self, what: &str, expectation: &str) -> ! {
        let mut report = format!("aggregate test failed: {what}\n");
        report.push_str(&list("given", &self.given));
        let _ = writeln!(report, "when:\n  {:?}", self.command);
        report.push_str(expectation);
        match &self.decision {
            Ok(events) => report.push_str(&list("actual events", events)),
            Err(error) => {
                let _ = writeln!(report, "actual: rejected with\n  {error:?} ({error})");
            }
        }
        panic!("{report}")
    }
}

fn list<T: Debug>(title: &str, items: &[T]) -> String {
    let mut text = format!("{title}:\n");
    if items.is_empty() {
        text.push_str("  (none)\n");
    }
    for item in items {
        let _ = writeln!(text, "  {item:?}");
    }
    text
}
