//! `factline-bench`: see the library docs and `--help`.
#![allow(clippy::print_stdout)]

use anyhow::Context as _;
use clap::Parser as _;
use factline_bench::{Cli, Config};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::from_cli(&cli);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    let report = runtime.block_on(factline_bench::run(&config))?;
    print!("{}", report.render());
    if let Some(path) = &cli.json {
        std::fs::write(path, report.to_json()? + "\n")
            .with_context(|| format!("write {}", path.display()))?;
        eprintln!("[factline-bench] wrote {}", path.display());
    }
    Ok(())
}
