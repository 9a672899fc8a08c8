//! Process-crash test of the server: the real `factline serve` binary on a data directory,
//! under concurrent HTTP appends from 8 keep-alive clients, killed with SIGKILL at a random
//! moment, restarted on the same directory and checked through the API only:
//!
//! - every acknowledged (201) event is present exactly once, with the revision and position
//!   its response gave, and its type, data and metadata as sent;
//! - `$all` is gapless from position 0, every stream gapless from revision 0, and each
//!   stream read agrees with `$all`;
//! - an append that was in flight at the kill is all there or not at all (a batch and a
//!   multi-stream append are atomic), and a rejected one (409) is absent;
//! - an in-flight append retried after the restart with the same ids and expected version is
//!   idempotent: a replay if it was written, a write if not.
//!
//! The cycles continue the same directory, so every restart checks again all that earlier
//! cycles acknowledged. `FACTLINE_SERVE_KILL9_SEED` replays a run (the seed is printed; it
//! fixes the kill delays, the request mix and the payloads, not the thread interleaving) and
//! `FACTLINE_SERVE_KILL9_CYCLES` sets the number of kills (default 6).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code reports by panicking

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs::File,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use serde_json::{Value, json};
use uuid::Uuid;

/// Concurrent HTTP clients, each with its own stream `own-{worker}`.
const WORKERS: usize = 8;
/// Streams every client appends to, with the expected version it believes current.
const SHARED_STREAMS: usize = 3;
/// Kill delay after the load starts, in milliseconds.
const KILL_DELAY_MS: std::ops::RangeInclusive<u64> = 200..=1500;
/// How long a restarted server may take to answer `/health`.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

// ---- the child process ----------------------------------------------------------------------

/// A running (or killed) `factline serve`. Dropping it kills the process; dropping it while
/// the test panics prints its stderr and that of the process before it.
struct ServerProcess {
    child: Option<Child>,
    base: String,
    log: PathBuf,
    previous_log: Option<PathBuf>,
}

enum StartError {
    /// The child exited because the port was taken between our probe and its bind.
    PortTaken,
}

impl ServerProcess {
    /// Starts the server on `data` and waits until `GET /health` answers 200.
    async fn start(
        data: &Path,
        logs: &Path,
        start: usize,
        previous_log: Option<PathBuf>,
        client: &reqwest::Client,
    ) -> Self {
        for attempt in 0..5 {
            let listen = format!("127.0.0.1:{}", free_port());
            let log = logs.join(format!("serve-{start}-{attempt}.log"));
            let stderr = File::create(&log).unwrap();
            let child = Command::new(env!("CARGO_BIN_EXE_factline"))
                .arg("serve")
                .arg("--data")
                .arg(data)
                .arg("--listen")
                .arg(&listen)
                .env_remove("FACTLINE_AUTH")
                .env_remove("FACTLINE_STORE")
                .env("FACTLINE_LOG", "info")
                .stdin(Stdio::null())
                .stdout(stderr.try_clone().unwrap())
                .stderr(stderr)
                .spawn()
                .expect("the factline binary starts");
            let mut server = Self {
                child: Some(child),
                base: format!("http://{listen}"),
                log,
                previous_log: previous_log.clone(),
            };
            match server.wait_healthy(client).await {
                Ok(()) => return server,
                Err(StartError::PortTaken) => {
                    eprintln!("serve_kill9: {listen} was taken meanwhile; another port");
                }
            }
        }
        panic!("factline serve found no free port in 5 tries");
    }

    async fn wait_healthy(&mut self, client: &reqwest::Client) -> Result<(), StartError> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                let log = read_log(&self.log);
                if log.contains("in use") {
                    return Err(StartError::PortTaken);
                }
                panic!(
                    "factline serve exited with {status} before GET /health answered \
                     (its stderr follows)"
                );
            }
            let health = client
                .get(format!("{}/health", self.base))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if let Ok(response) = health
                && response.status().as_u16() == 200
            {
                let body: Value = response.json().await.unwrap();
                assert_eq!(body["status"], "ok", "GET /health: {body}");
                return Ok(());
            }
            assert!(
                started.elapsed() < STARTUP_TIMEOUT,
                "factline serve did not answer GET {}/health with 200 within {STARTUP_TIMEOUT:?} \
                 (its stderr follows)",
                self.base
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL (what `Child::kill` sends on Unix), then reap the process.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            let status = child.wait().unwrap();
            assert!(!status.success(), "the server exited by itself: {status}");
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            if let Some(previous) = &self.previous_log {
                eprintln!(
                    "---- stderr of the previous (killed) server, {} ----\n{}",
                    previous.display(),
                    read_log(previous)
                );
            }
            eprintln!(
                "---- stderr of the server at {}, {} ----\n{}\n---- end ----",
                self.base,
                self.log.display(),
                read_log(&self.log)
            );
        }
    }
}

fn read_log(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    const TAIL: usize = 16 * 1024;
    if text.len() > TAIL {
        let mut cut = text.len() - TAIL;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        text = format!("[… {cut} bytes cut …]\n{}", &text[cut..]);
    }
    text
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---- what the clients sent and what they were told --------------------------------------------

#[derive(Debug, Clone)]
struct SentEvent {
    id: Uuid,
    event_type: String,
    data: Value,
    metadata: Value,
}

impl SentEvent {
    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "type": self.event_type,
            "data": self.data,
            "metadata": self.metadata,
        })
    }
}

/// One stream's events in an append.
#[derive(Debug, Clone)]
struct Part {
    stream: String,
    events: Vec<SentEvent>,
}

/// One stream's result in a 201.
#[derive(Debug, Clone)]
struct Ack {
    next_expected_version: u64,
    position: u64,
    recorded_at: Option<String>,
}

#[derive(Debug)]
enum Outcome {
    /// 201, one result per part.
    Acknowledged(Vec<Ack>),
    /// 409 `wrong_expected_version`: nothing may have been written.
    Rejected,
    /// No answer (the kill cut it): all of it may be written, or nothing.
    InFlight(String),
}

#[derive(Debug)]
struct Attempt {
    worker: usize,
    cycle: usize,
    /// `/streams/{stream}` or `/append`.
    path: String,
    expected_version: Option<String>,
    body: Vec<u8>,
    parts: Vec<Part>,
    outcome: Outcome,
}

impl Attempt {
    fn describe(&self) -> String {
        let parts: Vec<String> = self
            .parts
            .iter()
            .map(|part| {
                let ids: Vec<String> = part.events.iter().map(|e| e.id.to_string()).collect();
                format!("{} [{}]", part.stream, ids.join(", "))
            })
            .collect();
        format!(
            "cycle {} worker {}: POST {} (Expected-Version {:?}) of {}",
            self.cycle,
            self.worker,
            self.path,
            self.expected_version,
            parts.join(" + ")
        )
    }

    fn is_own_stream_append(&self) -> bool {
        self.path.starts_with("/streams/own-")
    }
}

/// Sends one request; `Err` when no complete response arrived.
async fn send(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    expected_version: Option<&str>,
    body: &[u8],
) -> Result<(u16, Value), reqwest::Error> {
    let mut request = client
        .post(format!("{base}{path}"))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_vec());
    if let Some(expected) = expected_version {
        request = request.header("Expected-Version", expected);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let bytes = response.bytes().await?;
    let value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
        Value::String(format!("(not JSON) {}", String::from_utf8_lossy(&bytes)))
    });
    Ok((status, value))
}

/// The acknowledgement in a 201 body, checked against the request's shape.
fn acks_of(attempt: &Attempt, body: &Value) -> Vec<Ack> {
    if attempt.path == "/append" {
        let results = body["results"].as_array().unwrap();
        assert_eq!(results.len(), attempt.parts.len(), "{body}");
        results
            .iter()
            .zip(&attempt.parts)
            .map(|(result, part)| {
                assert_eq!(result["stream"], part.stream.as_str(), "{body}");
                Ack {
                    next_expected_version: result["next_expected_version"].as_u64().unwrap(),
                    position: result["position"].as_u64().unwrap(),
                    // Checked when the server gives it (it did not at first).
                    recorded_at: result["recorded_at"].as_str().map(str::to_owned),
                }
            })
            .collect()
    } else {
        vec![Ack {
            next_expected_version: body["next_expected_version"].as_u64().unwrap(),
            position: body["position"].as_u64().unwrap(),
            recorded_at: Some(body["recorded_at"].as_str().unwrap().to_owned()),
        }]
    }
}

// ---- the load -------------------------------------------------------------------------------

struct Load {
    base: String,
    /// Set just before the SIGKILL: a failed request before it is a server failure.
    killed: AtomicBool,
    /// The last revision of each shared stream as the clients believe it.
    shared: Mutex<Vec<Option<u64>>>,
}

#[derive(Debug, Default)]
struct WorkerReport {
    attempts: Vec<Attempt>,
    conflicts: usize,
    /// What went wrong other than the kill.
    failure: Option<String>,
}

fn expected_header(revision: Option<u64>) -> String {
    revision.map_or_else(|| "no-stream".to_owned(), |r| r.to_string())
}

fn expected_json(revision: Option<u64>) -> Value {
    revision.map_or_else(|| json!("no-stream"), |r| json!(r))
}

/// Parses the `actual` of a 409: a revision or `"no-stream"`.
fn actual_of(body: &Value) -> Option<Option<u64>> {
    match &body["actual"] {
        Value::Number(n) => n.as_u64().map(Some),
        Value::String(s) if s == "no-stream" => Some(None),
        _ => None,
    }
}

fn payload_text(rng: &mut StdRng) -> String {
    // Quotes, backslashes and multi-byte characters: `data` must come back as sent.
    const CHARS: &[&str] = &[
        "a", "b", "z", "Q", "0", "9", " ", "-", "_", "\"", "\\", "é", "€", "😀", "\n",
    ];
    let len = rng.random_range(0..120);
    (0..len)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())])
        .collect()
}

fn new_events(
    rng: &mut StdRng,
    worker: usize,
    cycle: usize,
    seq: &mut u64,
    event_type: &str,
    count: usize,
) -> Vec<SentEvent> {
    (0..count)
        .map(|_| {
            *seq += 1;
            SentEvent {
                id: uuid::Builder::from_random_bytes(rng.random()).into_uuid(),
                event_type: event_type.to_owned(),
                data: json!({
                    "worker": worker,
                    "cycle": cycle,
                    "seq": *seq,
                    "text": payload_text(rng),
                    "n": rng.random::<u32>(),
                }),
                metadata: json!({ "worker": worker.to_string(), "cycle": cycle.to_string() }),
            }
        })
        .collect()
}

fn batch_size(rng: &mut StdRng, max: usize) -> usize {
    if rng.random_bool(0.5) {
        1
    } else {
        rng.random_range(2..=max)
    }
}

/// One client: appends until the server goes away (or answers something unexpected).
async fn worker(
    load: Arc<Load>,
    worker: usize,
    cycle: usize,
    mut own: Option<u64>,
    seed: u64,
) -> WorkerReport {
    let mut rng = StdRng::seed_from_u64(seed);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(2)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let own_stream = format!("own-{worker}");
    let mut report = WorkerReport::default();
    let mut seq = 0;
    loop {
        let choice = rng.random_range(0..100);
        let shared_index = rng.random_range(0..SHARED_STREAMS);
        let shared_stream = format!("shared-{shared_index}");
        let shared_version = load.shared.lock().unwrap()[shared_index];
        let (path, expected_version, body, parts) = if choice < 55 {
            let count = batch_size(&mut rng, 6);
            let events = new_events(&mut rng, worker, cycle, &mut seq, "OwnAppended", count);
            let body = if count == 1 && rng.random_bool(0.5) {
                events[0].to_json()
            } else {
                Value::Array(events.iter().map(SentEvent::to_json).collect())
            };
            let part = Part {
                stream: own_stream.clone(),
                events,
            };
            (
                format!("/streams/{own_stream}"),
                Some(expected_header(own)),
                body,
                vec![part],
            )
        } else if choice < 85 {
            let count = batch_size(&mut rng, 3);
            let events = new_events(&mut rng, worker, cycle, &mut seq, "SharedAppended", count);
            let body = Value::Array(events.iter().map(SentEvent::to_json).collect());
            let part = Part {
                stream: shared_stream.clone(),
                events,
            };
            (
                format!("/streams/{shared_stream}"),
                Some(expected_header(shared_version)),
                body,
                vec![part],
            )
        } else {
            let mine = batch_size(&mut rng, 3);
            let mine = new_events(&mut rng, worker, cycle, &mut seq, "PairAppended", mine);
            let theirs = batch_size(&mut rng, 3);
            let theirs = new_events(&mut rng, worker, cycle, &mut seq, "PairAppended", theirs);
            let body = json!({ "streams": [
                {
                    "stream": own_stream,
                    "expected_version": expected_json(own),
                    "events": mine.iter().map(SentEvent::to_json).collect::<Vec<_>>(),
                },
                {
                    "stream": shared_stream,
                    "expected_version": expected_json(shared_version),
                    "events": theirs.iter().map(SentEvent::to_json).collect::<Vec<_>>(),
                },
            ]});
            let parts = vec![
                Part {
                    stream: own_stream.clone(),
                    events: mine,
                },
                Part {
                    stream: shared_stream.clone(),
                    events: theirs,
                },
            ];
            ("/append".to_owned(), None, body, parts)
        };
        let body = serde_json::to_vec(&body).unwrap();
        let answer = send(
            &client,
            &load.base,
            &path,
            expected_version.as_deref(),
            &body,
        )
        .await;
        let mut attempt = Attempt {
            worker,
            cycle,
            path,
            expected_version,
            body,
            parts,
            outcome: Outcome::Rejected,
        };
        let mut stop = false;
        match answer {
            Err(error) => {
                if !load.killed.load(Ordering::SeqCst) {
                    report.failure = Some(format!(
                        "{} failed before the kill: {error:?}",
                        attempt.describe()
                    ));
                }
                attempt.outcome = Outcome::InFlight(format!("{error}"));
                stop = true;
            }
            Ok((201, body)) => {
                let acks = acks_of(&attempt, &body);
                for (part, ack) in attempt.parts.iter().zip(&acks) {
                    if part.stream == own_stream {
                        own = Some(ack.next_expected_version);
                    } else {
                        let mut shared = load.shared.lock().unwrap();
                        shared[shared_index] =
                            shared[shared_index].max(Some(ack.next_expected_version));
                    }
                }
                attempt.outcome = Outcome::Acknowledged(acks);
            }
            Ok((409, body))
                if body["error"] == "wrong_expected_version"
                    && body["stream"] == shared_stream.as_str() =>
            {
                report.conflicts += 1;
                match actual_of(&body) {
                    Some(actual) => {
                        let mut shared = load.shared.lock().unwrap();
                        shared[shared_index] = shared[shared_index].max(actual);
                    }
                    None => {
                        report.failure = Some(format!("{}: 409 {body}", attempt.describe()));
                        stop = true;
                    }
                }
            }
            Ok((status, body)) => {
                // Nothing but 201 and a conflict on a shared stream can happen here. The
                // request may or may not have been written: check it as in flight.
                report.failure = Some(format!("{} answered {status}: {body}", attempt.describe()));
                attempt.outcome = Outcome::InFlight(format!("{status}"));
                stop = true;
            }
        }
        report.attempts.push(attempt);
        if stop {
            return report;
        }
    }
}

// ---- what the store must hold ---------------------------------------------------------------

#[derive(Debug, Clone)]
struct Expected {
    stream: String,
    revision: u64,
    position: u64,
    event: SentEvent,
    recorded_at: Option<String>,
    origin: String,
}

#[derive(Debug, Default)]
struct Model {
    /// Events that must be present, exactly so: acknowledged ones, and in-flight ones that a
    /// restart showed written.
    present: HashMap<Uuid, Expected>,
    /// Ids that must never appear: rejected appends, and in-flight ones a restart showed
    /// unwritten (and that were not retried).
    absent: HashMap<Uuid, String>,
    acknowledged_events: usize,
    acknowledged_appends: usize,
}

impl Model {
    fn last_revision(&self, stream: &str) -> Option<u64> {
        self.present
            .values()
            .filter(|e| e.stream == stream)
            .map(|e| e.revision)
            .max()
    }

    fn acknowledge(&mut self, attempt: &Attempt, acks: &[Ack], origin: &str) {
        for (part, ack) in attempt.parts.iter().zip(acks) {
            let count = part.events.len() as u64;
            assert!(
                ack.next_expected_version + 1 >= count && ack.position + 1 >= count,
                "{}: an impossible acknowledgement {ack:?}",
                attempt.describe()
            );
            for (k, event) in part.events.iter().enumerate() {
                let back = count - 1 - k as u64;
                let expected = Expected {
                    stream: part.stream.clone(),
                    revision: ack.next_expected_version - back,
                    position: ack.position - back,
                    event: event.clone(),
                    recorded_at: ack.recorded_at.clone(),
                    origin: format!("{origin}: {}", attempt.describe()),
                };
                self.absent.remove(&event.id);
                let previous = self.present.insert(event.id, expected);
                assert!(
                    previous.is_none(),
                    "event id {} acknowledged twice",
                    event.id
                );
                self.acknowledged_events += 1;
            }
        }
        self.acknowledged_appends += 1;
    }
}

/// A recorded event as the API shows it.
#[derive(Debug, Clone)]
struct Seen {
    id: Uuid,
    stream: String,
    event_type: String,
    revision: u64,
    position: u64,
    recorded_at: String,
    data: Value,
    metadata: Value,
    raw: Value,
}

fn seen(raw: &Value) -> Seen {
    assert_eq!(raw["content_type"], "application/json", "{raw}");
    Seen {
        id: raw["id"].as_str().unwrap().parse().unwrap(),
        stream: raw["stream"].as_str().unwrap().to_owned(),
        event_type: raw["type"].as_str().unwrap().to_owned(),
        revision: raw["revision"].as_u64().unwrap(),
        position: raw["position"].as_u64().unwrap(),
        recorded_at: raw["recorded_at"].as_str().unwrap().to_owned(),
        data: raw["data"].clone(),
        metadata: raw["metadata"].clone(),
        raw: raw.clone(),
    }
}

async fn get(client: &reqwest::Client, url: &str) -> (u16, Value) {
    let response = client
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e:?}"));
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// All of `$all`, page by page; checks it is gapless from 0.
async fn read_all(client: &reqwest::Client, base: &str, limit: usize) -> Vec<Seen> {
    let mut events: Vec<Seen> = Vec::new();
    let mut from = 0;
    loop {
        let url = format!("{base}/all?from={from}&limit={limit}");
        let (status, page) = get(client, &url).await;
        assert_eq!(status, 200, "GET {url}: {page}");
        let page_events = page["events"].as_array().unwrap();
        assert!(page_events.len() <= limit, "GET {url}: an oversized page");
        for raw in page_events {
            let event = seen(raw);
            assert_eq!(
                event.position,
                events.len() as u64,
                "$all is not gapless from 0 (GET {url}): after {} events comes {raw}",
                events.len()
            );
            events.push(event);
        }
        if page["is_end"].as_bool().unwrap() {
            return events;
        }
        let next = page["next_position"].as_u64().unwrap();
        assert!(
            next > from,
            "GET {url}: next_position {next} does not advance"
        );
        from = next;
    }
}

/// All of one stream, page by page (empty for 404); checks it is gapless from revision 0.
async fn read_stream(
    client: &reqwest::Client,
    base: &str,
    stream: &str,
    limit: usize,
) -> Vec<Seen> {
    let mut events: Vec<Seen> = Vec::new();
    let mut from = 0;
    loop {
        let url = format!("{base}/streams/{stream}?from={from}&limit={limit}");
        let (status, page) = get(client, &url).await;
        if status == 404 && from == 0 {
            assert_eq!(page["error"], "stream_not_found", "GET {url}: {page}");
            return events;
        }
        assert_eq!(status, 200, "GET {url}: {page}");
        assert_eq!(page["stream"], stream, "GET {url}");
        let page_events = page["events"].as_array().unwrap();
        assert!(page_events.len() <= limit, "GET {url}: an oversized page");
        for raw in page_events {
            let event = seen(raw);
            assert_eq!(event.stream, stream, "GET {url}: {raw}");
            assert_eq!(
                event.revision,
                events.len() as u64,
                "stream {stream} is not gapless from revision 0 (GET {url}): after {} events \
                 comes {raw}",
                events.len()
            );
            events.push(event);
        }
        if page["is_end"].as_bool().unwrap() {
            if let Some(last) = events.last() {
                assert_eq!(
                    page["last_revision"].as_u64(),
                    Some(last.revision),
                    "GET {url}: last_revision"
                );
            }
            return events;
        }
        let next = page["next_revision"].as_u64().unwrap();
        assert!(
            next > from,
            "GET {url}: next_revision {next} does not advance"
        );
        from = next;
    }
}

fn assert_matches(seen: &Seen, expected: &Expected, label: &str) {
    let problem = if seen.stream != expected.stream {
        "wrong stream"
    } else if seen.revision != expected.revision {
        "wrong revision"
    } else if seen.position != expected.position {
        "wrong position"
    } else if seen.event_type != expected.event.event_type {
        "wrong type"
    } else if seen.data != expected.event.data {
        "data not intact"
    } else if seen.metadata != expected.event.metadata {
        "wrong metadata"
    } else if expected
        .recorded_at
        .as_ref()
        .is_some_and(|recorded_at| *recorded_at != seen.recorded_at)
    {
        "recorded_at differs from the acknowledgement's"
    } else {
        return;
    };
    panic!(
        "{label}: {problem}: event {} expected at {} revision {} position {} with data {} \
         (recorded_at {:?}; {}) is recorded as {}",
        expected.event.id,
        expected.stream,
        expected.revision,
        expected.position,
        expected.event.data,
        expected.recorded_at,
        expected.origin,
        seen.raw
    );
}

#[derive(Debug, Default)]
struct Checked {
    events_in_store: usize,
    in_flight: usize,
    in_flight_written: usize,
    rejected: usize,
}

/// Reads everything back through `server` and checks it against `model` and the `attempts`
/// of the cycle before, which it folds into `model`. Returns the in-flight appends to own
/// streams with whether they turned out written, for the idempotent retry.
async fn verify(
    client: &reqwest::Client,
    base: &str,
    model: &mut Model,
    attempts: Vec<Attempt>,
    rng: &mut StdRng,
    label: &str,
) -> (Checked, Vec<(Attempt, bool)>) {
    let all = read_all(client, base, rng.random_range(50..=1000)).await;
    let mut by_id: HashMap<Uuid, usize> = HashMap::with_capacity(all.len());
    let mut next_revision: BTreeMap<&str, u64> = BTreeMap::new();
    for (index, event) in all.iter().enumerate() {
        if let Some(first) = by_id.insert(event.id, index) {
            panic!(
                "{label}: event id {} is in $all twice, at positions {first} and {index}",
                event.id
            );
        }
        let revision = next_revision.entry(event.stream.as_str()).or_insert(0);
        assert_eq!(
            event.revision, *revision,
            "{label}: in $all, revisions of {} are not gapless in position order: {}",
            event.stream, event.raw
        );
        *revision += 1;
    }

    // Every stream read agrees with $all, and together they hold all of it.
    let mut streams: BTreeSet<String> = next_revision.keys().map(|s| (*s).to_owned()).collect();
    streams.extend((0..WORKERS).map(|w| format!("own-{w}")));
    streams.extend((0..SHARED_STREAMS).map(|s| format!("shared-{s}")));
    // Read concurrently: the check takes most of the test's time.
    let stream_limit = rng.random_range(50..=1000);
    let mut reads = tokio::task::JoinSet::new();
    for stream in streams {
        let (client, base) = (client.clone(), base.to_owned());
        reads.spawn(async move {
            let events = read_stream(&client, &base, &stream, stream_limit).await;
            (stream, events)
        });
    }
    let mut in_streams = 0;
    while let Some(read) = reads.join_next().await {
        let (stream, events) = read.unwrap();
        in_streams += events.len();
        for event in &events {
            let index = by_id.get(&event.id).unwrap_or_else(|| {
                panic!("{label}: {stream} holds {} which $all does not", event.raw)
            });
            assert_eq!(
                event.raw, all[*index].raw,
                "{label}: stream {stream} and $all disagree"
            );
        }
    }
    assert_eq!(
        in_streams,
        all.len(),
        "{label}: the streams hold {in_streams} events, $all {}",
        all.len()
    );

    // Everything acknowledged earlier is still there, unchanged.
    for expected in model.present.values() {
        let index = by_id.get(&expected.event.id).unwrap_or_else(|| {
            panic!(
                "{label}: LOST: event {} at {} revision {} position {} ({}) is missing",
                expected.event.id,
                expected.stream,
                expected.revision,
                expected.position,
                expected.origin
            )
        });
        assert_matches(&all[*index], expected, label);
    }

    // The cycle just killed.
    let mut checked = Checked::default();
    let mut retries = Vec::new();
    for attempt in attempts {
        match &attempt.outcome {
            Outcome::Acknowledged(acks) => {
                let acks = acks.clone();
                model.acknowledge(&attempt, &acks, "acknowledged");
                for part in &attempt.parts {
                    for event in &part.events {
                        let expected = &model.present[&event.id];
                        let index = by_id.get(&event.id).unwrap_or_else(|| {
                            panic!(
                                "{label}: LOST: acknowledged event {} at {} revision {} \
                                 position {} is missing; {}",
                                event.id,
                                expected.stream,
                                expected.revision,
                                expected.position,
                                attempt.describe()
                            )
                        });
                        assert_matches(&all[*index], expected, label);
                    }
                }
            }
            Outcome::Rejected => {
                checked.rejected += 1;
                for part in &attempt.parts {
                    for event in &part.events {
                        assert!(
                            !by_id.contains_key(&event.id),
                            "{label}: event {} of a rejected (409) append was written: {}",
                            event.id,
                            attempt.describe()
                        );
                        model
                            .absent
                            .insert(event.id, format!("rejected: {}", attempt.describe()));
                    }
                }
            }
            Outcome::InFlight(error) => {
                checked.in_flight += 1;
                let ids: Vec<Uuid> = attempt
                    .parts
                    .iter()
                    .flat_map(|p| p.events.iter().map(|e| e.id))
                    .collect();
                let found = ids.iter().filter(|id| by_id.contains_key(id)).count();
                assert!(
                    found == 0 || found == ids.len(),
                    "{label}: an append in flight at the kill ({error}) is partly written: \
                     {found} of its {} events are there; {}",
                    ids.len(),
                    attempt.describe()
                );
                let written = found > 0;
                if written {
                    checked.in_flight_written += 1;
                    // Each stream's events are contiguous, in order, as sent.
                    for part in &attempt.parts {
                        let first = &all[by_id[&part.events[0].id]];
                        for (k, event) in part.events.iter().enumerate() {
                            let seen = &all[by_id[&event.id]];
                            let expected = Expected {
                                stream: part.stream.clone(),
                                revision: first.revision + k as u64,
                                position: first.position + k as u64,
                                event: event.clone(),
                                recorded_at: None,
                                origin: format!("in flight, found written: {}", attempt.describe()),
                            };
                            assert_matches(seen, &expected, label);
                            model.present.insert(event.id, expected);
                        }
                    }
                } else {
                    for id in &ids {
                        model.absent.insert(
                            *id,
                            format!("in flight, not written: {}", attempt.describe()),
                        );
                    }
                }
                if attempt.is_own_stream_append() {
                    retries.push((attempt, written));
                }
            }
        }
    }

    // Nothing that must be absent is there, and nothing is there that nobody sent.
    for (id, why) in &model.absent {
        assert!(
            !by_id.contains_key(id),
            "{label}: event {id} is present but must not be ({why}): {}",
            all[by_id[id]].raw
        );
    }
    if all.len() != model.present.len() {
        let unknown: Vec<&Value> = all
            .iter()
            .filter(|e| !model.present.contains_key(&e.id))
            .map(|e| &e.raw)
            .take(5)
            .collect();
        panic!(
            "{label}: the store holds {} events, the clients account for {}; unknown ones: \
             {unknown:?}",
            all.len(),
            model.present.len()
        );
    }
    checked.events_in_store = all.len();
    (checked, retries)
}

/// Re-sends the in-flight appends to own streams with the same ids and expected version: a
/// replay of the original result when they were written, a write when not.
async fn retry(
    client: &reqwest::Client,
    base: &str,
    model: &mut Model,
    retries: Vec<(Attempt, bool)>,
    label: &str,
) {
    for (attempt, written) in retries {
        let (status, body) = send(
            client,
            base,
            &attempt.path,
            attempt.expected_version.as_deref(),
            &attempt.body,
        )
        .await
        .unwrap_or_else(|e| panic!("{label}: retrying {}: {e:?}", attempt.describe()));
        assert_eq!(
            status,
            201,
            "{label}: the retry of an in-flight append (written: {written}) answered {body}; {}",
            attempt.describe()
        );
        let acks = acks_of(&attempt, &body);
        if written {
            let part = &attempt.parts[0];
            let last = &model.present[&part.events[part.events.len() - 1].id];
            assert_eq!(
                (acks[0].next_expected_version, acks[0].position),
                (last.revision, last.position),
                "{label}: the retry of a written append is not a replay of it: {body}; {}",
                attempt.describe()
            );
        } else {
            model.acknowledge(&attempt, &acks, "written by the retry after the restart");
        }
    }
}

// ---- the test -------------------------------------------------------------------------------

#[test]
fn acknowledged_http_appends_survive_kill_9() {
    let seed: u64 = std::env::var("FACTLINE_SERVE_KILL9_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            now.as_secs() ^ u64::from(now.subsec_nanos()).rotate_left(32)
        });
    let cycles: usize = std::env::var("FACTLINE_SERVE_KILL9_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    eprintln!(
        "serve_kill9: seed {seed}, {cycles} cycles (replay: FACTLINE_SERVE_KILL9_SEED={seed})"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let data = KeepOnPanic(Some(tempfile::tempdir().unwrap()));
    let logs = KeepOnPanic(Some(tempfile::tempdir().unwrap()));
    let events = runtime.block_on(Box::pin(run(seed, cycles, data.path(), logs.path())));

    // The data directory verifies offline too, holding exactly what the API showed.
    let output = Command::new(env!("CARGO_BIN_EXE_factline"))
        .args(["verify", "--json", "--data"])
        .arg(data.path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "factline verify failed (seed {seed}): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        report["events"].as_u64(),
        Some(events as u64),
        "seed {seed}: factline verify counts other events than the API showed: {report}"
    );
    eprintln!("serve_kill9: factline verify: {report}");
}

/// A temporary directory that is kept, and named, when the test fails.
struct KeepOnPanic(Option<tempfile::TempDir>);

impl KeepOnPanic {
    fn path(&self) -> &Path {
        self.0.as_ref().unwrap().path()
    }
}

impl Drop for KeepOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.0.take()
        {
            eprintln!("serve_kill9: kept for inspection: {}", dir.keep().display());
        }
    }
}

/// The kill cycles; returns how many events the store holds at the end.
async fn run(seed: u64, cycles: usize, data: &Path, logs: &Path) -> usize {
    let began = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let client = reqwest::Client::new();
    let mut model = Model::default();
    let mut attempts: Vec<Attempt> = Vec::new();
    let mut previous_log = None;
    let mut checked_total = 0;
    for start in 0..=cycles {
        let starting = Instant::now();
        let mut server = ServerProcess::start(data, logs, start, previous_log, &client).await;
        let startup = starting.elapsed();
        if start > 0 {
            let label = format!("seed {seed}, after kill {start}");
            let check_began = Instant::now();
            let (checked, retries) = verify(
                &client,
                &server.base,
                &mut model,
                std::mem::take(&mut attempts),
                &mut rng,
                &label,
            )
            .await;
            let retried = retries.len();
            let acknowledged = model.acknowledged_events;
            retry(&client, &server.base, &mut model, retries, &label).await;
            checked_total += checked.events_in_store;
            eprintln!(
                "serve_kill9: restart {start}: {} events in the store, all checked \
                 ({acknowledged} acknowledged so far); {} in flight at the kill, {} of them \
                 written; {} rejected (409); {retried} in flight retried; checked in {} ms",
                checked.events_in_store,
                checked.in_flight,
                checked.in_flight_written,
                checked.rejected,
                check_began.elapsed().as_millis()
            );
        }
        if start == cycles {
            // The retries must have left everything in order too.
            let label = format!("seed {seed}, at the end");
            let (checked, _) = verify(
                &client,
                &server.base,
                &mut model,
                Vec::new(),
                &mut rng,
                &label,
            )
            .await;
            checked_total += checked.events_in_store;
            server.kill();
            break;
        }

        // The load, until the kill.
        let shared: Vec<Option<u64>> = (0..SHARED_STREAMS)
            .map(|s| model.last_revision(&format!("shared-{s}")))
            .collect();
        let load = Arc::new(Load {
            base: server.base.clone(),
            killed: AtomicBool::new(false),
            shared: Mutex::new(shared),
        });
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                let own = model.last_revision(&format!("own-{w}"));
                tokio::spawn(worker(Arc::clone(&load), w, start, own, rng.random()))
            })
            .collect();
        let delay = rng.random_range(KILL_DELAY_MS);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        load.killed.store(true, Ordering::SeqCst);
        server.kill();
        let mut failures = Vec::new();
        let mut conflicts = 0;
        for handle in workers {
            let report = tokio::time::timeout(Duration::from_secs(30), handle)
                .await
                .expect("a client still runs 30 s after the kill")
                .unwrap();
            conflicts += report.conflicts;
            failures.extend(report.failure);
            attempts.extend(report.attempts);
        }
        assert!(
            failures.is_empty(),
            "seed {seed}, cycle {start}: the server failed under load:\n{}",
            failures.join("\n")
        );
        let acknowledged: usize = attempts
            .iter()
            .filter(|a| matches!(a.outcome, Outcome::Acknowledged(_)))
            .count();
        assert!(
            acknowledged > 0,
            "seed {seed}, cycle {start}: nothing was acknowledged in {delay} ms"
        );
        eprintln!(
            "serve_kill9: cycle {start}: up after {} ms, killed {delay} ms into the load: \
             {} requests, {acknowledged} acknowledged, {conflicts} conflicts",
            startup.as_millis(),
            attempts.len()
        );
        previous_log = Some(server.log.clone());
    }
    eprintln!(
        "serve_kill9: seed {seed}: {cycles} kills; {} acknowledged events in {} appends, all \
         present after every later restart ({checked_total} event checks); {} s",
        model.acknowledged_events,
        model.acknowledged_appends,
        began.elapsed().as_secs_f32()
    );
    model.present.len()
}
