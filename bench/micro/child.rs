//! Running a micro-benchmark's measurement in a process of its own, so
//! that one table's or one setting's memory cannot leak into another's
//! figures. Included with `#[path = "child.rs"] mod child;`.
//!
//! The benchmark's `main` runs the measurement when its first argument is
//! `child`, and prints its figures as `key=value` words; the parent reads
//! them back as [`Figures`].

use std::collections::HashMap;

/// Figures by name, as a child printed them.
pub type Figures = HashMap<String, f64>;

/// Runs this benchmark's own binary as `child ARGS...`, with `envs` set,
/// and returns the figures it printed. Panics if the child fails.
pub fn run_child(args: &[&str], envs: &[(&str, &str)]) -> Figures {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("child")
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .expect("run child");
    assert!(
        out.status.success(),
        "child {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
        .collect()
}
