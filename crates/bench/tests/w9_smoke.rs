//! W9 in tiny sizes: every rebuild processes every event (the harness checks counts and, for
//! PostgreSQL, the rows of the history table).

use factline_bench::{W9Options, render_w9, run_w9};

fn tiny(postgres_url: Option<String>) -> W9Options {
    W9Options {
        events: 2_500,
        rounds: 1,
        checkpoint_every_events: 1_000,
        postgres_url,
    }
}

fn run(options: &W9Options) -> anyhow::Result<Vec<factline_bench::W9Row>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let rows = runtime.block_on(run_w9(options, dir.path()))?;
    eprintln!("{}", render_w9(&rows));
    Ok(rows)
}

#[test]
fn rebuilds_into_memory_process_every_event() -> anyhow::Result<()> {
    let rows = run(&tiny(None))?;
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert!(rows.iter().all(|row| row.events_per_sec > 0.0), "{rows:?}");
    Ok(())
}

#[test]
#[ignore = "needs postgres: set FACTLINE_TEST_POSTGRES_URL"]
fn a_rebuild_into_postgres_writes_every_row() -> anyhow::Result<()> {
    let url = std::env::var("FACTLINE_TEST_POSTGRES_URL")?;
    let rows = run(&tiny(Some(url)))?;
    assert!(rows.iter().any(|row| row.model == "postgres"), "{rows:?}");
    Ok(())
}
