//! The payment of one order (`payment-{order_id}`): charged once, or declined; a charge can be
//! refunded once.

use factline::domain::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

/// What can be asked of a payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentCommand {
    /// Charge `amount_cents`, given what the payment gateway says is available.
    Charge {
        /// The amount to charge, in cents.
        amount_cents: u64,
        /// What the customer's card has available, in cents.
        available_cents: u64,
    },
    /// Give a charge back.
    Refund,
}

/// What happened to a payment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, DomainEvent)]
pub enum PaymentEvent {
    /// The amount was charged.
    PaymentCharged {
        /// The amount, in cents.
        amount_cents: u64,
    },
    /// The charge was refused.
    PaymentDeclined {
        /// Why.
        reason: String,
    },
    /// The charge was given back.
    PaymentRefunded {
        /// The amount, in cents.
        amount_cents: u64,
    },
}

/// Why a payment refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PaymentError {
    /// A charge must be above zero.
    #[error("a charge must be more than 0 cents")]
    ZeroAmount,
    /// The payment was charged or declined before.
    #[error("the payment was already decided")]
    AlreadyDecided,
    /// Only a charge can be refunded.
    #[error("nothing was charged, so nothing can be refunded")]
    NotCharged,
    /// The charge was refunded before.
    #[error("the payment was already refunded")]
    AlreadyRefunded,
}

/// Where a payment is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PaymentStatus {
    /// Nothing yet.
    #[default]
    Open,
    /// Charged this many cents.
    Charged(u64),
    /// Declined.
    Declined,
    /// Refunded this many cents.
    Refunded(u64),
}

/// The state of one payment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Payment {
    /// Where it is.
    pub status: PaymentStatus,
}

impl Aggregate for Payment {
    type Command = PaymentCommand;
    type Event = PaymentEvent;
    type Error = PaymentError;
    const CATEGORY: &'static str = "payment";

    fn decide(&self, command: &PaymentCommand) -> Result<Vec<PaymentEvent>, PaymentError> {
        match (self.status, command) {
            (
                PaymentStatus::Open,
                PaymentCommand::Charge {
                    amount_cents: 0, ..
                },
            ) => Err(PaymentError::ZeroAmount),
            (
                PaymentStatus::Open,
                PaymentCommand::Charge {
                    amount_cents,
                    available_cents,
                },
            ) => Ok(vec![if available_cents >= amount_cents {
                PaymentEvent::PaymentCharged {
                    amount_cents: *amount_cents,
                }
            } else {
                PaymentEvent::PaymentDeclined {
                    reason: format!(
                        "insufficient funds: {available_cents} of {amount_cents} cents available"
                    ),
                }
            }]),
            (_, PaymentCommand::Charge { .. }) => Err(PaymentError::AlreadyDecided),
            (PaymentStatus::Charged(amount_cents), PaymentCommand::Refund) => {
                Ok(vec![PaymentEvent::PaymentRefunded { amount_cents }])
            }
            (PaymentStatus::Refunded(_), PaymentCommand::Refund) => {
                Err(PaymentError::AlreadyRefunded)
            }
            (PaymentStatus::Open | PaymentStatus::Declined, PaymentCommand::Refund) => {
                Err(PaymentError::NotCharged)
            }
        }
    }

    fn evolve(&mut self, event: &PaymentEvent) {
        self.status = match event {
            PaymentEvent::PaymentCharged { amount_cents } => PaymentStatus::Charged(*amount_cents),
            PaymentEvent::PaymentDeclined { .. } => PaymentStatus::Declined,
            PaymentEvent::PaymentRefunded { amount_cents } => {
                PaymentStatus::Refunded(*amount_cents)
            }
        };
    }
}
