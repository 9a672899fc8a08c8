//! Results: the median round, the table, the ratios and the JSON.

use std::{fmt::Write as _, time::Duration};

use serde::Serialize;

use crate::config::{Profile, SystemKind, WorkloadKind};

/// One measured (workload, system, writers) result: the JSON object of the issue.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// `W1` … `W6`.
    pub workload: String,
    /// System name, e.g. `sqlite`.
    pub system: String,
    /// Concurrent writers (1 reader for W4/W5, 1 writer for W6).
    pub writers: usize,
    /// Events acknowledged (W1–W3, W6: delivered) or read (W4, W5) per second.
    pub events_per_sec: f64,
    /// Median latency per operation in µs (W6: lag from acknowledgement to delivery).
    pub p50_us: u64,
    /// 99th percentile latency in µs.
    pub p99_us: u64,
    /// W3 only: appends that won.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wins: Option<u64>,
    /// W3 only: appends refused with a conflict.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conflicts: Option<u64>,
}

/// How one (workload, system, writers) ended.
#[derive(Debug, Clone, PartialEq)]
pub enum CellStatus {
    /// Measured: the median round.
    Measured {
        /// The median round's result.
        row: Row,
        /// Rounds that succeeded.
        rounds_ok: usize,
        /// Rounds attempted.
        rounds: usize,
        /// A remark, e.g. a capped connection pool, or the error of a failed round.
        note: Option<String>,
    },
    /// The system cannot run this workload honestly.
    NotApplicable(String),
    /// Every round failed.
    Failed(String),
}

/// One line of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct CellReport {
    /// The workload.
    pub workload: WorkloadKind,
    /// The system.
    pub system: SystemKind,
    /// Writers.
    pub writers: usize,
    /// What happened.
    pub status: CellStatus,
}

/// Everything a run found.
#[derive(Debug, Clone)]
pub struct Report {
    /// Which size of run.
    pub profile: Profile,
    /// Rounds run.
    pub rounds: usize,
    /// Header lines: sizes, data directory, filesystem.
    pub environment: Vec<String>,
    /// Systems that ran, with their configuration.
    pub systems: Vec<(SystemKind, String)>,
    /// Systems skipped, with the reason.
    pub skipped: Vec<(SystemKind, String)>,
    /// One entry per (workload, writers, system), in table order.
    pub cells: Vec<CellReport>,
    /// Wall time of the whole run.
    pub elapsed: Duration,
}

impl Report {
    /// The measured rows, in table order.
    pub fn rows(&self) -> Vec<Row> {
        self.cells
            .iter()
            .filter_map(|cell| match &cell.status {
                CellStatus::Measured { row, .. } => Some(row.clone()),
                _ => None,
            })
            .collect()
    }

    /// The JSON array of the measured rows.
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string_pretty(&self.rows())
    }

    /// The whole text report: header, table, notes and, when factline-log ran, its ratios.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for line in &self.environment {
            let _ = writeln!(out, "{line}");
        }
        if !self.systems.is_empty() {
            let _ = writeln!(out, "\nsystems:");
            for (kind, description) in &self.systems {
                let _ = writeln!(out, "  {:<17} {description}", display_name(*kind));
            }
        }
        if !self.skipped.is_empty() {
            let _ = writeln!(out, "\nskipped:");
            for (kind, reason) in &self.skipped {
                let _ = writeln!(out, "  {:<17} {reason}", kind.name());
            }
        }
        let _ = writeln!(out);
        out.push_str(&format_table(&self.cells));
        let _ = writeln!(out);
        for workload in WorkloadKind::ALL {
            if self.cells.iter().any(|cell| cell.workload == workload) {
                let _ = writeln!(out, "{workload}: {}", workload.description());
            }
        }
        if self.cells.iter().any(|cell| {
            !cell.system.durable() && matches!(cell.status, CellStatus::Measured { .. })
        }) {
            let _ = writeln!(
                out,
                "*: not durable (acknowledged from memory): a reference, not a peer"
            );
        }
        let ratios = ratios(&self.rows());
        if !ratios.is_empty() {
            let _ = writeln!(out);
            out.push_str(&format_ratios(&ratios));
        }
        let _ = writeln!(
            out,
            "\n{} run, {} round(s) (median round reported), {:.1} s",
            self.profile.name(),
            self.rounds,
            self.elapsed.as_secs_f64()
        );
        out
    }
}

/// The name in the table: non-durable systems carry a `*`.
fn display_name(kind: SystemKind) -> String {
    if kind.durable() {
        kind.name().to_owned()
    } else {
        format!("{}*", kind.name())
    }
}

/// The round to report among `rounds` (one result per round): the median by events/s (by p50
/// lag for W6, where lower is better and throughput is paced). With an even number of rounds,
/// the lower-throughput (higher-lag) of the two middle rounds.
pub fn median_round(rounds: &[Row]) -> Option<&Row> {
    let mut sorted: Vec<&Row> = rounds.iter().collect();
    if sorted.first()?.workload == WorkloadKind::W6.name() {
        sorted.sort_by_key(|row| std::cmp::Reverse(row.p50_us));
    } else {
        sorted.sort_by(|a, b| a.events_per_sec.total_cmp(&b.events_per_sec));
    }
    sorted.get((sorted.len() - 1) / 2).copied()
}

/// A factline system against one peer on one (workload, writers). Every ratio reads "> 1: the
/// factline system is better".
#[derive(Debug, Clone, PartialEq)]
pub struct Ratio {
    /// The factline system: `factline-log`, or `factline-postgres` (compared with the
    /// PostgreSQL-backed peers only).
    pub ours: String,
    /// The workload.
    pub workload: String,
    /// Writers.
    pub writers: usize,
    /// The peer.
    pub peer: String,
    /// ours events/s ÷ peer events/s (`None` for W6, whose appends are paced).
    pub throughput: Option<f64>,
    /// peer p50 ÷ ours p50.
    pub p50: Option<f64>,
    /// peer p99 ÷ ours p99.
    pub p99: Option<f64>,
}

fn divide(numerator: f64, denominator: f64) -> Option<f64> {
    (denominator > 0.0 && numerator.is_finite()).then(|| numerator / denominator)
}

/// The ratios of factline-log to every other system, and of factline-postgres to the
/// PostgreSQL-backed peers (plain table, cqrs-es), measured on the same (workload, writers).
pub fn ratios(rows: &[Row]) -> Vec<Ratio> {
    let log = SystemKind::FactlineLog.name();
    let postgres = SystemKind::FactlinePostgres.name();
    let postgres_peers = [SystemKind::Postgres.name(), SystemKind::CqrsEs.name()];
    let mut out = Vec::new();
    for ours in rows
        .iter()
        .filter(|row| row.system == log || row.system == postgres)
    {
        for peer in rows.iter().filter(|row| {
            let comparable = if ours.system == log {
                row.system != log
            } else {
                postgres_peers.contains(&row.system.as_str())
            };
            comparable && row.workload == ours.workload && row.writers == ours.writers
        }) {
            out.push(Ratio {
                ours: ours.system.clone(),
                workload: ours.workload.clone(),
                writers: ours.writers,
                peer: peer.system.clone(),
                throughput: (ours.workload != WorkloadKind::W6.name())
                    .then(|| divide(ours.events_per_sec, peer.events_per_sec))
                    .flatten(),
                p50: divide(peer.p50_us as f64, ours.p50_us as f64),
                p99: divide(peer.p99_us as f64, ours.p99_us as f64),
            });
        }
    }
    out
}

/// `1234567` → `1,234,567`.
pub fn group_thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

fn format_rate(events_per_sec: f64) -> String {
    if events_per_sec >= 100.0 {
        group_thousands(events_per_sec.round() as u64)
    } else {
        format!("{events_per_sec:.1}")
    }
}

/// The results table: workload, system, writers, events/s, p50 µs, p99 µs, notes.
pub fn format_table(cells: &[CellReport]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<8} {:<17} {:>7} {:>12} {:>10} {:>10}  notes",
        "workload", "system", "writers", "events/s", "p50 µs", "p99 µs"
    );
    for cell in cells {
        let name = display_name(cell.system);
        let (rate, p50, p99, notes) = match &cell.status {
            CellStatus::Measured {
                row,
                rounds_ok,
                rounds,
                note,
            } => {
                let mut notes = Vec::new();
                if let (Some(wins), Some(conflicts)) = (row.wins, row.conflicts) {
                    notes.push(format!(
                        "wins {}, conflicts {}",
                        group_thousands(wins),
                        group_thousands(conflicts)
                    ));
                }
                if rounds_ok < rounds {
                    notes.push(format!("{rounds_ok}/{rounds} rounds ok"));
                }
                notes.extend(note.clone());
                (
                    format_rate(row.events_per_sec),
                    group_thousands(row.p50_us),
                    group_thousands(row.p99_us),
                    notes.join("; "),
                )
            }
            CellStatus::NotApplicable(reason) => (
                "-".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
                format!("n/a: {reason}"),
            ),
            CellStatus::Failed(error) => (
                "-".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
                format!("error: {error}"),
            ),
        };
        let line = format!(
            "{:<8} {:<17} {:>7} {:>12} {:>10} {:>10}  {notes}",
            cell.workload.name(),
            name,
            cell.writers,
            rate,
            p50,
            p99
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

/// The ratio table.
pub fn format_ratios(ratios: &[Ratio]) -> String {
    let show = |ratio: Option<f64>| ratio.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x"));
    let mut out =
        String::from("factline vs peers (every ratio > 1 means the factline system is better)\n");
    let _ = writeln!(
        out,
        "{:<17} {:<8} {:>7} {:<17} {:>12} {:>10} {:>10}",
        "factline", "workload", "writers", "peer", "events/s", "p50", "p99"
    );
    for ratio in ratios {
        let _ = writeln!(
            out,
            "{:<17} {:<8} {:>7} {:<17} {:>12} {:>10} {:>10}",
            ratio.ours,
            ratio.workload,
            ratio.writers,
            ratio.peer,
            show(ratio.throughput),
            show(ratio.p50),
            show(ratio.p99)
        );
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn row(workload: &str, system: &str, writers: usize, eps: f64, p50: u64, p99: u64) -> Row {
        Row {
            workload: workload.to_owned(),
            system: system.to_owned(),
            writers,
            events_per_sec: eps,
            p50_us: p50,
            p99_us: p99,
            wins: None,
            conflicts: None,
        }
    }

    #[test]
    fn median_round_is_the_middle_by_throughput() {
        let rounds = [
            row("W1", "sqlite", 8, 300.0, 10, 20),
            row("W1", "sqlite", 8, 100.0, 30, 60),
            row("W1", "sqlite", 8, 200.0, 20, 40),
        ];
        assert_eq!(median_round(&rounds).unwrap().events_per_sec, 200.0);
        // Even count: the lower of the two middle rounds.
        assert_eq!(median_round(&rounds[..2]).unwrap().events_per_sec, 100.0);
        assert_eq!(median_round(&rounds[..1]).unwrap().events_per_sec, 300.0);
        assert!(median_round(&[]).is_none());
    }

    #[test]
    fn median_round_of_w6_is_the_middle_by_lag() {
        let rounds = [
            row("W6", "postgres", 1, 400.0, 900, 2000),
            row("W6", "postgres", 1, 500.0, 100, 200),
            row("W6", "postgres", 1, 450.0, 500, 900),
            row("W6", "postgres", 1, 450.0, 700, 900),
        ];
        // Sorted by lag, worst first: 900, 700, 500, 100; index (4-1)/2 = 1.
        assert_eq!(median_round(&rounds).unwrap().p50_us, 700);
    }

    #[test]
    fn ratios_compare_factline_log_with_each_peer() {
        let rows = [
            row("W1", "factline-log", 8, 1000.0, 100, 400),
            row("W1", "sqlite", 8, 250.0, 400, 800),
            row("W1", "postgres", 8, 2000.0, 0, 200),
            row("W1", "sqlite", 1, 50.0, 10, 10),
            row("W6", "factline-log", 1, 500.0, 50, 100),
            row("W6", "postgres", 1, 480.0, 500, 1000),
        ];
        let ratios = ratios(&rows);
        assert_eq!(ratios.len(), 3);
        assert_eq!(ratios[0].peer, "sqlite");
        assert_eq!(ratios[0].throughput, Some(4.0));
        assert_eq!(ratios[0].p50, Some(4.0));
        assert_eq!(ratios[0].p99, Some(2.0));
        assert_eq!(ratios[1].throughput, Some(0.5));
        assert_eq!(ratios[1].p50, Some(0.0));
        assert_eq!(ratios[2].workload, "W6");
        assert_eq!(ratios[2].throughput, None);
        assert_eq!(ratios[2].p50, Some(10.0));
        let zero = [
            row("W1", "factline-log", 1, 10.0, 0, 0),
            row("W1", "sqlite", 1, 0.0, 5, 5),
        ];
        let ratios = super::ratios(&zero);
        assert_eq!(ratios[0].throughput, None);
        assert_eq!(ratios[0].p50, None);
        assert!(super::ratios(&rows[1..4]).is_empty());
        let table = format_ratios(&super::ratios(&rows));
        assert!(table.contains("4.00x"), "{table}");
        assert!(
            table.lines().nth(4).unwrap().contains("     -  "),
            "{table}"
        );
    }

    #[test]
    fn json_has_the_required_fields_and_wins_only_for_w3() {
        let mut w3 = row("W3", "postgres", 32, 1234.5, 800, 5000);
        w3.wins = Some(617);
        w3.conflicts = Some(4000);
        let report = Report {
            profile: Profile::Quick,
            rounds: 1,
            environment: vec![],
            systems: vec![],
            skipped: vec![],
            cells: vec![
                CellReport {
                    workload: WorkloadKind::W1,
                    system: SystemKind::Sqlite,
                    writers: 1,
                    status: CellStatus::Measured {
                        row: row("W1", "sqlite", 1, 321.0, 3000, 6000),
                        rounds_ok: 1,
                        rounds: 1,
                        note: None,
                    },
                },
                CellReport {
                    workload: WorkloadKind::W3,
                    system: SystemKind::Postgres,
                    writers: 32,
                    status: CellStatus::Measured {
                        row: w3,
                        rounds_ok: 1,
                        rounds: 1,
                        note: None,
                    },
                },
                CellReport {
                    workload: WorkloadKind::W6,
                    system: SystemKind::Sqlite,
                    writers: 1,
                    status: CellStatus::NotApplicable("no notifications".to_owned()),
                },
            ],
            elapsed: Duration::from_secs(1),
        };
        let json: serde_json::Value = serde_json::from_str(&report.to_json().unwrap()).unwrap();
        let array = json.as_array().unwrap();
        assert_eq!(array.len(), 2, "n/a cells are not rows");
        let required = [
            "workload",
            "system",
            "writers",
            "events_per_sec",
            "p50_us",
            "p99_us",
        ];
        for object in array {
            let object = object.as_object().unwrap();
            for key in required {
                assert!(object.contains_key(key), "{key} missing in {object:?}");
            }
        }
        let first = array[0].as_object().unwrap();
        assert_eq!(first.len(), 6);
        assert_eq!(first["workload"], "W1");
        assert_eq!(first["system"], "sqlite");
        assert_eq!(first["writers"], 1);
        assert_eq!(first["events_per_sec"], 321.0);
        assert_eq!(first["p50_us"], 3000);
        let second = array[1].as_object().unwrap();
        assert_eq!(second["wins"], 617);
        assert_eq!(second["conflicts"], 4000);
        assert_eq!(second.len(), 8);
        let text = report.render();
        assert!(text.contains("wins 617, conflicts 4,000"), "{text}");
        assert!(text.contains("n/a: no notifications"), "{text}");
    }

    #[test]
    fn table_aligns_columns_and_marks_non_durable_systems() {
        let cells = vec![
            CellReport {
                workload: WorkloadKind::W1,
                system: SystemKind::FactlineMemory,
                writers: 128,
                status: CellStatus::Measured {
                    row: row("W1", "factline-memory", 128, 1_234_567.8, 12, 1_500),
                    rounds_ok: 2,
                    rounds: 3,
                    note: Some("note".to_owned()),
                },
            },
            CellReport {
                workload: WorkloadKind::W5,
                system: SystemKind::FsyncFloor,
                writers: 1,
                status: CellStatus::Failed("timed out".to_owned()),
            },
            CellReport {
                workload: WorkloadKind::W2,
                system: SystemKind::Sqlite,
                writers: 1,
                status: CellStatus::Measured {
                    row: row("W2", "sqlite", 1, 42.25, 2, 3),
                    rounds_ok: 1,
                    rounds: 1,
                    note: None,
                },
            },
        ];
        let table = format_table(&cells);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "workload system            writers     events/s     p50 µs     p99 µs  notes"
        );
        assert_eq!(
            lines[1],
            "W1       factline-memory*      128    1,234,568         12      1,500  2/3 rounds ok; note"
        );
        assert_eq!(
            lines[2],
            "W5       fsync-floor             1            -          -          -  error: timed out"
        );
        assert_eq!(
            lines[3],
            "W2       sqlite                  1         42.2          2          3"
        );
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(group_thousands(0), "0");
        assert_eq!(group_thousands(999), "999");
        assert_eq!(group_thousands(1_000), "1,000");
        assert_eq!(group_thousands(1_234_567), "1,234,567");
    }
}
