//! End to end: a small connection flood (corepush-flood, 2 worker processes)
//! against the real server binary, checking from the flood's JSON summary
//! that every connection was established and no message was lost,
//! duplicated or misrouted.

mod util;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

/// Kills the server when the test ends, also when it fails.
struct ServerGuard(Child);

impl Drop for ServerGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `corepush --listen 127.0.0.1:0 --shards 2` and returns it with the
/// address parsed from its `listening on <addr>` log line.
fn start_server() -> (ServerGuard, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_corepush"))
        .args(["--listen", "127.0.0.1:0", "--shards", "2"])
        .args(["--api-listen", "127.0.0.1:0"]) // tests run side by side
        .args(util::runtime_args())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start corepush");
    let stderr = child.stderr.take().expect("piped stderr");
    let guard = ServerGuard(child);
    let (tx, rx) = mpsc::channel();
    // Keep draining the log so the server never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.split("listening on ").nth(1) {
                let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                if let Some(tx) = tx.take() {
                    let _ = tx.send(addr);
                }
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("server printed no `listening on <addr>` line");
    (guard, addr)
}

#[test]
fn small_flood_is_exact() {
    let (server, addr) = start_server();
    let conns = 2500;
    let output = Command::new(env!("CARGO_BIN_EXE_corepush-flood"))
        .args(["--target", &addr])
        .args(["--conns", &conns.to_string(), "--procs", "2"])
        .args(["--server-pid", &server.0.id().to_string()])
        .args(["--msgs", "400", "--msg-rate", "2000"])
        .args(["--broadcasts", "2", "--hold-secs", "0.5", "--churn", "0.05"])
        .args([
            "--calib-rounds",
            "2",
            "--drain-secs",
            "5",
            "--no-hgrm",
            "--json",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run corepush-flood");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stdout.lines().last().unwrap_or("");
    let report: Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("no JSON summary ({e}); stdout:\n{stdout}\nstderr:\n{stderr}"));
    let context = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    let c = &report["connections"];
    assert_eq!(c["requested"], conns, "{context}");
    assert_eq!(c["established"], conns, "{context}");
    assert_eq!(c["failed"], 0, "{context}");
    for phase in ["targeted", "churn"] {
        let t = &report[phase];
        assert!(t["sent"].as_u64().unwrap_or(0) > 0, "{phase}: {context}");
        for key in ["lost", "duplicated", "misrouted", "reordered"] {
            assert_eq!(t[key], 0, "{phase}.{key}: {context}");
        }
    }
    assert_eq!(report["targeted"]["sent"], 400, "{context}");
    assert_eq!(report["targeted"]["delivered"], 400, "{context}");
    let b = &report["broadcast"];
    assert_eq!(b["count"], 2, "{context}");
    assert_eq!(b["deliveries"], 2 * conns, "{context}");
    assert_eq!(b["lost"], 0, "{context}");
    assert_eq!(b["duplicated"], 0, "{context}");
    assert!(
        report["server"]["bytes_per_conn"].as_f64().is_some(),
        "{context}"
    );
    assert!(
        report["calibration"]["fanout_us"].as_f64().unwrap_or(0.0) > 0.0,
        "{context}"
    );
    assert_eq!(report["ok"], true, "{context}");
    assert!(output.status.success(), "{context}");
}
