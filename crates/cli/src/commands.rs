//! The commands that work on a store: append, read, read-all, tail, delete, metadata, export and
//! import. Each talks to a server over HTTP (`--server`, the default being the address
//! `factline serve` listens on) or opens a data directory directly (`--data`), through the same
//! `EventStore` trait either way.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufWriter, Write as _},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use base64::Engine as _;
use factline_core::{
    AppendError, DeleteError, DeleteMode, Direction, EventData, EventFilter, EventStore,
    ExpectedVersion, Metadata, Position, ReadAllOptions, ReadStreamError, ReadStreamOptions,
    RecordedEvent, Revision, StreamId, StreamMetadata, SubscribeFrom,
};
use factline_log::LogStore;
use factline_server::{
    Store,
    client::{ClientOptions, HttpStore},
    event_from_json, event_to_json, new_event_from_json,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

/// Exit code of a wrong expected version (the stream moved on: reload and decide again).
pub(crate) const EXIT_CONFLICT: u8 = 3;
/// Exit code of a stream that does not exist (or has no visible events).
pub(crate) const EXIT_NOT_FOUND: u8 = 4;

/// Where the store is.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Target {
    /// The server to talk to.
    #[arg(long, env = "FACTLINE_SERVER", default_value = "http://127.0.0.1:7610")]
    server: String,
    /// Open this data directory directly instead of talking to a server (no server may have
    /// it open).
    #[arg(long, env = "FACTLINE_DATA")]
    data: Option<PathBuf>,
    /// Bearer token for a server with auth.
    #[arg(long, env = "FACTLINE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A PEM certificate to trust for an https:// server besides the system's roots (e.g. the
    /// server's self-signed `--tls-cert`).
    #[arg(long, env = "FACTLINE_CA_CERT", value_name = "PEM")]
    ca_cert: Option<PathBuf>,
}

/// An open store, closed cleanly at the end (a data directory releases its lock).
struct Opened {
    store: Arc<dyn Store>,
    log: Option<LogStore>,
}

impl Opened {
    async fn close(self) {
        if let Some(log) = self.log {
            log.close().await;
        }
    }
}

async fn open(target: &Target) -> anyhow::Result<Opened> {
    if let Some(dir) = &target.data {
        let log = LogStore::open(dir)
            .await
            .with_context(|| format!("opening the data directory {}", dir.display()))?;
        return Ok(Opened {
            store: Arc::new(log.clone()),
            log: Some(log),
        });
    }
    let mut options = ClientOptions::default();
    if let Some(token) = &target.token {
        options = options.token(token.clone());
    }
    if let Some(path) = &target.ca_cert {
        let pem = std::fs::read(path)
            .with_context(|| format!("reading the certificate {}", path.display()))?;
        options = options.root_certificate_pem(pem);
    }
    let store = HttpStore::connect_with(&target.server, options)
        .await
        .with_context(|| {
            format!(
                "connecting to {} (start one with `factline serve`, or give --data DIR)",
                target.server
            )
        })?;
    Ok(Opened {
        store: Arc::new(store),
        log: None,
    })
}

fn stream_id(text: &str) -> anyhow::Result<StreamId> {
    StreamId::new(text).with_context(|| format!("stream id {text:?} is not valid"))
}

fn expected_version(text: &str) -> anyhow::Result<ExpectedVersion> {
    text.parse()
        .with_context(|| format!("--expected-version {text:?}: give any, no-stream, exists or N"))
}

/// The exit code for `error`: conflicts and missing streams have their own, so scripts can
/// tell them from failures.
pub(crate) fn exit_code(error: &anyhow::Error) -> u8 {
    for cause in error.chain() {
        if let Some(
            AppendError::WrongExpectedVersion { .. } | AppendError::IdempotencyConflict { .. },
        ) = cause.downcast_ref::<AppendError>()
        {
            return EXIT_CONFLICT;
        }
        match cause.downcast_ref::<DeleteError>() {
            Some(DeleteError::WrongExpectedVersion { .. }) => return EXIT_CONFLICT,
            Some(DeleteError::NotFound { .. }) => return EXIT_NOT_FOUND,
            _ => {}
        }
        if let Some(ReadStreamError::NotFound { .. }) = cause.downcast_ref::<ReadStreamError>() {
            return EXIT_NOT_FOUND;
        }
        if cause
            .downcast_ref::<crate::checkpoints::CheckpointNotFound>()
            .is_some()
        {
            return EXIT_NOT_FOUND;
        }
    }
    1
}

// ---- printing -----------------------------------------------------------------------------

/// One event as a line: JSON (the API's shape) or `position stream@revision type data`.
fn event_line(event: &RecordedEvent, json_output: bool) -> String {
    if json_output {
        return event_to_json(event).to_string();
    }
    let data = match std::str::from_utf8(&event.data) {
        Ok(text) if event.content_type == factline_core::ContentType::Json => text.to_owned(),
        _ => format!("<{} bytes>", event.data.len()),
    };
    format!(
        "{:>8}  {}@{}  {}  {}",
        event.position.value(),
        event.stream,
        event.revision.value(),
        event.event_type,
        data
    )
}

#[allow(clippy::print_stdout)]
fn print_line(line: &str) {
    println!("{line}");
}

// ---- append -------------------------------------------------------------------------------

/// `factline append`: one event from `--type`/`--payload`, or many from `--file`.
#[derive(Debug, clap::Args)]
pub(crate) struct AppendArgs {
    #[command(flatten)]
    target: Target,
    /// The stream, e.g. order-42.
    stream: String,
    /// The event type (with --payload).
    #[arg(long = "type", value_name = "TYPE", required_unless_present = "file")]
    event_type: Option<String>,
    /// The event's JSON payload (with --type); `null` when absent.
    #[arg(long, value_name = "JSON", requires = "event_type")]
    payload: Option<String>,
    /// Metadata entries of the event (with --type), e.g. --metadata correlation_id=c-1.
    #[arg(long, value_name = "KEY=VALUE", requires = "event_type")]
    metadata: Vec<String>,
    /// The event id (with --type); a UUIDv7 when absent. Reuse it to retry idempotently.
    #[arg(long, requires = "event_type")]
    id: Option<factline_core::Uuid>,
    /// Events to append from a file ('-' for standard input): NDJSON or a JSON array of the
    /// API's event shape {"id"?, "type", "data" | "data_base64", "metadata"?}.
    #[arg(long, conflicts_with = "event_type")]
    file: Option<PathBuf>,
    /// any (default), no-stream, exists, or the revision of the stream's last event.
    #[arg(long, short = 'e', default_value = "any")]
    expected_version: String,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

fn events_to_append(args: &AppendArgs) -> anyhow::Result<Vec<EventData>> {
    if let Some(path) = &args.file {
        let text = if path.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin()).context("reading standard input")?
        } else {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        };
        return parse_new_events(&text)
            .with_context(|| format!("the events in {}", path.display()));
    }
    let event_type = args.event_type.clone().unwrap_or_default();
    let payload = args.payload.as_deref().unwrap_or("null");
    let value: Value = serde_json::from_str(payload).context("--payload is not JSON")?;
    let mut event = EventData::json(event_type, &value).context("encoding --payload")?;
    if let Some(id) = args.id {
        event = event.with_id(id);
    }
    for entry in &args.metadata {
        let (key, value) = entry
            .split_once('=')
            .with_context(|| format!("--metadata {entry:?}: give KEY=VALUE"))?;
        event = event.with_metadata(key, value);
    }
    Ok(vec![event])
}

/// NDJSON, or one JSON array, of events in the API's shape.
fn parse_new_events(text: &str) -> anyhow::Result<Vec<EventData>> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let items: Vec<Box<serde_json::value::RawValue>> =
            serde_json::from_str(trimmed).context("not a JSON array")?;
        return items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                new_event_from_json(item.get()).map_err(|e| anyhow::anyhow!("event {i}: {e}"))
            })
            .collect();
    }
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| {
            new_event_from_json(line).map_err(|e| anyhow::anyhow!("line {}: {e}", n + 1))
        })
        .collect()
}

pub(crate) async fn append(args: AppendArgs) -> anyhow::Result<()> {
    let stream = stream_id(&args.stream)?;
    let expected = expected_version(&args.expected_version)?;
    let events = events_to_append(&args)?;
    let count = events.len();
    let opened = open(&args.target).await?;
    let result = opened.store.append(&stream, expected, events).await;
    opened.close().await;
    let result = result.with_context(|| format!("appending to {stream}"))?;
    if args.json {
        print_line(
            &json!({
                "next_expected_version": result.next_expected_version.value(),
                "position": result.position.value(),
                "recorded_at": result.recorded_at.to_rfc3339(),
            })
            .to_string(),
        );
    } else {
        print_line(&format!(
            "appended {count} event(s) to {stream}: next expected version {}, position {}",
            result.next_expected_version.value(),
            result.position.value()
        ));
    }
    Ok(())
}

// ---- reads --------------------------------------------------------------------------------

/// `factline read`.
#[derive(Debug, clap::Args)]
pub(crate) struct ReadArgs {
    #[command(flatten)]
    target: Target,
    /// The stream.
    stream: String,
    #[command(flatten)]
    page: PageArgs,
}

/// Where a read starts, how much it prints and how, shared by read and read-all.
#[derive(Debug, clap::Args)]
pub(crate) struct PageArgs {
    /// First revision (read) or position (read-all) to print; default the start, or the end
    /// with --backwards.
    #[arg(long)]
    from: Option<u64>,
    /// Most events to print (default: all).
    #[arg(long)]
    limit: Option<u64>,
    /// Newest first.
    #[arg(long)]
    backwards: bool,
    /// One JSON object per line (the API's shape).
    #[arg(long)]
    json: bool,
}

impl PageArgs {
    fn direction(&self) -> Direction {
        if self.backwards {
            Direction::Backwards
        } else {
            Direction::Forwards
        }
    }
}

/// Events fetched per request.
const PAGE_EVENTS: u64 = 1_000;

pub(crate) async fn read(args: ReadArgs) -> anyhow::Result<()> {
    let stream = stream_id(&args.stream)?;
    let opened = open(&args.target).await?;
    let result = read_pages(&*opened.store, &stream, &args.page).await;
    opened.close().await;
    result
}

async fn read_pages(store: &dyn Store, stream: &StreamId, args: &PageArgs) -> anyhow::Result<()> {
    let mut left = args.limit.unwrap_or(u64::MAX);
    let mut options = ReadStreamOptions::forwards();
    options.direction = args.direction();
    if let Some(from) = args.from {
        options = options.from(Revision(from));
    }
    while left > 0 {
        let page = store
            .read_stream(stream, options.limit(left.min(PAGE_EVENTS) as usize))
            .await
            .with_context(|| format!("reading {stream}"))?;
        for event in &page.events {
            print_line(&event_line(event, args.json));
        }
        left = left.saturating_sub(page.events.len() as u64);
        if page.is_end || page.events.is_empty() {
            break;
        }
        options = options.from(page.next_revision);
    }
    Ok(())
}

/// Filters of `$all`, shared by read-all, tail and export.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct FilterArgs {
    /// Only streams whose id starts with this.
    #[arg(long)]
    prefix: Option<String>,
    /// Only streams of this category (the part of the id before the first '-').
    #[arg(long)]
    category: Option<String>,
    /// Only event types that start with this.
    #[arg(long = "type", value_name = "TYPE_PREFIX")]
    event_type: Option<String>,
}

impl FilterArgs {
    fn filter(&self) -> EventFilter {
        let mut filter = EventFilter::all();
        filter.stream_prefix.clone_from(&self.prefix);
        filter.category.clone_from(&self.category);
        filter.event_type_prefix.clone_from(&self.event_type);
        filter
    }
}

/// `factline read-all`.
#[derive(Debug, clap::Args)]
pub(crate) struct ReadAllArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    filter: FilterArgs,
    #[command(flatten)]
    page: PageArgs,
}

pub(crate) async fn read_all(args: ReadAllArgs) -> anyhow::Result<()> {
    let opened = open(&args.target).await?;
    let page = &args.page;
    let mut left = page.limit.unwrap_or(u64::MAX);
    let result = scan_all(
        &*opened.store,
        page.direction(),
        page.from.map(Position),
        args.filter.filter(),
        |event| {
            if left == 0 {
                return false;
            }
            print_line(&event_line(event, page.json));
            left -= 1;
            left > 0
        },
    )
    .await;
    opened.close().await;
    result
}

/// Reads `$all` page by page, handing each event to `each` until it returns false.
async fn scan_all(
    store: &dyn Store,
    direction: Direction,
    from: Option<Position>,
    filter: EventFilter,
    mut each: impl FnMut(&RecordedEvent) -> bool,
) -> anyhow::Result<()> {
    let mut options = ReadAllOptions {
        direction,
        from,
        limit: PAGE_EVENTS as usize,
        filter,
    };
    loop {
        let page = store
            .read_all(options.clone())
            .await
            .context("reading $all")?;
        for event in &page.events {
            if !each(event) {
                return Ok(());
            }
        }
        if page.is_end {
            return Ok(());
        }
        options.from = Some(page.next_position);
    }
}

// ---- tail ---------------------------------------------------------------------------------

/// `factline tail`.
#[derive(Debug, clap::Args)]
pub(crate) struct TailArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    filter: FilterArgs,
    /// A stream to follow (default: $all, filtered).
    stream: Option<String>,
    /// start, end (the default: only new events) or the first revision (stream) or position
    /// ($all) to print.
    #[arg(long, default_value = "end")]
    from: String,
    /// Stop after this many events (default: follow until interrupted).
    #[arg(long)]
    count: Option<u64>,
    /// One JSON object per line (the API's shape).
    #[arg(long)]
    json: bool,
}

fn subscribe_from(text: &str) -> anyhow::Result<SubscribeFrom<u64>> {
    SubscribeFrom::parse_first(text)
        .with_context(|| format!("--from {text:?}: give start, end or a number"))
}

pub(crate) async fn tail(args: TailArgs) -> anyhow::Result<()> {
    let from = subscribe_from(&args.from)?;
    let opened = open(&args.target).await?;
    let result = follow(&*opened.store, &args, from).await;
    opened.close().await;
    result
}

async fn follow(
    store: &dyn Store,
    args: &TailArgs,
    from: SubscribeFrom<u64>,
) -> anyhow::Result<()> {
    let mut subscription = match &args.stream {
        Some(stream) => {
            let stream = stream_id(stream)?;
            store
                .subscribe_to_stream(&stream, from.map(Revision))
                .await
                .with_context(|| format!("subscribing to {stream}"))?
        }
        None => store
            .subscribe_to_all(from.map(Position), args.filter.filter())
            .await
            .context("subscribing to $all")?,
    };
    let mut left = args.count.unwrap_or(u64::MAX);
    while left > 0 {
        let next = tokio::select! {
            next = subscription.next() => next,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        match next {
            Some(Ok(event)) => {
                print_line(&event_line(&event, args.json));
                left -= 1;
            }
            Some(Err(error)) => return Err(error).context("the subscription ended"),
            None => return Ok(()),
        }
    }
    Ok(())
}

// ---- delete and metadata ------------------------------------------------------------------

/// `factline delete`.
#[derive(Debug, clap::Args)]
pub(crate) struct DeleteArgs {
    #[command(flatten)]
    target: Target,
    /// The stream.
    stream: String,
    /// Tombstone: the stream can never be written again (default: a soft delete, after which
    /// the stream can continue).
    #[arg(long)]
    hard: bool,
    /// any (default), no-stream, exists, or the revision of the stream's last event.
    #[arg(long, short = 'e', default_value = "any")]
    expected_version: String,
}

pub(crate) async fn delete(args: DeleteArgs) -> anyhow::Result<()> {
    let stream = stream_id(&args.stream)?;
    let expected = expected_version(&args.expected_version)?;
    let mode = if args.hard {
        DeleteMode::Tombstone
    } else {
        DeleteMode::Soft
    };
    let opened = open(&args.target).await?;
    let result = opened.store.delete_stream(&stream, expected, mode).await;
    opened.close().await;
    result.with_context(|| format!("deleting {stream}"))?;
    print_line(&format!(
        "{} {stream}",
        if args.hard {
            "tombstoned"
        } else {
            "soft-deleted"
        }
    ));
    Ok(())
}

/// `factline metadata`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum MetadataCommand {
    /// Print a stream's retention settings.
    Get {
        #[command(flatten)]
        target: Target,
        /// The stream.
        stream: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Replace a stream's retention settings (what is not given is unset).
    Set {
        #[command(flatten)]
        target: Target,
        /// The stream.
        stream: String,
        /// Keep only the newest N events visible.
        #[arg(long)]
        max_count: Option<u64>,
        /// Hide events older than this many seconds.
        #[arg(long)]
        max_age_s: Option<u64>,
        /// Hide events with a lower revision.
        #[arg(long)]
        truncate_before: Option<u64>,
    },
}

fn metadata_json(metadata: &StreamMetadata) -> Value {
    json!({
        "max_count": metadata.max_count,
        "max_age_seconds": metadata.max_age.map(|age| age.as_secs()),
        "truncate_before": metadata.truncate_before.map(Revision::value),
    })
}

pub(crate) async fn metadata(command: MetadataCommand) -> anyhow::Result<()> {
    match command {
        MetadataCommand::Get {
            target,
            stream,
            json,
        } => {
            let stream = stream_id(&stream)?;
            let opened = open(&target).await?;
            let result = opened.store.stream_metadata(&stream).await;
            opened.close().await;
            let metadata = result.with_context(|| format!("reading the metadata of {stream}"))?;
            let value = metadata_json(&metadata);
            if json {
                print_line(&value.to_string());
            } else if let Some(fields) = value.as_object() {
                for (name, value) in fields {
                    print_line(&format!("{name:<16} {value}"));
                }
            }
        }
        MetadataCommand::Set {
            target,
            stream,
            max_count,
            max_age_s,
            truncate_before,
        } => {
            let stream = stream_id(&stream)?;
            let metadata = StreamMetadata {
                max_count,
                max_age: max_age_s.map(Duration::from_secs),
                truncate_before: truncate_before.map(Revision),
            };
            let opened = open(&target).await?;
            let result = opened
                .store
                .set_stream_metadata(&stream, metadata.clone())
                .await;
            opened.close().await;
            result.with_context(|| format!("setting the metadata of {stream}"))?;
            print_line(&format!("{stream}: {}", metadata_json(&metadata)));
        }
    }
    Ok(())
}

// ---- export and import --------------------------------------------------------------------

/// `factline export`.
#[derive(Debug, clap::Args)]
pub(crate) struct ExportArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    filter: FilterArgs,
    /// The file to write ('-', the default, for standard output).
    #[arg(long, default_value = "-")]
    out: PathBuf,
    /// First position to export.
    #[arg(long)]
    from: Option<u64>,
    /// Write CloudEvents 1.0 (structured JSON) instead of the API's event shape.
    #[arg(long)]
    cloudevents: bool,
}

/// One CloudEvents 1.0 structured-mode JSON object for `event`: `subject` is the stream, the
/// revision, position and metadata travel as the `factlinerevision`, `factlineposition` and
/// `factlinemetadata` (a JSON object as a string) extension attributes.
fn cloudevent(event: &RecordedEvent) -> Value {
    let mut object = serde_json::Map::new();
    object.insert("specversion".into(), json!("1.0"));
    object.insert("id".into(), json!(event.id.to_string()));
    object.insert("source".into(), json!("factline"));
    object.insert("type".into(), json!(event.event_type.as_str()));
    object.insert("subject".into(), json!(event.stream.as_str()));
    object.insert("time".into(), json!(event.recorded_at.to_rfc3339()));
    object.insert(
        "datacontenttype".into(),
        json!(event.content_type.as_mime()),
    );
    let as_json = (event.content_type == factline_core::ContentType::Json)
        .then(|| serde_json::from_slice::<Value>(&event.data).ok())
        .flatten();
    match as_json {
        Some(data) => object.insert("data".into(), data),
        None => object.insert(
            "data_base64".into(),
            json!(base64::engine::general_purpose::STANDARD.encode(&event.data)),
        ),
    };
    object.insert("factlinerevision".into(), json!(event.revision.value()));
    object.insert("factlineposition".into(), json!(event.position.value()));
    if !event.metadata.is_empty() {
        let metadata: BTreeMap<&str, &str> = event.metadata.iter().collect();
        object.insert(
            "factlinemetadata".into(),
            json!(serde_json::to_string(&metadata).unwrap_or_default()),
        );
    }
    Value::Object(object)
}

/// A recorded event back from [`cloudevent`]'s shape (position and recorded time are the
/// importing store's own).
fn from_cloudevent(text: &str) -> anyhow::Result<RecordedEvent> {
    let value: Value = serde_json::from_str(text).context("not JSON")?;
    let field = |name: &str| {
        value
            .get(name)
            .with_context(|| format!("no {name:?} attribute"))
    };
    let text_field = |name: &str| -> anyhow::Result<&str> {
        field(name)?
            .as_str()
            .with_context(|| format!("{name:?} is not a string"))
    };
    let id = text_field("id")?
        .parse()
        .context("\"id\" is not a UUID (factline event ids are UUIDs)")?;
    let stream = stream_id(text_field("subject")?)?;
    let json_content = value
        .get("datacontenttype")
        .and_then(Value::as_str)
        .is_none_or(|ct| ct == "application/json");
    let mut event = match (value.get("data_base64"), value.get("data")) {
        (Some(encoded), _) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(
                    encoded
                        .as_str()
                        .context("\"data_base64\" is not a string")?,
                )
                .context("\"data_base64\" is not base64")?;
            let mut event = EventData::binary(text_field("type")?, bytes);
            if json_content {
                event.content_type = factline_core::ContentType::Json;
            }
            event
        }
        (None, Some(data)) => EventData::json(text_field("type")?, data)?,
        (None, None) => EventData::json(text_field("type")?, &Value::Null)?,
    }
    .with_id(id);
    if let Some(metadata) = value.get("factlinemetadata") {
        let map: BTreeMap<String, String> = serde_json::from_str(
            metadata
                .as_str()
                .context("\"factlinemetadata\" is not a string")?,
        )
        .context("\"factlinemetadata\" is not a JSON object of strings")?;
        let mut all = Metadata::new();
        for (key, value) in map {
            all.insert(key, value);
        }
        event = event.with_all_metadata(all);
    }
    let revision = value
        .get("factlinerevision")
        .and_then(Value::as_u64)
        .context("no \"factlinerevision\" (the event's revision in its stream)")?;
    Ok(RecordedEvent::new(
        stream,
        Revision(revision),
        Position(0),
        factline_core::Timestamp::now(),
        event,
    ))
}

fn progress(length: Option<u64>, what: &str) -> ProgressBar {
    let bar = match length {
        Some(length) => ProgressBar::new(length),
        None => ProgressBar::new_spinner(),
    };
    let template = if length.is_some() {
        "{prefix} [{bar:40}] {pos}/{len} events ({per_sec}, {eta} left)"
    } else {
        "{prefix} {spinner} {pos} events ({per_sec})"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(what.to_owned());
    bar
}

pub(crate) async fn export(args: ExportArgs) -> anyhow::Result<()> {
    let opened = open(&args.target).await?;
    let result = export_to(&*opened.store, &args).await;
    opened.close().await;
    result
}

async fn export_to(store: &dyn Store, args: &ExportArgs) -> anyhow::Result<()> {
    let head = store.head_position().await.context("reading the head")?;
    let from = args.from.unwrap_or(0);
    let total = head.map(|head| (head.value() + 1).saturating_sub(from));
    let bar = progress(total, "export");
    let mut out: Box<dyn std::io::Write> = if args.out.as_os_str() == "-" {
        Box::new(BufWriter::new(std::io::stdout().lock()))
    } else {
        Box::new(BufWriter::new(
            std::fs::File::create(&args.out)
                .with_context(|| format!("creating {}", args.out.display()))?,
        ))
    };
    let mut written = 0u64;
    let mut failure = None;
    scan_all(
        store,
        Direction::Forwards,
        Some(Position(from)),
        args.filter.filter(),
        |event| {
            let value = if args.cloudevents {
                cloudevent(event)
            } else {
                event_to_json(event)
            };
            if let Err(error) = writeln!(out, "{value}") {
                failure = Some(error);
                return false;
            }
            written += 1;
            bar.set_position(event.position.value() + 1 - from);
            true
        },
    )
    .await?;
    if let Some(error) = failure {
        return Err(error).context("writing the export");
    }
    out.flush().context("writing the export")?;
    bar.finish_and_clear();
    eprintln!("exported {written} events");
    Ok(())
}

/// `factline import`.
#[derive(Debug, clap::Args)]
pub(crate) struct ImportArgs {
    #[command(flatten)]
    target: Target,
    /// The NDJSON file written by `factline export` ('-' for standard input).
    file: PathBuf,
    /// The file holds CloudEvents (`export --cloudevents`).
    #[arg(long)]
    cloudevents: bool,
}

/// Events appended per request while importing (one stream's run of consecutive events).
const IMPORT_BATCH_EVENTS: usize = 500;

pub(crate) async fn import(args: ImportArgs) -> anyhow::Result<()> {
    let reader: Box<dyn std::io::BufRead> = if args.file.as_os_str() == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(&args.file)
                .with_context(|| format!("opening {}", args.file.display()))?,
        ))
    };
    // Progress is measured in bytes of the file, so the file is read once.
    let total_bytes = if args.file.as_os_str() == "-" {
        None
    } else {
        Some(
            std::fs::metadata(&args.file)
                .with_context(|| format!("reading the size of {}", args.file.display()))?
                .len(),
        )
    };
    let opened = open(&args.target).await?;
    let result = import_from(&*opened.store, reader, total_bytes, args.cloudevents).await;
    opened.close().await;
    let imported = result?;
    eprintln!("imported {imported} events");
    Ok(())
}

/// Appends the file's events in order, each run of one stream's consecutive events as one
/// append at the revision it had (`Exact`/`NoStream`): revisions are kept, a stream that holds
/// other events already is a conflict, and a second run of the same import is an idempotent
/// retry (the same ids at the same place) that writes nothing twice.
async fn import_from(
    store: &dyn Store,
    reader: Box<dyn std::io::BufRead>,
    total_bytes: Option<u64>,
    cloudevents: bool,
) -> anyhow::Result<u64> {
    let bar = match total_bytes {
        Some(total) => ProgressBar::new(total),
        None => ProgressBar::new_spinner(),
    };
    if let Ok(style) =
        ProgressStyle::with_template("import [{bar:40}] {bytes}/{total_bytes} ({eta} left)")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    let mut batch: Vec<RecordedEvent> = Vec::new();
    let mut imported = 0u64;
    for (n, line) in reader.lines().enumerate() {
        let line = line.context("reading the import file")?;
        bar.inc(line.len() as u64 + 1);
        if line.trim().is_empty() {
            continue;
        }
        let event = if cloudevents {
            from_cloudevent(&line)
        } else {
            event_from_json(&line).map_err(anyhow::Error::msg)
        }
        .with_context(|| format!("line {}", n + 1))?;
        let continues = batch.last().is_some_and(|last| {
            last.stream == event.stream && last.revision.next() == event.revision
        });
        if !continues || batch.len() >= IMPORT_BATCH_EVENTS {
            imported += flush(store, &mut batch).await?;
        }
        batch.push(event);
    }
    imported += flush(store, &mut batch).await?;
    bar.finish_and_clear();
    Ok(imported)
}

async fn flush(store: &dyn Store, batch: &mut Vec<RecordedEvent>) -> anyhow::Result<u64> {
    let Some(first) = batch.first() else {
        return Ok(0);
    };
    let stream = first.stream.clone();
    let expected = match first.revision.value() {
        0 => ExpectedVersion::NoStream,
        revision => ExpectedVersion::Exact(Revision(revision - 1)),
    };
    let events: Vec<EventData> = batch.iter().map(RecordedEvent::to_event_data).collect();
    let count = events.len() as u64;
    store
        .append(&stream, expected, events)
        .await
        .with_context(|| {
            format!(
                "importing {count} event(s) of {stream} from revision {}",
                first.revision.value()
            )
        })?;
    batch.clear();
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloudevents_round_trip_every_field_but_position_and_time() {
        let event = RecordedEvent::new(
            StreamId::new("order-7").unwrap_or_else(|_| unreachable!()),
            Revision(3),
            Position(99),
            factline_core::Timestamp::now(),
            EventData::json("OrderPlaced", &json!({"total": 5}))
                .unwrap_or_else(|_| unreachable!())
                .with_metadata(Metadata::CORRELATION_ID, "c-1"),
        );
        let text = cloudevent(&event).to_string();
        let back = from_cloudevent(&text).unwrap_or_else(|error| panic!("{error:#}"));
        assert_eq!(back.to_event_data(), event.to_event_data());
        assert_eq!((back.stream, back.revision), (event.stream, event.revision));

        let binary = RecordedEvent::new(
            StreamId::new("blob-1").unwrap_or_else(|_| unreachable!()),
            Revision(0),
            Position(0),
            factline_core::Timestamp::now(),
            EventData::binary("Stored", vec![0u8, 255, 7]),
        );
        let back = from_cloudevent(&cloudevent(&binary).to_string())
            .unwrap_or_else(|error| panic!("{error:#}"));
        assert_eq!(back.to_event_data(), binary.to_event_data());
    }

    #[test]
    fn cloudevents_without_a_uuid_id_are_refused() {
        let error = from_cloudevent(
            r#"{"specversion":"1.0","id":"abc","source":"x","type":"T","subject":"s-1","factlinerevision":0}"#,
        )
        .err()
        .map(|error| format!("{error:#}"));
        assert!(error.is_some_and(|e| e.contains("UUID")));
    }
}

// ---- bench --------------------------------------------------------------------------------

/// `factline bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    target: Target,
    /// Concurrent writers, each appending to its own stream and waiting for each answer.
    #[arg(long, default_value_t = 32)]
    writers: usize,
    /// Events per append.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// How long to append, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Size of each event's JSON payload, in bytes.
    #[arg(long, default_value_t = 200)]
    payload_bytes: usize,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// Latencies kept at most (the rest are counted, not kept), so memory stays bounded.
const BENCH_SAMPLES_MAX: usize = 5_000_000;

pub(crate) async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if args.writers == 0 || args.batch == 0 || args.seconds == 0 {
        anyhow::bail!("--writers, --batch and --seconds must be at least 1");
    }
    let opened = open(&args.target).await?;
    let result = run_bench(&opened.store, &args).await;
    opened.close().await;
    let (events, elapsed, mut latencies_us) = result?;
    latencies_us.sort_unstable();
    let quantile = |q: f64| {
        latencies_us
            .get(((latencies_us.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    let events_per_sec = events as f64 / elapsed.as_secs_f64();
    let summary = json!({
        "writers": args.writers,
        "batch": args.batch,
        "events": events,
        "seconds": elapsed.as_secs_f64(),
        "events_per_sec": events_per_sec.round(),
        "p50_us": quantile(0.5),
        "p99_us": quantile(0.99),
        "max_us": latencies_us.last().copied().unwrap_or(0),
    });
    if args.json {
        print_line(&summary.to_string());
    } else {
        print_line(&format!(
            "{events} events in {:.1} s from {} writers (batches of {}): {:.0} events/s; \
             latency per append p50 {} µs, p99 {} µs, max {} µs",
            elapsed.as_secs_f64(),
            args.writers,
            args.batch,
            events_per_sec,
            quantile(0.5),
            quantile(0.99),
            latencies_us.last().copied().unwrap_or(0)
        ));
    }
    Ok(())
}

async fn run_bench(
    store: &Arc<dyn Store>,
    args: &BenchArgs,
) -> anyhow::Result<(u64, Duration, Vec<u64>)> {
    let run = factline_core::Uuid::now_v7().simple().to_string();
    let payload = json!({ "pad": "x".repeat(args.payload_bytes.saturating_sub(10)) });
    let started = std::time::Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    let bar = progress(Some(args.seconds), "bench");
    let samples_per_writer = BENCH_SAMPLES_MAX / args.writers;
    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..args.writers {
        let store = Arc::clone(store);
        let stream = stream_id(&format!("bench-{run}-{writer}"))?;
        let payload = payload.clone();
        let batch = args.batch;
        tasks.spawn(async move {
            let mut latencies_us = Vec::new();
            let mut events = 0u64;
            while std::time::Instant::now() < deadline {
                let appended: Vec<EventData> = (0..batch)
                    .map(|_| EventData::json("BenchEventAppended", &payload))
                    .collect::<Result<_, _>>()?;
                let sent = std::time::Instant::now();
                store
                    .append(&stream, ExpectedVersion::Any, appended)
                    .await
                    .with_context(|| format!("appending to {stream}"))?;
                if latencies_us.len() < samples_per_writer {
                    latencies_us.push(sent.elapsed().as_micros() as u64);
                }
                events += batch as u64;
            }
            anyhow::Ok((events, latencies_us))
        });
    }
    let ticker = {
        let bar = bar.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                bar.set_position(started.elapsed().as_secs().min(bar.length().unwrap_or(0)));
            }
        })
    };
    let mut events = 0;
    let mut latencies_us = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (appended, latencies) = joined.context("a bench writer panicked")??;
        events += appended;
        latencies_us.extend(latencies);
    }
    let elapsed = started.elapsed();
    ticker.abort();
    bar.finish_and_clear();
    Ok((events, elapsed, latencies_us))
}
