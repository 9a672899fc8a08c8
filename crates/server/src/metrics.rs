//! Prometheus metrics. The server installs the `metrics` crate's global recorder (once per
//! process); the storage engine records into the same facade (`factline_log_*`: commit groups,
//! events and bytes written, fsync latency), so `/metrics` shows both.
//!
//! Server metrics:
//! - `factline_http_requests_total{method,route,status}` and
//!   `factline_http_request_duration_seconds{method,route}`;
//! - `factline_http_errors_total{code}`;
//! - `factline_http_appended_events_total`, `factline_http_appended_bytes_total`;
//! - `factline_sse_subscribers` (open SSE subscriptions), `factline_sse_events_sent_total`,
//!   `factline_sse_delivery_lag_seconds` (recorded time to the moment an event is handed to the
//!   connection; catch-up deliveries show as large lags).

use std::{
    sync::OnceLock,
    time::{Duration, SystemTime},
};

use factline_core::Timestamp;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::error::ErrorCode;

/// Histogram buckets, in seconds: 10 µs to 30 s.
const BUCKETS_SECONDS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How often histograms are drained when nobody scrapes (bounds their memory).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder the first time; `None` when another recorder was installed
/// by the embedding application (then `/metrics` reports that it has nothing).
pub(crate) fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE.get_or_init(install).as_ref()
}

fn install() -> Option<PrometheusHandle> {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), BUCKETS_SECONDS)
        .ok()?;
    match builder.install_recorder() {
        Ok(handle) => {
            let upkeep = handle.clone();
            let started = std::thread::Builder::new()
                .name("factline-metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(UPKEEP_INTERVAL);
                        upkeep.run_upkeep();
                    }
                });
            if let Err(error) = started {
                tracing::warn!(%error, "cannot start the metrics upkeep thread");
            }
            Some(handle)
        }
        Err(error) => {
            tracing::warn!(%error, "another metrics recorder is installed; /metrics stays empty");
            None
        }
    }
}

pub(crate) fn render() -> String {
    handle().map(PrometheusHandle::render).unwrap_or_default()
}

pub(crate) fn http_request(method: &str, route: &str, status: u16, elapsed: Duration) {
    let labels = [
        ("method", method.to_owned()),
        ("route", route.to_owned()),
        ("status", status.to_string()),
    ];
    metrics::counter!("factline_http_requests_total", &labels).increment(1);
    metrics::histogram!(
        "factline_http_request_duration_seconds",
        "method" => method.to_owned(),
        "route" => route.to_owned()
    )
    .record(elapsed.as_secs_f64());
}

pub(crate) fn error_returned(code: ErrorCode) {
    metrics::counter!("factline_http_errors_total", "code" => code.as_str()).increment(1);
}

pub(crate) fn events_appended(events: usize, bytes: usize) {
    metrics::counter!("factline_http_appended_events_total").increment(events as u64);
    metrics::counter!("factline_http_appended_bytes_total").increment(bytes as u64);
}

pub(crate) fn event_sent(recorded_at: Timestamp) {
    metrics::counter!("factline_sse_events_sent_total").increment(1);
    let now_micros = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_micros() as i64);
    let lag_micros = now_micros
        .saturating_sub(recorded_at.as_unix_micros())
        .max(0);
    metrics::histogram!("factline_sse_delivery_lag_seconds").record(lag_micros as f64 / 1e6);
}

/// Counts one open SSE subscription while alive.
#[derive(Debug)]
pub(crate) struct SubscriberGauge(());

impl SubscriberGauge {
    pub(crate) fn open() -> Self {
        metrics::gauge!("factline_sse_subscribers").increment(1.0);
        Self(())
    }
}

impl Drop for SubscriberGauge {
    fn drop(&mut self) {
        metrics::gauge!("factline_sse_subscribers").decrement(1.0);
    }
}
