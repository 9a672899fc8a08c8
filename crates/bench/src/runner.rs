//! The run: open the systems, preload, interleave the rounds, pick the median round, tear down.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, anyhow};

use crate::{
    config::{Cell, Config, SystemKind, WorkloadKind},
    report::{CellReport, CellStatus, Report, Row, group_thousands, median_round},
    systems::{self, SetupContext, System},
    workloads::{self, Measurement, W4_STREAM, W6_INTERVAL},
};

/// Bound on one system's teardown.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// A progress line on stderr.
macro_rules! progress {
    ($($arg:tt)*) => { eprintln!("[factline-bench] {}", format_args!($($arg)*)) };
}

/// The filesystem type of the mount holding `path`, from `/proc/mounts` (Linux), if known.
fn filesystem_of(path: &Path) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    let path = path.canonicalize().ok()?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _device = fields.next()?;
            let mount_point = fields.next()?.replace("\\040", " ");
            let fs_type = fields.next()?;
            path.starts_with(&mount_point)
                .then(|| (mount_point.len(), fs_type.to_owned()))
        })
        .max_by_key(|(length, _)| *length)
        .map(|(_, fs_type)| fs_type)
}

fn run_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.subsec_nanos());
    format!("{}_{}", std::process::id(), nanos % 1_000_000)
}

/// Opens one system, bounded by the setup timeout.
async fn open_system(
    kind: SystemKind,
    ctx: &SetupContext<'_>,
    timeout: Duration,
) -> Result<Arc<dyn System>> {
    tokio::time::timeout(timeout, systems::open(kind, ctx))
        .await
        .map_err(|_| anyhow!("setup took over {}s", timeout.as_secs()))?
}

/// Loads what W4 and W5 read, untimed. `$all` starts with the W5 events, so that every system
/// scans the same events whatever the other workloads wrote.
async fn preload(system: &Arc<dyn System>, config: &Config) -> Result<()> {
    let sizes = &config.sizes;
    let wants = |workload: WorkloadKind| {
        config.workloads.contains(&workload) && system.not_applicable(workload).is_none()
    };
    if !wants(WorkloadKind::W4) && !wants(WorkloadKind::W5) {
        return Ok(());
    }
    system.prepare(1).await?;
    let result = async {
        if wants(WorkloadKind::W5) {
            let started = Instant::now();
            let mut next_report = sizes.w5_events / 4;
            workloads::preload_all(system, sizes.w5_events, sizes.w5_batch, |written| {
                if written >= next_report && written < sizes.w5_events {
                    progress!(
                        "  {}: preloaded {} of {} events",
                        system.kind(),
                        group_thousands(written),
                        group_thousands(sizes.w5_events)
                    );
                    next_report += sizes.w5_events / 4;
                }
            })
            .await
            .context("W5 preload")?;
            progress!(
                "  {}: preloaded {} events for W5 in {:.1} s",
                system.kind(),
                group_thousands(sizes.w5_events),
                started.elapsed().as_secs_f64()
            );
        }
        if wants(WorkloadKind::W4) {
            workloads::preload_stream(system, W4_STREAM, sizes.w4_events, sizes.w4_batch)
                .await
                .context("W4 preload")?;
        }
        Ok(())
    }
    .await;
    system.release().await?;
    result
}

/// One phase: prepare, measure (bounded), release.
async fn run_phase(
    system: &Arc<dyn System>,
    cell: Cell,
    config: &Config,
    round: usize,
) -> Result<Measurement> {
    let sizes = &config.sizes;
    let slack = if cell.workload == WorkloadKind::W5 {
        sizes.scan_slack
    } else {
        sizes.phase_slack
    };
    let limit = sizes.warmup + sizes.measure + slack;
    system.prepare(cell.writers).await?;
    let result = tokio::time::timeout(limit, workloads::run_cell(system, cell, sizes, round))
        .await
        .map_err(|_| anyhow!("phase timed out after {}s", limit.as_secs()))
        .and_then(|result| result);
    system.release().await?;
    result
}

fn to_row(cell: Cell, kind: SystemKind, measurement: &Measurement) -> Row {
    Row {
        workload: cell.workload.name().to_owned(),
        system: kind.name().to_owned(),
        writers: cell.writers,
        events_per_sec: (measurement.events_per_sec() * 10.0).round() / 10.0,
        p50_us: measurement.p50_us(),
        p99_us: measurement.p99_us(),
        wins: measurement.wins,
        conflicts: measurement.conflicts,
    }
}

#[derive(Default)]
struct Collected {
    rows: Vec<Row>,
    errors: Vec<String>,
    not_applicable: Option<String>,
    note: Option<String>,
}

/// Runs the benchmark described by `config`. Progress goes to stderr; the report is returned.
pub async fn run(config: &Config) -> Result<Report> {
    let started = Instant::now();
    let sizes = &config.sizes;
    let root = config.data_dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
    let data = tempfile::Builder::new()
        .prefix("factline-bench-")
        .tempdir_in(&root)
        .with_context(|| format!("create a temporary directory in {}", root.display()))?;
    let filesystem = filesystem_of(data.path()).unwrap_or_else(|| "unknown".to_owned());
    let mut environment = vec![
        format!(
            "factline-bench: {} profile, {} round(s), per phase {} ms warm-up + {} ms measured; \
             W1 writers {:?}, W2 batches of {}, W3 {} writers, W4 {} events, W5 {} events",
            config.profile.name(),
            sizes.rounds,
            sizes.warmup.as_millis(),
            sizes.measure.as_millis(),
            sizes.w1_writers,
            sizes.w2_batch,
            sizes.w3_writers,
            group_thousands(sizes.w4_events),
            group_thousands(sizes.w5_events),
        ),
        "durable systems acknowledge only after fsync/fdatasync; payloads are 200-byte JSON"
            .to_owned(),
        format!(
            "data dir {} (filesystem {filesystem}); W6 appends paced at one per {} ms",
            data.path().display(),
            W6_INTERVAL.as_millis()
        ),
    ];
    if matches!(filesystem.as_str(), "tmpfs" | "ramfs") {
        let warning = format!(
            "WARNING: the data dir is on {filesystem}: fsync is free there, file-backed numbers are not durable numbers"
        );
        progress!("{warning}");
        environment.push(warning);
    }
    progress!("data dir {} ({filesystem})", data.path().display());

    let run_id = run_id();
    let ctx = SetupContext {
        data_dir: data.path(),
        postgres_url: &config.postgres_url,
        sizes,
        run_id: &run_id,
    };
    let mut systems: Vec<Arc<dyn System>> = Vec::new();
    let mut skipped: Vec<(SystemKind, String)> = Vec::new();
    let cells = config.cells();
    let mut collected: BTreeMap<(Cell, SystemKind), Collected> = BTreeMap::new();
    let work = async {
        open_all(config, &ctx, &mut systems, &mut skipped).await;
        run_rounds(&systems, &cells, config, &mut collected).await;
    };
    let interrupted = tokio::select! {
        () = work => false,
        signal = tokio::signal::ctrl_c() => signal.is_ok(),
    };
    if interrupted {
        progress!("interrupted: tearing down");
    }

    for system in &systems {
        teardown(system).await;
    }
    let descriptions = systems
        .iter()
        .map(|system| (system.kind(), system.describe()))
        .collect();
    drop(systems);
    if let Err(error) = data.close() {
        progress!("could not remove the data dir: {error}");
    }
    if interrupted {
        anyhow::bail!("interrupted");
    }

    let report_cells = cells
        .iter()
        .flat_map(|&cell| {
            config
                .systems
                .iter()
                .filter_map(|&kind| collected.remove(&(cell, kind)).map(|c| (cell, kind, c)))
                .collect::<Vec<_>>()
        })
        .map(|(cell, kind, collected)| CellReport {
            workload: cell.workload,
            system: kind,
            writers: cell.writers,
            status: summarize(collected, sizes.rounds),
        })
        .collect();
    Ok(Report {
        profile: config.profile,
        rounds: sizes.rounds,
        environment,
        systems: descriptions,
        skipped,
        cells: report_cells,
        elapsed: started.elapsed(),
    })
}

/// Opens and preloads every selected system; those that fail are skipped with the reason.
async fn open_all(
    config: &Config,
    ctx: &SetupContext<'_>,
    systems: &mut Vec<Arc<dyn System>>,
    skipped: &mut Vec<(SystemKind, String)>,
) {
    let sizes = &config.sizes;
    for &kind in &config.systems {
        progress!("setting up {kind}");
        let system = match open_system(kind, ctx, sizes.setup_timeout).await {
            Ok(system) => system,
            Err(error) => {
                progress!("skipping {kind}: {error:#}");
                skipped.push((kind, format!("{error:#}")));
                continue;
            }
        };
        let loaded = tokio::time::timeout(sizes.setup_timeout, preload(&system, config))
            .await
            .map_err(|_| anyhow!("preload took over {}s", sizes.setup_timeout.as_secs()))
            .and_then(|result| result);
        match loaded {
            Ok(()) => systems.push(system),
            Err(error) => {
                progress!("skipping {kind}: {error:#}");
                skipped.push((kind, format!("{error:#}")));
                teardown(&system).await;
            }
        }
    }
}

/// Every round: for each workload, for each system (rotated every round so that no system
/// always runs first).
async fn run_rounds(
    systems: &[Arc<dyn System>],
    cells: &[Cell],
    config: &Config,
    collected: &mut BTreeMap<(Cell, SystemKind), Collected>,
) {
    let sizes = &config.sizes;
    for round in 0..sizes.rounds {
        for &cell in cells {
            for index in 0..systems.len() {
                let system = &systems[(index + round) % systems.len()];
                let kind = system.kind();
                let entry = collected.entry((cell, kind)).or_default();
                if let Some(reason) = system.not_applicable(cell.workload) {
                    entry.not_applicable = Some(reason.to_owned());
                    continue;
                }
                entry.note = system.phase_note(cell.writers);
                let label = format!(
                    "round {}/{} {} x{} {kind}",
                    round + 1,
                    sizes.rounds,
                    cell.workload,
                    cell.writers
                );
                match run_phase(system, cell, config, round).await {
                    Ok(measurement) => {
                        let row = to_row(cell, kind, &measurement);
                        progress!(
                            "{label}: {} events/s, p50 {} µs, p99 {} µs{}",
                            group_thousands(row.events_per_sec.round() as u64),
                            group_thousands(row.p50_us),
                            group_thousands(row.p99_us),
                            match (row.wins, row.conflicts) {
                                (Some(wins), Some(conflicts)) =>
                                    format!(", wins {wins}, conflicts {conflicts}"),
                                _ => String::new(),
                            }
                        );
                        entry.rows.push(row);
                    }
                    Err(error) => {
                        progress!("{label}: FAILED: {error:#}");
                        entry.errors.push(format!("{error:#}"));
                    }
                }
            }
        }
    }
}

/// Removes what a system created outside the data directory (bounded; failures are reported).
async fn teardown(system: &Arc<dyn System>) {
    let kind = system.kind();
    match tokio::time::timeout(TEARDOWN_TIMEOUT, system.teardown()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => progress!("teardown of {kind} failed: {error:#}"),
        Err(_) => progress!("teardown of {kind} timed out"),
    }
}

fn summarize(collected: Collected, rounds: usize) -> CellStatus {
    if let Some(reason) = collected.not_applicable {
        return CellStatus::NotApplicable(reason);
    }
    match median_round(&collected.rows) {
        Some(row) => {
            let mut notes: Vec<String> = collected.note.into_iter().collect();
            if let Some(error) = collected.errors.first() {
                notes.push(format!("failed round: {error}"));
            }
            CellStatus::Measured {
                row: row.clone(),
                rounds_ok: collected.rows.len(),
                rounds,
                note: (!notes.is_empty()).then(|| notes.join("; ")),
            }
        }
        None => CellStatus::Failed(
            collected
                .errors
                .first()
                .cloned()
                .unwrap_or_else(|| "no result".to_owned()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filesystem_of_root_is_known_on_linux() {
        if Path::new("/proc/mounts").exists() {
            assert!(filesystem_of(Path::new("/")).is_some());
        }
    }
}
