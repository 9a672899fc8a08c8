//! W7 in its tiny `--smoke` sizes: every system delivers, every row is filled in.

use factline_bench::{W7Options, W7System, render_w7, run_w7};

#[test]
fn every_w7_system_delivers_to_every_subscriber() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let options = W7Options::smoke();
    let rows = runtime.block_on(run_w7(&options))?;
    eprintln!("{}", render_w7(&rows));
    assert_eq!(rows.len(), W7System::ALL.len() * options.subscribers.len());
    for row in &rows {
        assert!(row.deliveries_per_sec > 0.0, "{row:?}");
        // (published/s may be 0 here: in these tiny sizes a publisher can spend the whole
        // measured window waiting for room in a full topic, and it counts a batch only when
        // its publish returns.)
        assert!(
            row.latency_p50_us > 0 && row.latency_p50_us <= row.latency_p99_us,
            "{row:?}"
        );
    }
    Ok(())
}
