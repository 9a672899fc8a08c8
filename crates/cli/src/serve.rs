//! `factline serve`: the HTTP API on the embedded log, or on PostgreSQL with `--store`.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::{Context as _, bail};
use factline_log::{DiskStorage, LogOptions, LogStore};
use factline_postgres::{PostgresOptions, PostgresStore, SchemaName};
use factline_server::{AuthConfig, Server, ServerOptions, TlsConfig};

/// Options of `factline serve`.
#[derive(Debug, clap::Args)]
pub(crate) struct ServeArgs {
    /// The data directory of the embedded store (created if missing).
    #[arg(long, default_value = "./factline-data", env = "FACTLINE_DATA")]
    data: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7610", env = "FACTLINE_LISTEN")]
    listen: SocketAddr,
    /// Use PostgreSQL instead of the data directory: postgres://user:password@host:port/db.
    /// Missing migrations are applied at start (see `factline migrate`).
    #[arg(long, env = "FACTLINE_STORE")]
    store: Option<String>,
    /// The PostgreSQL schema holding the store (with --store).
    #[arg(long, default_value = "factline", env = "FACTLINE_PG_SCHEMA")]
    pg_schema: String,
    /// With --store: refuse to start on a schema that needs migrations instead of applying them.
    #[arg(long)]
    no_migrate: bool,
    /// Bearer-token configuration (TOML; see docs/design/http-api.md). Without it every caller
    /// may do everything, which is allowed only on a loopback address.
    #[arg(long, env = "FACTLINE_AUTH")]
    auth: Option<PathBuf>,
    /// Allow listening on a non-loopback address without --auth.
    #[arg(long)]
    insecure: bool,
    /// Serve HTTPS: PEM file with the certificate chain (with --tls-key).
    #[arg(long, requires = "tls_key", env = "FACTLINE_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Serve HTTPS: PEM file with the private key (with --tls-cert).
    #[arg(long, requires = "tls_cert", env = "FACTLINE_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    body_bytes_max: usize,
    /// Most concurrent SSE subscriptions.
    #[arg(long, default_value_t = 1024)]
    subscribers_max: usize,
    /// Seconds between SSE keep-alive comments.
    #[arg(long, default_value_t = 15)]
    keep_alive_s: u64,
    /// Check every record's CRC at open, also those the index checkpoint covers.
    #[arg(long)]
    verify_on_open: bool,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

pub(crate) fn run(args: ServeArgs) -> anyhow::Result<()> {
    init_tracing(args.log_json);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("factline-serve")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FACTLINE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let postgres = match &args.store {
        Some(url) if is_postgres_url(url) => {
            Some(postgres_options(url, &args.pg_schema, !args.no_migrate)?)
        }
        Some(other) => bail!(
            "--store {}: unknown store (give postgres://… or leave it out for the data directory)",
            factline_postgres::redact_url(other)
        ),
        None => None,
    };
    let mut options = ServerOptions::default()
        .listen(args.listen)
        .insecure(args.insecure)
        .body_bytes_max(args.body_bytes_max)
        .subscribers_max(args.subscribers_max)
        .sse_keep_alive_ms(args.keep_alive_s.saturating_mul(1000));
    if let Some(path) = &args.auth {
        options = options.auth(AuthConfig::load(path)?);
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        options = options.tls(TlsConfig::new(cert, key));
    }
    if let Some(postgres) = postgres {
        let url = factline_postgres::redact_url(&postgres.url);
        let schema = postgres.schema.clone();
        let store = PostgresStore::open(postgres)
            .await
            .with_context(|| format!("opening the PostgreSQL store at {url} (schema {schema})"))?;
        let options = options.checkpoints(Arc::new(store.checkpoints()));
        let server = Server::bind(Arc::new(store.clone()), options).await?;
        tracing::info!(
            address = %server.local_addr(),
            store = %url,
            schema = %schema,
            auth = args.auth.is_some(),
            "factline is serving on PostgreSQL: the web UI and API at {}://{} (OpenAPI document at /openapi.json)",
            if args.tls_cert.is_some() { "https" } else { "http" },
            server.local_addr()
        );
        server.run(shutdown_signal()).await?;
        store.close().await;
        tracing::info!("stopped; the PostgreSQL pool is closed");
        return Ok(());
    }
    let mut log_options = LogOptions::default();
    log_options.verify_on_open = args.verify_on_open;
    let (store, report) = LogStore::open_with(Arc::new(DiskStorage), &args.data, log_options)
        .await
        .with_context(|| format!("opening the data directory {}", args.data.display()))?;
    for repair in &report.repairs {
        tracing::warn!(
            ?repair,
            "repaired while opening: what was cut was never acknowledged, provided the disk \
             kept what fdatasync reported as synced (run `factline verify` if in doubt)"
        );
    }
    let options = options.checkpoints(Arc::new(store.checkpoints()));
    let server = Server::bind(Arc::new(store.clone()), options).await?;
    tracing::info!(
        address = %server.local_addr(),
        data = %args.data.display(),
        events = report.events,
        auth = args.auth.is_some(),
        "factline is serving: the web UI and API at {}://{} (OpenAPI document at /openapi.json)",
        if args.tls_cert.is_some() { "https" } else { "http" },
        server.local_addr()
    );
    server.run(shutdown_signal()).await?;
    store.close().await;
    tracing::info!("stopped; the data directory is closed");
    Ok(())
}

/// True for a PostgreSQL connection URL.
pub(crate) fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Options for the PostgreSQL store at `url` in `schema`.
pub(crate) fn postgres_options(
    url: &str,
    schema: &str,
    migrate: bool,
) -> anyhow::Result<PostgresOptions> {
    let schema = SchemaName::new(schema).context("--pg-schema")?;
    Ok(PostgresOptions::new(url)
        .schema(schema)
        .migrate_on_open(migrate))
}

/// Options of `factline migrate`.
#[derive(Debug, clap::Args)]
pub(crate) struct MigrateArgs {
    /// The PostgreSQL database: postgres://user:password@host:port/db.
    #[arg(long, env = "FACTLINE_STORE")]
    store: String,
    /// The schema holding the store.
    #[arg(long, default_value = "factline", env = "FACTLINE_PG_SCHEMA")]
    pg_schema: String,
    /// Only list the migrations and which are applied; change nothing.
    #[arg(long)]
    dry_run: bool,
}

/// `factline migrate`: applies the missing migrations of a PostgreSQL store's schema.
#[allow(clippy::print_stdout)] // the command's output is its report
pub(crate) fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    if !is_postgres_url(&args.store) {
        bail!(
            "--store {}: give a postgres:// URL (the embedded data directory needs no migrations)",
            factline_postgres::redact_url(&args.store)
        );
    }
    let options = postgres_options(&args.store, &args.pg_schema, true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let url = factline_postgres::redact_url(&args.store);
    runtime.block_on(async {
        let known = factline_postgres::schema::MIGRATIONS;
        if args.dry_run {
            let applied = factline_postgres::applied_migrations(&options)
                .await
                .with_context(|| format!("reading the migrations of {url}"))?;
            for migration in known {
                let state = if applied.contains(&migration.version) {
                    "applied"
                } else {
                    "pending"
                };
                println!(
                    "{:>4}  {state:<8} {}",
                    migration.version, migration.description
                );
            }
            return Ok(());
        }
        let applied = factline_postgres::migrate(&options)
            .await
            .with_context(|| format!("migrating schema {} at {url}", args.pg_schema))?;
        for migration in &applied {
            let state = if migration.applied_now {
                "applied now"
            } else {
                "already applied"
            };
            println!(
                "{:>4}  {state:<16} {}",
                migration.version, migration.description
            );
        }
        let now = applied.iter().filter(|m| m.applied_now).count();
        println!(
            "schema {} is at migration {} ({now} applied now)",
            args.pg_schema,
            factline_postgres::schema::latest_version()
        );
        Ok(())
    })
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
