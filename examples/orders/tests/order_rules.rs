//! Every rule of the order, as given/when/then.

use factline::domain::testing::AggregateTest;
use factline_example_orders::{Order, OrderCommand, OrderError, OrderEvent, OrderStatus};

fn placed(total_cents: u64) -> OrderEvent {
    OrderEvent::OrderPlaced {
        customer_id: "c-7".into(),
        total_cents,
    }
}

fn paid(amount_cents: u64) -> OrderEvent {
    OrderEvent::PaymentReceived { amount_cents }
}

fn canceled() -> OrderEvent {
    OrderEvent::OrderCanceled {
        reason: "out of stock".into(),
    }
}

fn place(total_cents: u64) -> OrderCommand {
    OrderCommand::PlaceOrder {
        customer_id: "c-7".into(),
        total_cents,
    }
}

fn pay(amount_cents: u64) -> OrderCommand {
    OrderCommand::ReceivePayment { amount_cents }
}

fn cancel(reason: &str) -> OrderCommand {
    OrderCommand::CancelOrder {
        reason: reason.into(),
    }
}

fn test(given: impl IntoIterator<Item = OrderEvent>) -> AggregateTest<Order> {
    AggregateTest::given(given)
}

// --- placing ---

#[test]
fn an_order_is_placed_with_a_customer_and_a_total() {
    test([])
        .when(place(2_500))
        .then_expect_events([placed(2_500)])
        .then_expect_state(|order| {
            order.status == OrderStatus::Placed
                && order.total_cents == 2_500
                && order.outstanding_cents() == 2_500
        });
}

#[test]
fn an_order_needs_a_customer_and_a_total_above_zero() {
    test([])
        .when(OrderCommand::PlaceOrder {
            customer_id: " ".into(),
            total_cents: 100,
        })
        .then_expect_error(|error| *error == OrderError::MissingCustomer);
    test([])
        .when(place(0))
        .then_expect_error(|error| *error == OrderError::ZeroTotal);
}

#[test]
fn an_order_is_placed_once() {
    test([placed(100)])
        .when(place(100))
        .then_expect_error(|error| *error == OrderError::AlreadyPlaced);
    test([placed(100), paid(100), OrderEvent::OrderShipped])
        .when(place(100))
        .then_expect_error(|error| *error == OrderError::AlreadyPlaced);
}

// --- unplaced and canceled orders ---

#[test]
fn nothing_happens_to_an_unplaced_order() {
    for command in [pay(100), OrderCommand::ShipOrder, cancel("no")] {
        test([])
            .when(command)
            .then_expect_error(|error| *error == OrderError::NotPlaced);
    }
}

#[test]
fn nothing_happens_to_a_canceled_order() {
    for command in [
        place(100),
        pay(100),
        OrderCommand::ShipOrder,
        cancel("again"),
    ] {
        test([placed(100), canceled()])
            .when(command)
            .then_expect_error(|error| *error == OrderError::Canceled)
            .then_expect_state(|order| order.status == OrderStatus::Canceled);
    }
}

// --- paying ---

#[test]
fn payments_can_come_in_parts() {
    test([placed(2_500), paid(1_000)])
        .when(pay(1_500))
        .then_expect_events([paid(1_500)])
        .then_expect_state(|order| order.paid_cents == 2_500 && order.outstanding_cents() == 0);
}

#[test]
fn a_payment_must_be_above_zero() {
    test([placed(100)])
        .when(pay(0))
        .then_expect_error(|error| *error == OrderError::ZeroPayment);
}

#[test]
fn a_payment_cannot_exceed_what_is_owed() {
    test([placed(2_500), paid(2_000)])
        .when(pay(501))
        .then_expect_error(|error| {
            *error
                == OrderError::Overpayment {
                    offered_cents: 501,
                    outstanding_cents: 500,
                }
        })
        .then_expect_state(|order| order.paid_cents == 2_000);
}

#[test]
fn a_fully_paid_order_cannot_be_paid_again() {
    test([placed(100), paid(100)])
        .when(pay(100))
        .then_expect_error(|error| *error == OrderError::AlreadyPaid);
    test([placed(100), paid(100), OrderEvent::OrderShipped])
        .when(pay(1))
        .then_expect_error(|error| *error == OrderError::AlreadyPaid);
}

// --- shipping ---

#[test]
fn a_fully_paid_order_ships() {
    test([placed(100), paid(40), paid(60)])
        .when(OrderCommand::ShipOrder)
        .then_expect_events([OrderEvent::OrderShipped])
        .then_expect_state(|order| order.status == OrderStatus::Shipped);
}

#[test]
fn an_order_cannot_ship_before_it_is_fully_paid() {
    test([placed(100)])
        .when(OrderCommand::ShipOrder)
        .then_expect_error(|error| {
            *error
                == OrderError::NotFullyPaid {
                    outstanding_cents: 100,
                }
        });
    test([placed(100), paid(99)])
        .when(OrderCommand::ShipOrder)
        .then_expect_error(|error| {
            *error
                == OrderError::NotFullyPaid {
                    outstanding_cents: 1,
                }
        });
}

#[test]
fn an_order_ships_once() {
    test([placed(100), paid(100), OrderEvent::OrderShipped])
        .when(OrderCommand::ShipOrder)
        .then_expect_error(|error| *error == OrderError::AlreadyShipped);
}

// --- canceling ---

#[test]
fn a_placed_order_can_be_canceled_paid_or_not() {
    test([placed(100)])
        .when(cancel("out of stock"))
        .then_expect_events([canceled()])
        .then_expect_state(|order| order.status == OrderStatus::Canceled);
    test([placed(100), paid(50)])
        .when(cancel("out of stock"))
        .then_expect_events([canceled()]);
}

#[test]
fn a_cancellation_needs_a_reason() {
    test([placed(100)])
        .when(cancel(""))
        .then_expect_error(|error| *error == OrderError::MissingReason);
}

#[test]
fn a_shipped_order_cannot_be_canceled() {
    test([placed(100), paid(100), OrderEvent::OrderShipped])
        .when(cancel("too late"))
        .then_expect_error(|error| *error == OrderError::AlreadyShipped)
        .then_expect_state(|order| order.status == OrderStatus::Shipped);
}
