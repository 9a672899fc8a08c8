//! Read models of the orders example, each a [`Projection`] over the order events of `$all`:
//!
//! - [`OrderSummaries`]: one row per order — customer, status, total, paid;
//! - [`CustomerHistory`]: per customer, what happened to their orders, in order;
//! - [`DailyRevenue`]: payments received per UTC day.
//!
//! Each is an [`OrderModel`] fed by an [`OrderProjection`], which keeps the model behind a
//! shared handle ([`OrderProjection::view`]) so that readers
//! query it while a [`factline::domain::ProjectionRunner`] feeds it. They live in memory, so
//! they are rebuilt at start: run them with an in-memory checkpoint store (a durable checkpoint
//! would make a fresh, empty model skip what it never saw). The runner delivers each event at
//! least once; every model ignores positions it has applied already, so a redelivery is
//! harmless.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
};

use factline::{
    EventFilter, Position, RecordedEvent,
    domain::{Projection, stream_id_for},
};

use crate::{Order, OrderEvent, OrderStatus};

/// A read model cannot fail on an order event; this is never produced.
#[derive(Debug, thiserror::Error)]
#[error("unreachable")]
pub enum Never {}

/// The id of the order whose stream `recorded` is in (`order-42` → `42`).
fn order_id(recorded: &RecordedEvent) -> String {
    let stream = recorded.stream.as_str();
    stream.strip_prefix("order-").unwrap_or(stream).to_owned()
}

/// Only the order streams.
fn orders_filter() -> EventFilter {
    EventFilter::all().category(
        stream_id_for::<Order>("x")
            .map(|stream| stream.category().to_owned())
            .unwrap_or_else(|_| "order".to_owned()),
    )
}

/// A read model of order events: how one event changes it.
pub trait OrderModel: Default + Send + Sync + 'static {
    /// Applies `event`, recorded as `recorded`.
    fn apply(&mut self, event: OrderEvent, recorded: &RecordedEvent);
}

/// A model and the last position it applied.
#[derive(Debug, Default)]
struct Applied<M> {
    model: M,
    last: Option<Position>,
}

/// The [`Projection`] of an [`OrderModel`]: the order streams of `$all`, each position applied
/// once however often it is delivered.
#[derive(Debug)]
pub struct OrderProjection<M> {
    name: String,
    model: Arc<RwLock<Applied<M>>>,
}

impl<M: OrderModel> OrderProjection<M> {
    /// An empty model; `name` keys its checkpoint (give a rebuild a new one).
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            model: Arc::default(),
        }
    }

    /// A handle to query the model while it is fed.
    pub fn view(&self) -> View<M> {
        View(Arc::clone(&self.model))
    }
}

/// Queries of a model (see the `impl`s per model).
#[derive(Debug)]
pub struct View<M>(Arc<RwLock<Applied<M>>>);

impl<M> Clone for View<M> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<M> View<M> {
    fn read<R>(&self, query: impl FnOnce(&M) -> R) -> R {
        let applied = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        query(&applied.model)
    }
}

impl<M: OrderModel> Projection for OrderProjection<M> {
    type Event = OrderEvent;
    type Error = Never;

    fn name(&self) -> &str {
        &self.name
    }

    fn filter(&self) -> EventFilter {
        orders_filter()
    }

    async fn apply(&mut self, event: OrderEvent, recorded: &RecordedEvent) -> Result<(), Never> {
        let mut applied = self
            .model
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if applied.last.is_some_and(|last| recorded.position <= last) {
            return Ok(()); // delivered again: applied already
        }
        applied.last = Some(recorded.position);
        applied.model.apply(event, recorded);
        Ok(())
    }
}

/// One order as the summary shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderSummary {
    /// Who ordered.
    pub customer_id: String,
    /// Where the order is.
    pub status: OrderStatus,
    /// What it costs, in cents.
    pub total_cents: u64,
    /// What has been paid, in cents.
    pub paid_cents: u64,
}

/// One row per order.
#[derive(Debug, Default)]
pub struct Summaries {
    orders: BTreeMap<String, OrderSummary>,
}

/// The order summaries as a projection.
pub type OrderSummaries = OrderProjection<Summaries>;

impl View<Summaries> {
    /// The summary of order `id`.
    pub fn order(&self, id: &str) -> Option<OrderSummary> {
        self.read(|model| model.orders.get(id).cloned())
    }

    /// Every order, by id.
    pub fn all(&self) -> BTreeMap<String, OrderSummary> {
        self.read(|model| model.orders.clone())
    }
}

impl OrderModel for Summaries {
    fn apply(&mut self, event: OrderEvent, recorded: &RecordedEvent) {
        let id = order_id(recorded);
        if let OrderEvent::OrderPlaced {
            customer_id,
            total_cents,
        } = event
        {
            self.orders.insert(
                id,
                OrderSummary {
                    customer_id,
                    status: OrderStatus::Placed,
                    total_cents,
                    paid_cents: 0,
                },
            );
            return;
        }
        let Some(order) = self.orders.get_mut(&id) else {
            return; // never placed
        };
        match event {
            OrderEvent::OrderPlaced { .. } => {}
            OrderEvent::PaymentReceived { amount_cents } => order.paid_cents += amount_cents,
            OrderEvent::OrderShipped => order.status = OrderStatus::Shipped,
            OrderEvent::OrderCanceled { .. } => order.status = OrderStatus::Canceled,
        }
    }
}

/// One line of a customer's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// The order.
    pub order_id: String,
    /// What happened (the event type).
    pub what: &'static str,
    /// When, RFC 3339 UTC.
    pub recorded_at: String,
}

/// Per customer, what happened to their orders.
#[derive(Debug, Default)]
pub struct Histories {
    by_customer: HashMap<String, Vec<HistoryEntry>>,
    /// Whose each order is: only `OrderPlaced` names the customer.
    customer_of: HashMap<String, String>,
}

/// The customer histories as a projection.
pub type CustomerHistory = OrderProjection<Histories>;

impl View<Histories> {
    /// The history of `customer_id`, oldest first.
    pub fn of(&self, customer_id: &str) -> Vec<HistoryEntry> {
        self.read(|model| {
            model
                .by_customer
                .get(customer_id)
                .cloned()
                .unwrap_or_default()
        })
    }
}

impl OrderModel for Histories {
    fn apply(&mut self, event: OrderEvent, recorded: &RecordedEvent) {
        let id = order_id(recorded);
        if let OrderEvent::OrderPlaced { customer_id, .. } = &event {
            self.customer_of.insert(id.clone(), customer_id.clone());
        }
        let Some(customer) = self.customer_of.get(&id).cloned() else {
            return; // an order that was never placed has no customer
        };
        self.by_customer
            .entry(customer)
            .or_default()
            .push(HistoryEntry {
                order_id: id,
                what: factline::domain::DomainEvent::event_type(&event),
                recorded_at: recorded.recorded_at.to_rfc3339(),
            });
    }
}

/// Payments received per UTC day (`YYYY-MM-DD`), in cents.
#[derive(Debug, Default)]
pub struct Revenue {
    by_day: BTreeMap<String, u64>,
}

/// The daily revenue as a projection.
pub type DailyRevenue = OrderProjection<Revenue>;

impl View<Revenue> {
    /// Cents received on each day, by day.
    pub fn by_day(&self) -> BTreeMap<String, u64> {
        self.read(|model| model.by_day.clone())
    }
}

impl OrderModel for Revenue {
    fn apply(&mut self, event: OrderEvent, recorded: &RecordedEvent) {
        if let OrderEvent::PaymentReceived { amount_cents } = event {
            let day: String = recorded.recorded_at.to_rfc3339().chars().take(10).collect();
            *self.by_day.entry(day).or_default() += amount_cents;
        }
    }
}
