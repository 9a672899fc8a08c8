//! W10 for one second against a real server: wrk's answers are parsed and checked against the
//! log (the harness fails if the log holds fewer events than wrk saw 201s).

use factline_bench::{W10Options, run_w10};

#[test]
#[ignore = "needs wrk: set FACTLINE_TEST_WRK"]
fn wrk_appends_are_all_answered_and_stored() -> anyhow::Result<()> {
    let wrk = std::env::var("FACTLINE_TEST_WRK")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let options = W10Options {
        rounds: 1,
        duration: std::time::Duration::from_secs(1),
        connections: 4,
        wrk,
    };
    let dir = tempfile::tempdir()?;
    let rounds = runtime.block_on(run_w10(&options, dir.path()))?;
    assert_eq!(rounds.len(), 1);
    let round = &rounds[0];
    assert!(
        round.requests > 0 && round.requests_per_sec > 0.0,
        "{round:?}"
    );
    assert!(round.events_stored >= round.requests, "{round:?}");
    assert!(
        round.p50_us > 0.0 && round.p50_us <= round.p99_us,
        "{round:?}"
    );
    Ok(())
}
