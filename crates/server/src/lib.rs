//! factline's HTTP/JSON API: the only crate that knows HTTP.
//!
//! [`Server::bind`] takes any [`EventStore`] (the embedded log by default, in `factline serve`)
//! and serves the API of `docs/design/http-api.md`:
//!
//! - `POST /streams/{stream}` appends (header `Expected-Version`), `POST /append` appends to
//!   several streams atomically, `GET /streams/{stream}` and `GET /all` read pages;
//! - `GET /streams/{stream}/subscribe` and `GET /all/subscribe` are Server-Sent Events with
//!   `id:` = position and `Last-Event-ID` resume; a slow client is backpressured (the
//!   subscription reads the store only as fast as the client takes events), never buffered;
//! - `DELETE /streams/{stream}` (soft, or `?hard=true` for a tombstone),
//!   `GET|PUT /streams/{stream}/metadata`, `GET /health`, `GET /metrics` (Prometheus) and
//!   `GET /openapi.json`, generated from the handlers themselves.
//!
//! Errors are JSON `{"error": code, "message": text, ...}` with a 4xx status; a 5xx other than
//! `503 store_unavailable` is a bug. Every input has a limit ([`ServerOptions`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use factline_server::{Server, ServerOptions};
//!
//! let store = Arc::new(factline_core::InMemoryStore::new());
//! let server = Server::bind(store, ServerOptions::default()).await?;
//! println!("listening on http://{}", server.local_addr());
//! server.run(std::future::pending()).await?;
//! # Ok(()) }
//! ```

mod api;
mod auth;
pub mod client;
mod error;
mod json;
mod metrics;
mod persistent;
mod sse;
mod tls;
mod ui;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use factline_core::{
    CheckpointStore, EventStore, SnapshotStore, persistent::PersistentSubscriptions,
};
use tokio::sync::{Semaphore, watch};

/// What the server serves: an event store with its snapshot store (every backend is both).
pub trait Store: EventStore + SnapshotStore + 'static {}
impl<T: EventStore + SnapshotStore + 'static> Store for T {}

pub use auth::{AuthConfig, AuthConfigError, TOKEN_BYTES_MIN, TOKENS_MAX, TokenConfig};
pub use error::ErrorCode;
pub use tls::{TlsConfig, TlsConfigError};

/// How the server listens and the limits it keeps.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerOptions {
    /// Address to listen on. Default `127.0.0.1:7610`.
    pub listen: SocketAddr,
    /// Bearer-token authorization; `None` (the default) lets every caller do everything, which
    /// [`Server::bind`] allows only on a loopback address unless `insecure` is set.
    pub auth: Option<AuthConfig>,
    /// Listen on a non-loopback address without auth.
    pub insecure: bool,
    /// Largest request body in bytes. Default 16 MiB.
    pub body_bytes_max: usize,
    /// Most concurrent SSE subscribers. Default 1,024.
    pub subscribers_max: usize,
    /// Interval of SSE keep-alive comments. Default 15 s.
    pub sse_keep_alive_ms: u64,
    /// Events per page of a read when the request gives no `limit`. Default 100.
    pub read_limit_default: usize,
    /// Serve HTTPS with this certificate and key (rustls) instead of plain HTTP.
    pub tls: Option<TlsConfig>,
    /// The checkpoint store of the store's backend, listed in the web UI (how far each
    /// projection, process manager or subscriber has come). `None`: not shown.
    pub checkpoints: Option<SharedCheckpoints>,
}

/// A [`CheckpointStore`] shared with the server.
#[derive(Clone)]
pub struct SharedCheckpoints(pub Arc<dyn CheckpointStore>);

impl std::fmt::Debug for SharedCheckpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedCheckpoints").finish_non_exhaustive()
    }
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7610)),
            auth: None,
            insecure: false,
            body_bytes_max: 16 * 1024 * 1024,
            subscribers_max: 1024,
            sse_keep_alive_ms: 15_000,
            read_limit_default: 100,
            tls: None,
            checkpoints: None,
        }
    }
}

impl ServerOptions {
    /// Listens on `listen`.
    #[must_use]
    pub fn listen(mut self, listen: SocketAddr) -> Self {
        self.listen = listen;
        self
    }

    /// Requires bearer tokens as configured in `auth`.
    #[must_use]
    pub fn auth(mut self, auth: AuthConfig) -> Self {
        self.auth = Some(auth);
        self
    }

    /// Allows a non-loopback address without auth.
    #[must_use]
    pub fn insecure(mut self, insecure: bool) -> Self {
        self.insecure = insecure;
        self
    }

    /// Sets the largest request body.
    #[must_use]
    pub fn body_bytes_max(mut self, body_bytes_max: usize) -> Self {
        self.body_bytes_max = body_bytes_max;
        self
    }

    /// Sets the most concurrent SSE subscribers.
    #[must_use]
    pub fn subscribers_max(mut self, subscribers_max: usize) -> Self {
        self.subscribers_max = subscribers_max;
        self
    }

    /// Serves HTTPS with `tls`.
    #[must_use]
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Lists the checkpoints of `checkpoints` in the web UI.
    #[must_use]
    pub fn checkpoints(mut self, checkpoints: Arc<dyn CheckpointStore>) -> Self {
        self.checkpoints = Some(SharedCheckpoints(checkpoints));
        self
    }

    /// Sets the SSE keep-alive interval.
    #[must_use]
    pub fn sse_keep_alive_ms(mut self, sse_keep_alive_ms: u64) -> Self {
        self.sse_keep_alive_ms = sse_keep_alive_ms;
        self
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// Refused to listen on a non-loopback address without auth.
    #[error(
        "refusing to listen on {listen} without auth: it is not a loopback address; give an auth \
         config (--auth FILE) or pass --insecure to accept unauthenticated access"
    )]
    InsecureListen {
        /// The address.
        listen: SocketAddr,
    },
    /// An option has a value it may not have.
    #[error("invalid server option {option}: {reason}")]
    InvalidOption {
        /// The option's name.
        option: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// The TLS certificate or key was refused.
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
    /// Binding the address failed.
    #[error("cannot listen on {listen}: {source}")]
    Bind {
        /// The address.
        listen: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("the server failed: {0}")]
    Io(#[from] std::io::Error),
}

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) auth: Option<Arc<AuthConfig>>,
    pub(crate) options: Arc<ServerOptions>,
    pub(crate) subscribers: Arc<Semaphore>,
    /// Set to `true` when the server shuts down; SSE subscriptions end on it.
    pub(crate) shutdown: Arc<watch::Sender<bool>>,
    /// The store's persistent subscription groups, opened at bind or on first use.
    pub(crate) persistent: Arc<tokio::sync::OnceCell<PersistentSubscriptions>>,
    /// Who connected each persistent consumer this server serves (only they may settle).
    pub(crate) consumer_owners: persistent::ConsumerOwners,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// A bound server, ready to [`run`](Server::run).
#[derive(Debug)]
pub struct Server {
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: axum::Router,
    shutdown: Arc<watch::Sender<bool>>,
    persistent: Arc<tokio::sync::OnceCell<PersistentSubscriptions>>,
}

impl Server {
    /// Checks `options`, binds the listening socket and builds the routes.
    pub async fn bind(store: Arc<dyn Store>, options: ServerOptions) -> Result<Self, ServeError> {
        if options.auth.is_none() && !options.listen.ip().is_loopback() && !options.insecure {
            return Err(ServeError::InsecureListen {
                listen: options.listen,
            });
        }
        if options.body_bytes_max == 0 {
            return Err(ServeError::InvalidOption {
                option: "body_bytes_max",
                reason: "must be at least 1",
            });
        }
        if options.read_limit_default == 0
            || options.read_limit_default > store.limits().read_count_max
        {
            return Err(ServeError::InvalidOption {
                option: "read_limit_default",
                reason: "must be in 1..=read_count_max",
            });
        }
        let tls = options.tls.as_ref().map(TlsConfig::load).transpose()?;
        let listen = options.listen;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|source| ServeError::Bind { listen, source })?;
        let shutdown = Arc::new(watch::Sender::new(false));
        // Groups recorded in the store start delivering as soon as consumers connect; a store
        // whose registry cannot be read still serves everything else (and says why here and
        // on every /subscriptions request).
        let persistent = Arc::new(tokio::sync::OnceCell::new());
        let event_store: Arc<dyn EventStore> = store.clone();
        match PersistentSubscriptions::open(event_store).await {
            Ok(groups) => {
                let _ = persistent.set(groups);
            }
            Err(error) => {
                tracing::error!(error = %error, "persistent subscriptions could not be opened");
            }
        }
        let router = router(
            store,
            options,
            Arc::clone(&shutdown),
            Arc::clone(&persistent),
        );
        Ok(Self {
            listener,
            tls,
            router,
            shutdown,
            persistent,
        })
    }

    /// The address the server listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Serves until `shutdown` completes, then stops accepting, ends every SSE subscription and
    /// waits for the requests in flight.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let Self {
            listener,
            tls,
            router,
            shutdown: stop,
            persistent,
        } = self;
        let address = listener.local_addr()?;
        let graceful = async move {
            shutdown.await;
            tracing::info!("shutting down: no new requests; ending subscriptions");
            stop.send_replace(true);
        };
        match tls {
            None => {
                tracing::info!(%address, "factline server listening (http)");
                axum::serve(listener, router.into_make_service())
                    .with_graceful_shutdown(graceful)
                    .await?;
            }
            Some(config) => {
                tracing::info!(%address, "factline server listening (https)");
                let listener = tls::TlsListener::new(listener, config)?;
                axum::serve(listener, router.into_make_service())
                    .with_graceful_shutdown(graceful)
                    .await?;
            }
        }
        if let Some(groups) = persistent.get() {
            // Saves every group's checkpoint.
            groups.shutdown().await;
        }
        Ok(())
    }
}

/// The API's routes over `store`, for embedding in another axum application (no listener,
/// no shutdown signal: subscriptions end when their client goes away).
pub fn app(store: Arc<dyn Store>, options: ServerOptions) -> axum::Router {
    router(
        store,
        options,
        Arc::new(watch::Sender::new(false)),
        Arc::new(tokio::sync::OnceCell::new()),
    )
}

fn router(
    store: Arc<dyn Store>,
    options: ServerOptions,
    shutdown: Arc<watch::Sender<bool>>,
    persistent: Arc<tokio::sync::OnceCell<PersistentSubscriptions>>,
) -> axum::Router {
    // Install the recorder before the first request, so the store's metrics count from here.
    let _ = metrics::handle();
    let state = AppState {
        store,
        auth: options.auth.clone().map(Arc::new),
        subscribers: Arc::new(Semaphore::new(options.subscribers_max)),
        options: Arc::new(options),
        shutdown,
        persistent,
        consumer_owners: persistent::ConsumerOwners::default(),
    };
    let ui = ui::routes(state.clone());
    api::routes(state).merge(ui)
}

/// `event` in the API's JSON shape, as reads and subscriptions answer it (`{"id", "stream",
/// "type", "revision", "position", "recorded_at", "content_type", "data", ...}`).
pub fn event_to_json(event: &factline_core::RecordedEvent) -> serde_json::Value {
    serde_json::to_value(json::EventJson::from(event)).unwrap_or(serde_json::Value::Null)
}

/// A recorded event from the API's JSON shape (what [`event_to_json`] writes); `Err` says what
/// is wrong.
pub fn event_from_json(text: &str) -> Result<factline_core::RecordedEvent, String> {
    let json: json::EventJson = serde_json::from_str(text).map_err(|error| error.to_string())?;
    json.into_recorded()
}

/// An event to append from the API's JSON shape (`{"id"?, "type", "data" | "data_base64",
/// "content_type"?, "metadata"?}`); `Err` says what is wrong.
pub fn new_event_from_json(text: &str) -> Result<factline_core::EventData, String> {
    let event: json::NewEvent = serde_json::from_str(text).map_err(|error| error.to_string())?;
    event
        .into_event_data(0)
        .map_err(|error| error.body().message)
}

/// The OpenAPI 3 document of the API, as served at `/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api::openapi()
}

pub(crate) fn keep_alive(options: &ServerOptions) -> Duration {
    Duration::from_millis(options.sse_keep_alive_ms.max(1))
}
