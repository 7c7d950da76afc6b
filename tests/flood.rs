//! End to end: a small connection flood (corepush-flood, 2 worker processes)
//! against the real server binary, checking from the flood's JSON summary
//! that every connection was established and no message was lost,
//! duplicated or misrouted; the same through the HTTP push API
//! (`--push-via-api`).

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

/// The server's addresses, from its log.
struct Addrs {
    ws: String,
    api: String,
}

/// Starts `corepush --listen 127.0.0.1:0 --api-listen 127.0.0.1:0 --shards
/// 2` plus `extra` and returns it with the addresses parsed from its
/// `listening on <addr>` and `api listening on <addr>` log lines.
fn start_server(extra: &[&str]) -> (ServerGuard, Addrs) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_corepush"))
        .args(["--listen", "127.0.0.1:0", "--shards", "2"])
        .args(["--api-listen", "127.0.0.1:0"]) // tests run side by side
        .args(extra)
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
        let (mut ws, mut api) = (None, None);
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let addr = |rest: &str| rest.split_whitespace().next().unwrap_or("").to_string();
            if let Some(rest) = line.split("api listening on ").nth(1) {
                api = Some(addr(rest));
            } else if let Some(rest) = line.split("listening on ").nth(1) {
                ws = Some(addr(rest));
            }
            if let (Some(ws), Some(api)) = (&ws, &api) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(Addrs {
                        ws: ws.clone(),
                        api: api.clone(),
                    });
                }
            }
        }
    });
    let addrs = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("server printed no `listening on <addr>` and `api listening on <addr>` lines");
    (guard, addrs)
}

/// Runs corepush-flood with `args` and returns its JSON summary, its exit
/// status and its output (for messages).
fn flood(args: &[&str]) -> (Value, bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_corepush-flood"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run corepush-flood");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stdout.lines().last().unwrap_or("");
    let report: Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("no JSON summary ({e}); stdout:\n{stdout}\nstderr:\n{stderr}"));
    let context = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    (report, output.status.success(), context)
}

#[test]
fn small_flood_is_exact() {
    let (server, addrs) = start_server(&[]);
    let conns = 2500;
    let (report, success, context) = flood(&[
        "--target",
        &addrs.ws,
        "--conns",
        &conns.to_string(),
        "--procs",
        "2",
        "--server-pid",
        &server.0.id().to_string(),
        "--msgs",
        "400",
        "--msg-rate",
        "2000",
        "--broadcasts",
        "2",
        "--hold-secs",
        "0.5",
        "--churn",
        "0.05",
        "--calib-rounds",
        "2",
        "--drain-secs",
        "5",
        "--no-hgrm",
        "--json",
    ]);
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
    assert!(success, "{context}");
}

#[test]
fn pushes_through_the_api_are_exact() {
    let token = "flood-test-token";
    let (server, addrs) = start_server(&["--api-token", token]);
    let conns = 400;
    let (report, success, context) = flood(&[
        "--target",
        &addrs.ws,
        "--conns",
        &conns.to_string(),
        "--procs",
        "2",
        "--server-pid",
        &server.0.id().to_string(),
        "--no-calibrate",
        "--hold-secs",
        "0",
        "--broadcasts",
        "0",
        "--msgs",
        "300",
        "--msg-rate",
        "1000",
        "--push-via-api",
        &addrs.api,
        "--api-token",
        token,
        "--api-conns",
        "3",
        "--api-batch",
        "50",
        "--api-msgs",
        "1500",
        "--no-hgrm",
        "--json",
    ]);
    assert_eq!(report["connections"]["established"], conns, "{context}");
    let api = &report["api"];
    for (sub, step, msgs) in [
        ("single", "paced", 300),
        ("single", "flat_out", 1500),
        ("batch", "paced", 300),
        ("batch", "flat_out", 1500),
    ] {
        let s = &api[sub][step];
        let what = format!("api.{sub}.{step}");
        assert_eq!(s["pushes"], msgs, "{what}: {context}");
        assert_eq!(s["delivered"], msgs, "{what}: {context}");
        assert_eq!(s["api_delivered"], msgs, "{what}: {context}");
        for key in [
            "lost",
            "duplicated",
            "misrouted",
            "reordered",
            "http_errors",
        ] {
            assert_eq!(s[key], 0, "{what}.{key}: {context}");
        }
        assert!(
            s["latency_us"]["p99"].as_f64().is_some(),
            "{what}: {context}"
        );
    }
    assert_eq!(api["single"]["flat_out"]["requests"], 1500, "{context}");
    // 1500 in batches of 50 over 3 connections: 30, and a partial last
    // batch on some connections.
    let batches = api["batch"]["flat_out"]["requests"].as_u64().unwrap_or(0);
    assert!((30..=33).contains(&batches), "{batches}: {context}");
    for sub in ["single", "batch"] {
        assert!(
            api[sub]["pushes_per_sec"].as_f64().unwrap_or(0.0) > 0.0,
            "{context}"
        );
        assert!(
            api[sub]["requests_per_sec"].as_f64().unwrap_or(0.0) > 0.0,
            "{context}"
        );
    }
    assert!(
        api["p99_vs_websocket"]["single"].as_f64().is_some(),
        "{context}"
    );
    assert_eq!(api["ok"], true, "{context}");
    assert_eq!(report["ok"], true, "{context}");
    assert!(success, "{context}");

    // A wrong token: every request refused, and the run fails.
    let (report, success, context) = flood(&[
        "--target",
        &addrs.ws,
        "--conns",
        "20",
        "--no-calibrate",
        "--hold-secs",
        "0",
        "--broadcasts",
        "0",
        "--msgs",
        "10",
        "--push-via-api",
        &addrs.api,
        "--api-token",
        "wrong",
        "--api-msgs",
        "10",
        "--drain-secs",
        "0.5",
        "--no-hgrm",
        "--json",
    ]);
    assert!(!success, "{context}");
    assert_eq!(
        report["api"]["single"]["paced"]["http_errors"], 10,
        "{context}"
    );
    assert_eq!(report["api"]["ok"], false, "{context}");
}

#[test]
fn churn_soak_leaves_the_server_as_it_found_it() {
    // Short timeouts, so the half-open connections are reaped within the
    // run (as scripts/soak.sh does), with seconds past the ping for a
    // busy test machine: a server that stalls past its idle timeout closes
    // live connections (docs/benchmarks.md, "Churn soak").
    let (server, addrs) = start_server(&[
        "--handshake-timeout-ms",
        "6000",
        "--login-timeout-ms",
        "1500",
        "--ping-interval-ms",
        "500",
        "--idle-timeout-ms",
        "6000",
        "--close-timeout-ms",
        "250",
    ]);
    let cycles = 2000;
    let (report, success, context) = flood(&[
        "--target",
        &addrs.ws,
        "--stats-api",
        &addrs.api,
        "--server-pid",
        &server.0.id().to_string(),
        "--conns",
        "100",
        "--procs",
        "2",
        "--msgs",
        "500",
        "--msg-rate",
        "500",
        "--soak-conns",
        &cycles.to_string(),
        "--soak-slots",
        "500",
        "--soak-linger-ms",
        "450",
        "--soak-reap-secs",
        "20",
        "--no-hgrm",
        "--json",
    ]);
    let s = &report["soak"];
    assert_eq!(s["done"], cycles, "{context}");
    assert_eq!(s["failures"], 0, "{context}");
    let c = &s["counts"];
    for kind in ["clean", "abrupt", "unlogged_reaped", "silent_reaped"] {
        assert!(c[kind].as_u64().unwrap_or(0) > 300, "{kind}: {context}");
    }
    let t = &s["traffic"];
    assert!(t["rounds"].as_u64().unwrap_or(0) >= 1, "{context}");
    assert_eq!(t["sent"], t["delivered"], "{context}");
    for key in ["lost", "duplicated", "misrouted", "reordered"] {
        assert_eq!(t[key], 0, "traffic.{key}: {context}");
    }
    for check in ["soak", "traffic", "counts_zero", "fds_back", "rss_back"] {
        assert_eq!(s["checks"][check], true, "{check}: {context}");
    }
    let after = &s["server"]["after"];
    for gauge in ["connections", "logged_in", "local_uids"] {
        assert_eq!(after["counts"][gauge], 0, "{gauge}: {context}");
    }
    assert!(
        after["fds"].as_u64() <= s["server"]["before"]["fds"].as_u64(),
        "{context}"
    );
    assert_eq!(report["ok"], true, "{context}");
    assert!(success, "{context}");
}
