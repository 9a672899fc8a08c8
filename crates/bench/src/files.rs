//! The file options the workload binaries share.

use std::path::PathBuf;

use anyhow::Context as _;

/// Where a workload binary keeps data and writes its JSON.
#[derive(Debug, Clone, clap::Args)]
pub struct RunFiles {
    /// Directory for the run's data directories (default: the system temp dir).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Also write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

impl RunFiles {
    /// The directory for data directories.
    pub fn data_root(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(std::env::temp_dir)
    }

    /// Writes `results` to the JSON file, when one was asked for.
    pub fn write_json(&self, results: &impl serde::Serialize) -> anyhow::Result<()> {
        if let Some(path) = &self.json {
            std::fs::write(path, serde_json::to_string_pretty(results)? + "\n")
                .with_context(|| format!("write {}", path.display()))?;
        }
        Ok(())
    }
}
