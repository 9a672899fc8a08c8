//! The checkout saga: order → payment → shipment, with compensation when a step fails.
//!
//! [`Checkout`] is a process manager (one instance per order, stream `checkout-{order_id}`):
//!
//! | it sees | it does |
//! |---|---|
//! | `OrderPlaced` | records `CheckoutStarted`, sends [`ChargePayment`], schedules the `payment` timeout |
//! | `PaymentCharged` | records `PaymentConfirmed`, cancels the timeout, sends [`RecordPayment`] |
//! | `PaymentReceived` (the order is paid) | sends [`ShipOrder`] |
//! | `OrderShipped` | records `CheckoutCompleted` |
//! | `PaymentDeclined` | compensates: records `CheckoutCompensated`, sends [`CancelOrder`] |
//! | the `payment` timeout | compensates the same way: the payment never came |
//! | `PaymentCharged` after compensating (a late charge) | records `RefundRequested`, sends [`RefundPayment`] |
//! | `OrderCanceled` by the customer | compensates; refunds what was charged |
//!
//! The commands travel over a [`CommandBus`]; [`register_handlers`] adds the handlers that
//! execute them on the [`Order`] and [`Payment`] aggregates, each at most once per message id
//! (an idempotency key), so at-least-once delivery — a redelivery, or the saga sending a
//! recorded command again after a restart — never applies a command twice.

use std::{sync::Arc, time::Duration};

use factline::EventStore;
use factline::domain::{
    Aggregate, DomainEvent, ExecuteError, ExecuteOptions, ProcessManager, Reaction, Repository,
};
use factline::messaging::{
    HandlerError,
    cqrs::{Command, CommandProcessor, MessageContext, RegisterError},
};
use factline::{RecordedEvent, category_of};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::payment::{Payment, PaymentCommand};
use crate::{Order, OrderCommand};

/// Charge the payment of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargePayment {
    /// The order.
    pub order_id: String,
    /// The amount, in cents.
    pub amount_cents: u64,
}

/// Record a charged payment on the order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordPayment {
    /// The order.
    pub order_id: String,
    /// The amount, in cents.
    pub amount_cents: u64,
}

/// Ship a paid order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipOrder {
    /// The order.
    pub order_id: String,
}

/// Cancel an order (a compensation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelOrder {
    /// The order.
    pub order_id: String,
    /// Why.
    pub reason: String,
}

/// Give an order's charge back (a compensation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundPayment {
    /// The order.
    pub order_id: String,
}

macro_rules! command {
    ($type:ident) => {
        impl Command for $type {
            const NAME: &'static str = stringify!($type);
            fn partition_key(&self) -> Option<String> {
                Some(self.order_id.clone())
            }
        }
    };
}
command!(ChargePayment);
command!(RecordPayment);
command!(ShipOrder);
command!(CancelOrder);
command!(RefundPayment);

/// The events the checkout reacts to: the order's and the payment's, by the same names and
/// shapes as [`crate::OrderEvent`] and [`crate::payment::PaymentEvent`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, DomainEvent)]
pub enum CheckoutInput {
    /// An order was placed.
    OrderPlaced {
        /// Who ordered.
        customer_id: String,
        /// What it costs, in cents.
        total_cents: u64,
    },
    /// The order recorded a payment.
    PaymentReceived {
        /// The amount, in cents.
        amount_cents: u64,
    },
    /// The order shipped.
    OrderShipped,
    /// The order was canceled.
    OrderCanceled {
        /// Why.
        reason: String,
    },
    /// The payment was charged.
    PaymentCharged {
        /// The amount, in cents.
        amount_cents: u64,
    },
    /// The payment was declined.
    PaymentDeclined {
        /// Why.
        reason: String,
    },
}

/// What happened to a checkout: its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, DomainEvent)]
pub enum CheckoutEvent {
    /// It started for an order.
    CheckoutStarted {
        /// The order.
        order_id: String,
        /// Its total, in cents.
        total_cents: u64,
    },
    /// The payment was charged.
    PaymentConfirmed {
        /// The amount, in cents.
        amount_cents: u64,
    },
    /// The order shipped: done.
    CheckoutCompleted,
    /// A step failed and the steps before it were undone (or are being).
    CheckoutCompensated {
        /// Why.
        reason: String,
    },
    /// A charge is being given back.
    RefundRequested {
        /// The amount, in cents.
        amount_cents: u64,
    },
}

/// The checkout's timeouts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckoutTimeout {
    /// The payment did not come in time.
    PaymentDue,
}

/// Where a checkout is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CheckoutStage {
    /// Nothing yet.
    #[default]
    New,
    /// Waiting for the payment.
    AwaitingPayment,
    /// Paid, waiting for the shipment.
    Paid,
    /// Shipped.
    Completed,
    /// Failed and undone.
    Compensated,
}

/// The checkout saga of one order.
#[derive(Debug, Clone)]
pub struct Checkout {
    /// How long a payment may take before the checkout is compensated.
    pub payment_timeout: Duration,
    /// Where it is.
    pub stage: CheckoutStage,
    /// The order.
    pub order_id: String,
    /// What was charged, in cents (0 if nothing).
    pub charged_cents: u64,
    /// True once a refund was asked for.
    pub refund_requested: bool,
    /// Why it was compensated, if it was.
    pub compensation_reason: Option<String>,
}

impl Checkout {
    /// A fresh checkout whose payments may take `payment_timeout`.
    pub fn new(payment_timeout: Duration) -> Self {
        Self {
            payment_timeout,
            stage: CheckoutStage::New,
            order_id: String::new(),
            charged_cents: 0,
            refund_requested: false,
            compensation_reason: None,
        }
    }

    fn compensate(&self, reason: String) -> Reaction<Self> {
        let mut reaction = Reaction::new()
            .record(CheckoutEvent::CheckoutCompensated {
                reason: reason.clone(),
            })
            .cancel("payment")
            .send(&CancelOrder {
                order_id: self.order_id.clone(),
                reason,
            });
        if self.charged_cents > 0 && !self.refund_requested {
            reaction = self.refund(reaction, self.charged_cents);
        }
        reaction
    }

    fn refund(&self, reaction: Reaction<Self>, amount_cents: u64) -> Reaction<Self> {
        reaction
            .record(CheckoutEvent::RefundRequested { amount_cents })
            .send(&RefundPayment {
                order_id: self.order_id.clone(),
            })
    }
}

/// A checkout never fails to react: every unexpected input is passed over.
#[derive(Debug, thiserror::Error)]
#[error("the checkout cannot fail")]
pub enum CheckoutError {}

impl ProcessManager for Checkout {
    type Input = CheckoutInput;
    type Event = CheckoutEvent;
    type Timeout = CheckoutTimeout;
    type Error = CheckoutError;
    const CATEGORY: &'static str = "checkout";

    /// The order id, from `order-{id}` and `payment-{id}` streams.
    fn correlate(_: &CheckoutInput, recorded: &RecordedEvent) -> Option<String> {
        let stream = recorded.stream.as_str();
        match category_of(stream) {
            "order" | "payment" => stream.split_once('-').map(|(_, id)| id.to_owned()),
            _ => None,
        }
    }

    fn react(
        &self,
        input: &CheckoutInput,
        recorded: &RecordedEvent,
    ) -> Result<Reaction<Self>, CheckoutError> {
        use CheckoutInput as In;
        use CheckoutStage as Stage;
        let order_id = Self::correlate(input, recorded).unwrap_or_default();
        Ok(match (self.stage, input) {
            (Stage::New, In::OrderPlaced { total_cents, .. }) => Reaction::new()
                .record(CheckoutEvent::CheckoutStarted {
                    order_id: order_id.clone(),
                    total_cents: *total_cents,
                })
                .send(&ChargePayment {
                    order_id,
                    amount_cents: *total_cents,
                })
                .schedule(
                    "payment",
                    self.payment_timeout,
                    &CheckoutTimeout::PaymentDue,
                ),
            (Stage::AwaitingPayment, In::PaymentCharged { amount_cents }) => Reaction::new()
                .record(CheckoutEvent::PaymentConfirmed {
                    amount_cents: *amount_cents,
                })
                .cancel("payment")
                .send(&RecordPayment {
                    order_id,
                    amount_cents: *amount_cents,
                }),
            (Stage::Paid, In::PaymentReceived { .. }) => {
                Reaction::new().send(&ShipOrder { order_id })
            }
            (Stage::Paid, In::OrderShipped) => {
                Reaction::new().record(CheckoutEvent::CheckoutCompleted)
            }
            (Stage::AwaitingPayment, In::PaymentDeclined { reason }) => {
                self.compensate(format!("payment declined: {reason}"))
            }
            (Stage::AwaitingPayment | Stage::Paid, In::OrderCanceled { reason }) => {
                // Canceled by the customer: the order is canceled already; undo the payment.
                let mut reaction = Reaction::new()
                    .record(CheckoutEvent::CheckoutCompensated {
                        reason: reason.clone(),
                    })
                    .cancel("payment");
                if self.charged_cents > 0 {
                    reaction = self.refund(reaction, self.charged_cents);
                }
                reaction
            }
            (Stage::Compensated, In::PaymentCharged { amount_cents }) if !self.refund_requested => {
                // The charge came after the checkout gave up on it.
                self.refund(Reaction::new(), *amount_cents)
            }
            _ => Reaction::new(),
        })
    }

    fn on_timeout(
        &self,
        _key: &str,
        timeout: CheckoutTimeout,
    ) -> Result<Reaction<Self>, CheckoutError> {
        Ok(match (self.stage, timeout) {
            (CheckoutStage::AwaitingPayment, CheckoutTimeout::PaymentDue) => {
                self.compensate(format!(
                    "payment not received within {} ms",
                    self.payment_timeout.as_millis()
                ))
            }
            _ => Reaction::new(),
        })
    }

    fn evolve(&mut self, event: &CheckoutEvent) {
        match event {
            CheckoutEvent::CheckoutStarted { order_id, .. } => {
                self.order_id.clone_from(order_id);
                self.stage = CheckoutStage::AwaitingPayment;
            }
            CheckoutEvent::PaymentConfirmed { amount_cents } => {
                self.charged_cents = *amount_cents;
                self.stage = CheckoutStage::Paid;
            }
            CheckoutEvent::CheckoutCompleted => self.stage = CheckoutStage::Completed,
            CheckoutEvent::CheckoutCompensated { reason } => {
                self.compensation_reason = Some(reason.clone());
                self.stage = CheckoutStage::Compensated;
            }
            CheckoutEvent::RefundRequested { .. } => self.refund_requested = true,
        }
    }
}

/// What the payment gateway says a customer can pay for an order, in cents. It may take its
/// time (the checkout's timeout covers a gateway that never answers).
pub trait PaymentGateway: Send + Sync + 'static {
    /// The cents available for `order_id`.
    fn available_cents<'a>(&'a self, order_id: &'a str) -> BoxFuture<'a, u64>;
}

/// Options of a command executed for a message: its correlation id, caused by it, and at
/// most once per message id (the saga re-sends a command with the same id after a restart).
fn caused_by(context: &MessageContext) -> ExecuteOptions {
    let mut options = ExecuteOptions::new()
        .with_causation_id(context.message_id.to_string())
        .with_idempotency_key(format!("{}/{}", context.topic, context.message_id))
        .with_conflict_retries(3);
    if let Some(correlation_id) = context.correlation_id() {
        options = options.with_correlation_id(correlation_id);
    }
    options
}

/// Executes `command` on the aggregate `id` for the message of `context`, and makes the
/// outcome a handler result: a refusal by the aggregate is the answer (logged, acked — e.g.
/// shipping an order canceled meanwhile), anything else is retried.
async fn execute<A: Aggregate>(
    repository: &Repository<A>,
    id: &str,
    command: A::Command,
    context: &MessageContext,
) -> Result<(), HandlerError> {
    match repository.execute(id, command, caused_by(context)).await {
        Ok(_) => Ok(()),
        Err(ExecuteError::Rejected(reason)) => {
            let message_type = context.message_type().unwrap_or_default();
            tracing::info!(command = message_type, %reason, "command refused by its aggregate");
            Ok(())
        }
        Err(other) => Err(HandlerError::new(other)),
    }
}

/// Adds the handlers of the checkout's commands to `processor`: they execute on the
/// [`Order`] and [`Payment`] aggregates in `store`; charges ask `gateway`.
pub fn register_handlers(
    processor: &mut CommandProcessor,
    store: Arc<dyn EventStore>,
    gateway: Arc<dyn PaymentGateway>,
) -> Result<(), RegisterError> {
    let orders = Repository::<Order>::new(store.clone());
    let payments = Repository::<Payment>::new(store);
    {
        let payments = payments.clone();
        processor.add_handler(move |command: ChargePayment, context: MessageContext| {
            let payments = payments.clone();
            let gateway = gateway.clone();
            async move {
                let available_cents = gateway.available_cents(&command.order_id).await;
                let charge = PaymentCommand::Charge {
                    amount_cents: command.amount_cents,
                    available_cents,
                };
                execute(&payments, &command.order_id, charge, &context).await
            }
        })?;
    }
    processor.add_handler(move |command: RefundPayment, context: MessageContext| {
        let payments = payments.clone();
        async move {
            execute(
                &payments,
                &command.order_id,
                PaymentCommand::Refund,
                &context,
            )
            .await
        }
    })?;
    {
        let orders = orders.clone();
        processor.add_handler(move |command: RecordPayment, context: MessageContext| {
            let orders = orders.clone();
            async move {
                let pay = OrderCommand::ReceivePayment {
                    amount_cents: command.amount_cents,
                };
                execute(&orders, &command.order_id, pay, &context).await
            }
        })?;
    }
    {
        let orders = orders.clone();
        processor.add_handler(move |command: ShipOrder, context: MessageContext| {
            let orders = orders.clone();
            async move {
                execute(
                    &orders,
                    &command.order_id,
                    OrderCommand::ShipOrder,
                    &context,
                )
                .await
            }
        })?;
    }
    processor.add_handler(move |command: CancelOrder, context: MessageContext| {
        let orders = orders.clone();
        async move {
            let cancel = OrderCommand::CancelOrder {
                reason: command.reason,
            };
            execute(&orders, &command.order_id, cancel, &context).await
        }
    })?;
    Ok(())
}
