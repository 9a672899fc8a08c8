//! The orders example: an [`Order`] aggregate written as a decider with factline-domain, its
//! read models ([`read_models`]: order summaries, customer histories, daily revenue), a
//! [`payment::Payment`] aggregate, and the [`checkout`] saga that takes an order through
//! payment and shipment and compensates when a step fails.
//!
//! An order is placed with a total, paid in one or more payments, then shipped; it can be
//! canceled until it ships. Amounts are integer cents.
//!
//! Rules:
//! - nothing can happen to an order before it is placed, and nothing after it is canceled;
//! - an order is placed once, with a customer and a total above zero;
//! - a payment is above zero and at most what is still owed; a fully paid order takes no more;
//! - an order ships once, and only when fully paid;
//! - a shipped order cannot be canceled; a cancellation needs a reason.

use factline::domain::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

pub mod checkout;
pub mod payment;
pub mod read_models;

/// What can be asked of an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderCommand {
    /// Place the order.
    PlaceOrder {
        /// Who orders.
        customer_id: String,
        /// What the order costs, in cents.
        total_cents: u64,
    },
    /// Record a payment.
    ReceivePayment {
        /// The amount paid, in cents.
        amount_cents: u64,
    },
    /// Ship the order.
    ShipOrder,
    /// Cancel the order.
    CancelOrder {
        /// Why.
        reason: String,
    },
}

/// What happened to an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, DomainEvent)]
pub enum OrderEvent {
    /// The order was placed.
    OrderPlaced {
        /// Who ordered.
        customer_id: String,
        /// What the order costs, in cents.
        total_cents: u64,
    },
    /// A payment was received.
    PaymentReceived {
        /// The amount paid, in cents.
        amount_cents: u64,
    },
    /// The order was shipped.
    OrderShipped,
    /// The order was canceled.
    OrderCanceled {
        /// Why.
        reason: String,
    },
}

/// Why an order refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OrderError {
    /// The order has not been placed yet.
    #[error("the order has not been placed")]
    NotPlaced,
    /// The order was placed before.
    #[error("the order has already been placed")]
    AlreadyPlaced,
    /// The order was canceled; nothing more can happen to it.
    #[error("the order was canceled")]
    Canceled,
    /// An order needs a customer.
    #[error("an order needs a customer id")]
    MissingCustomer,
    /// An order's total must be above zero.
    #[error("an order total must be more than 0 cents")]
    ZeroTotal,
    /// A payment must be above zero.
    #[error("a payment must be more than 0 cents")]
    ZeroPayment,
    /// The order is fully paid.
    #[error("the order is already fully paid")]
    AlreadyPaid,
    /// The payment is more than what is owed.
    #[error("a payment of {offered_cents} cents is more than the {outstanding_cents} cents owed")]
    Overpayment {
        /// The payment.
        offered_cents: u64,
        /// What is still owed.
        outstanding_cents: u64,
    },
    /// The order is not fully paid yet.
    #[error("the order cannot ship before it is fully paid ({outstanding_cents} cents owed)")]
    NotFullyPaid {
        /// What is still owed.
        outstanding_cents: u64,
    },
    /// The order has shipped.
    #[error("the order has already shipped")]
    AlreadyShipped,
    /// A cancellation needs a reason.
    #[error("a cancellation needs a reason")]
    MissingReason,
}

/// Where an order is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderStatus {
    /// Not placed yet (no events).
    #[default]
    NotPlaced,
    /// Placed, possibly partly or fully paid.
    Placed,
    /// Shipped.
    Shipped,
    /// Canceled.
    Canceled,
}

/// The state of one order, rebuilt from its events.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// Where the order is in its life.
    pub status: OrderStatus,
    /// Who ordered.
    pub customer_id: String,
    /// What the order costs, in cents.
    pub total_cents: u64,
    /// What has been paid, in cents.
    pub paid_cents: u64,
}

impl Order {
    /// What is still owed, in cents.
    pub fn outstanding_cents(&self) -> u64 {
        self.total_cents.saturating_sub(self.paid_cents)
    }

    fn place(customer_id: &str, total_cents: u64) -> Result<Vec<OrderEvent>, OrderError> {
        if customer_id.trim().is_empty() {
            return Err(OrderError::MissingCustomer);
        }
        if total_cents == 0 {
            return Err(OrderError::ZeroTotal);
        }
        Ok(vec![OrderEvent::OrderPlaced {
            customer_id: customer_id.to_owned(),
            total_cents,
        }])
    }

    fn pay(&self, amount_cents: u64) -> Result<Vec<OrderEvent>, OrderError> {
        let outstanding_cents = self.outstanding_cents();
        if outstanding_cents == 0 {
            return Err(OrderError::AlreadyPaid);
        }
        if amount_cents == 0 {
            return Err(OrderError::ZeroPayment);
        }
        if amount_cents > outstanding_cents {
            return Err(OrderError::Overpayment {
                offered_cents: amount_cents,
                outstanding_cents,
            });
        }
        Ok(vec![OrderEvent::PaymentReceived { amount_cents }])
    }

    fn ship(&self) -> Result<Vec<OrderEvent>, OrderError> {
        match self.outstanding_cents() {
            0 => Ok(vec![OrderEvent::OrderShipped]),
            outstanding_cents => Err(OrderError::NotFullyPaid { outstanding_cents }),
        }
    }

    fn cancel(reason: &str) -> Result<Vec<OrderEvent>, OrderError> {
        if reason.trim().is_empty() {
            return Err(OrderError::MissingReason);
        }
        Ok(vec![OrderEvent::OrderCanceled {
            reason: reason.to_owned(),
        }])
    }
}

impl Aggregate for Order {
    type Command = OrderCommand;
    type Event = OrderEvent;
    type Error = OrderError;
    const CATEGORY: &'static str = "order";

    fn decide(&self, command: &OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
        use OrderCommand::{CancelOrder, PlaceOrder, ReceivePayment, ShipOrder};
        match (self.status, command) {
            (OrderStatus::Canceled, _) => Err(OrderError::Canceled),
            (
                OrderStatus::NotPlaced,
                PlaceOrder {
                    customer_id,
                    total_cents,
                },
            ) => Self::place(customer_id, *total_cents),
            (OrderStatus::NotPlaced, _) => Err(OrderError::NotPlaced),
            (OrderStatus::Placed | OrderStatus::Shipped, PlaceOrder { .. }) => {
                Err(OrderError::AlreadyPlaced)
            }
            (OrderStatus::Placed, ReceivePayment { amount_cents }) => self.pay(*amount_cents),
            (OrderStatus::Placed, ShipOrder) => self.ship(),
            (OrderStatus::Placed, CancelOrder { reason }) => Self::cancel(reason),
            (OrderStatus::Shipped, ReceivePayment { .. }) => Err(OrderError::AlreadyPaid),
            (OrderStatus::Shipped, ShipOrder | CancelOrder { .. }) => {
                Err(OrderError::AlreadyShipped)
            }
        }
    }

    fn evolve(&mut self, event: &OrderEvent) {
        match event {
            OrderEvent::OrderPlaced {
                customer_id,
                total_cents,
            } => {
                self.status = OrderStatus::Placed;
                self.customer_id.clone_from(customer_id);
                self.total_cents = *total_cents;
            }
            OrderEvent::PaymentReceived { amount_cents } => {
                self.paid_cents = self.paid_cents.saturating_add(*amount_cents);
            }
            OrderEvent::OrderShipped => self.status = OrderStatus::Shipped,
            OrderEvent::OrderCanceled { .. } => self.status = OrderStatus::Canceled,
        }
    }
}

/// Cents as a decimal amount, e.g. `2500` as `25.00`.
pub fn format_cents(cents: u64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cents_format_with_two_decimals() {
        assert_eq!(format_cents(2_500), "25.00");
        assert_eq!(format_cents(7), "0.07");
        assert_eq!(format_cents(123_456), "1234.56");
    }

    #[test]
    fn the_event_types_are_the_variant_names() {
        assert_eq!(
            OrderEvent::event_types(),
            [
                "OrderPlaced",
                "PaymentReceived",
                "OrderShipped",
                "OrderCanceled"
            ]
        );
    }
}
