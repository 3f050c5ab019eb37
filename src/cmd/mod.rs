//! One module per subcommand of `batchd`, each a thin layer over the library:
//! its clap arguments and a `run`. What two commands need lives here once:
//! loading the config and the progress bar.

pub mod bench;
pub mod cost;
pub mod demo;
pub mod dlq;
pub mod run;
pub mod sim;
pub mod status;
pub mod submit;

use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::config::Config;

/// The config at `path` (merged over the documented defaults), or the
/// defaults; `nats_url` replaces `nats.url` when given.
pub fn load_config(path: Option<&Path>, nats_url: Option<&str>) -> anyhow::Result<Config> {
    let mut config = match path {
        Some(p) => Config::load(p)?,
        None => Config::defaults()?,
    };
    if let Some(url) = nats_url {
        config.nats.url = url.to_owned();
    }
    Ok(config)
}

/// A progress bar of `len` steps named `prefix`, with rate and ETA.
pub fn progress_bar(len: usize, prefix: &str) -> ProgressBar {
    let style = ProgressStyle::with_template(
        "{prefix:>10} {spinner} [{bar:40.cyan/blue}] {human_pos}/{human_len} {per_sec} eta {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let pb = ProgressBar::new(len as u64)
        .with_style(style)
        .with_prefix(prefix.to_owned());
    pb.enable_steady_tick(Duration::from_millis(100));
    pb
}

/// A progress bar over a run of `secs` seconds named `prefix`, with a message.
pub fn clock_bar(secs: u64, prefix: &str) -> ProgressBar {
    let style = ProgressStyle::with_template(
        "{prefix:>10} {spinner} [{bar:40.cyan/blue}] {pos}/{len} s {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let pb = ProgressBar::new(secs)
        .with_style(style)
        .with_prefix(prefix.to_owned());
    pb.enable_steady_tick(Duration::from_millis(100));
    pb
}
