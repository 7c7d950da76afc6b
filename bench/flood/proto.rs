//! What the coordinator and its workers say to each other: one JSON object
//! per line, commands on the worker's stdin and events on its stdout.
//!
//! Both directions are serde types, so a misspelt field is a compile error
//! where the message is built, and a message that does not match its type
//! is a loud parse error where it is read, never a silent 0. Histograms
//! travel as their raw bucket counts and are merged by the coordinator.

use crate::ledger::Counts;
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, SocketAddrV4};

/// A histogram in transit: (value, count) for every bucket with a count
/// (see `report::hist_counts` and `report::merge_counts`).
pub type HistCounts = Vec<(u64, u64)>;

/// Which run of targeted traffic this is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Traffic {
    /// The targeted phase.
    Targeted,
    /// The churn phase: targeted traffic while some connections reconnect.
    Churn,
    /// One step of the throughput sweep.
    Sweep,
    /// The targeted schedule pushed through the server's HTTP API by the
    /// coordinator (`--push-via-api`): workers send nothing, they only
    /// check what their connections receive.
    Api,
}

impl Traffic {
    pub fn name(self) -> &'static str {
        match self {
            Traffic::Targeted => "targeted",
            Traffic::Churn => "churn",
            Traffic::Sweep => "sweep",
            Traffic::Api => "api",
        }
    }

    /// Whether the workers send the run's messages themselves.
    pub fn workers_send(self) -> bool {
        self != Traffic::Api
    }
}

/// What a progress event counts.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    CalibrateConnect,
    Connect,
    Targeted,
    Churn,
    Sweep,
    Api,
    Soak,
    Teardown,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::CalibrateConnect => "calibrate-connect",
            Phase::Connect => "connect",
            Phase::Targeted => "targeted",
            Phase::Churn => "churn",
            Phase::Sweep => "sweep",
            Phase::Api => "api",
            Phase::Soak => "soak",
            Phase::Teardown => "teardown",
        }
    }
}

impl From<Traffic> for Phase {
    fn from(t: Traffic) -> Phase {
        match t {
            Traffic::Targeted => Phase::Targeted,
            Traffic::Churn => Phase::Churn,
            Traffic::Sweep => Phase::Sweep,
            Traffic::Api => Phase::Api,
        }
    }
}

/// One run of targeted traffic, the same in every worker: each builds the
/// schedule from the seed and sends its own connections' share of it.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct TrafficPlan {
    pub kind: Traffic,
    pub seed: u64,
    pub msgs: u32,
    /// Messages per second, all workers together.
    pub rate: f64,
    /// Fraction of connections that close and reconnect (0: none).
    pub churn: f64,
    /// When message 0 is due (CLOCK_MONOTONIC ns, shared by all processes).
    pub start_ns: u64,
    /// Added to the message index to make the id in a payload (0 but in a
    /// sweep), so a late message from an earlier run is told apart (stray)
    /// instead of being checked against this run's schedule.
    pub id_base: u64,
    /// A sender this far behind its schedule stops sending the run (sweep
    /// only: the step has failed to keep up, and waiting for it would only
    /// make the run longer); the rest count as not sent.
    pub give_up_lag_ns: Option<u64>,
}

/// A worker's share of the churn soak (`--soak-conns`): `cycles` short
/// connections, each one connect and one disconnect of a kind drawn from
/// `mix` (weights of clean, abrupt, unlogged, silent; see `worker/soak.rs`),
/// at most `slots` open at once and `inflight` of them still connecting,
/// upgrading or logging in.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct SoakPlan {
    pub cycles: u64,
    pub mix: [u32; 4],
    pub slots: u32,
    pub inflight: u32,
    pub seed: u64,
    /// Connect + upgrade + login must be done within this.
    pub connect_timeout_ns: u64,
    /// A half-open connection the server has not closed within this is
    /// counted `not_reaped` (and closed).
    pub reap_timeout_ns: u64,
    /// How long a silent connection keeps its socket after the server has
    /// closed its end (so the server must drop it on its own).
    pub linger_ns: u64,
}

/// Coordinator to worker.
#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// This worker's connections are the global indices base..base+count
    /// of `total`; connection g goes to targets[g % len] and binds
    /// sources[g % len] (none when empty).
    Init {
        base: u32,
        count: u32,
        total: u32,
        targets: Vec<SocketAddrV4>,
        sources: Vec<Ipv4Addr>,
    },
    /// Connect every connection: `rate` per second from this worker (0: flat
    /// out), at most `inflight` attempts at once, each within `timeout_ns`.
    Connect {
        rate: f64,
        inflight: usize,
        timeout_ns: u64,
    },
    Targeted(TrafficPlan),
    /// How far the current traffic run is (answered by `TargetedTally`).
    TargetedTally {
        seq: u64,
    },
    /// Send nothing more of the current run (a sweep step whose backlog
    /// grows); the rest count as given up.
    TargetedStop,
    /// End the current traffic run and report it.
    TargetedReport,
    /// Broadcast `b` is about to be sent: every ready connection must get it.
    BcastArm {
        b: u32,
    },
    /// Send broadcast `b` from connection `sender` (one of this worker's).
    BcastSend {
        b: u32,
        sender: u32,
    },
    BcastReport,
    /// Close every connection cleanly within `timeout_ns`.
    Teardown {
        timeout_ns: u64,
    },
    /// Report the error counters.
    Stats,
    /// Calibration: open `n` bare TCP connections to the coordinator's sink.
    CalibConnect {
        addr: SocketAddrV4,
        n: usize,
        inflight: usize,
    },
    /// Calibration: fanout round `round` is about to be written.
    CalibFanout {
        round: u32,
    },
    /// Calibration: send `count` timestamped records at `rate` from
    /// `start_ns`, tagged `round` (a record of another round that arrives
    /// late is not counted).
    CalibOneway {
        start_ns: u64,
        rate: f64,
        count: u64,
        round: u32,
    },
    /// Report the one-way round's counts and histogram, and start the next
    /// one from zero.
    CalibReport,
    CalibClose,
    /// Start the churn soak's connections (the steady connections go on).
    Soak(SoakPlan),
    /// Stop the soak now: close what is open, count the rest abandoned.
    SoakStop,
    Exit,
}

/// A worker's connect phase.
#[derive(Serialize, Deserialize, Debug, Default)]
pub struct ConnectReport {
    pub established: u64,
    pub failed: u64,
    /// Phase start and last login (monotonic ns).
    pub t0: u64,
    pub last_ns: u64,
    /// The worker's own resident memory after connecting.
    pub rss_bytes: Option<u64>,
    /// Connect + upgrade + login latency.
    pub hist: HistCounts,
}

/// A worker's run of targeted traffic.
#[derive(Serialize, Deserialize, Debug, Default)]
pub struct TrafficReport {
    /// What its connections received (see `ledger`).
    pub counts: Counts,
    pub sent: u64,
    /// Sends skipped because the sender was reconnecting (churn).
    pub send_skipped: u64,
    /// This worker's churned connections, how many came back and how many
    /// failed to.
    pub churned_conns: u64,
    pub reconnected: u64,
    pub reconnect_failed: u64,
    /// Send to receive latency of every delivery.
    pub hist: HistCounts,
    /// Connect + upgrade + login latency of the reconnects.
    pub reconnect_hist: HistCounts,
    /// Sends given up because the sender fell behind or was told to stop
    /// (sweep only).
    pub abandoned: u64,
    /// Whether this worker gave its sends up because it fell behind.
    pub fell_behind: bool,
    /// Send time of the last message sent and receive time of the last
    /// message counted delivered (monotonic ns; 0: none).
    pub last_send_ns: u64,
    pub last_recv_ns: u64,
    /// The latest a message was sent after its scheduled time.
    pub max_send_lag_ns: u64,
}

/// A worker's broadcasts.
#[derive(Serialize, Deserialize, Debug, Default)]
pub struct BcastReport {
    /// Deliveries due (ready connections at each arm) and made.
    pub expected: u64,
    pub deliveries: u64,
    pub duplicated: u64,
    /// Broadcast payloads with an id nobody armed.
    pub unknown: u64,
    /// Latency of every delivery.
    pub hist: HistCounts,
}

/// A worker's teardown.
#[derive(Serialize, Deserialize, Debug, Default)]
pub struct TeardownReport {
    /// Connections sent a close frame.
    pub closing: u64,
    /// Closed after the server's close frame.
    pub clean: u64,
    /// Closed by EOF or reset without a close frame.
    pub unclean: u64,
    pub timed_out: u64,
    pub elapsed_ns: u64,
    /// Time from our close frame to the server's.
    pub hist: HistCounts,
}

/// What a worker's soak connections did. Every cycle ends in exactly one
/// of: clean, abrupt, unlogged_reaped, silent_reaped (the expected ends),
/// or one of the failures below it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SoakCounts {
    pub started: u64,
    pub done: u64,
    /// Close frame sent after login, the server's close frame came back.
    pub clean: u64,
    /// Logged in, then reset (SO_LINGER 0).
    pub abrupt: u64,
    /// Upgraded, never logged in, closed by the server with 1008 `login
    /// timeout`.
    pub unlogged_reaped: u64,
    /// Logged in, then silent (pings unanswered), closed by the server with
    /// 1001 `idle timeout`.
    pub silent_reaped: u64,
    /// Silent connections the server pinged before closing them.
    pub silent_pinged: u64,
    /// Clean: the server closed without its close frame / not in 10 s.
    pub clean_unclean: u64,
    pub clean_timeout: u64,
    /// Half-open: closed by the server, but not with the expected code and
    /// reason (or without a close frame).
    pub reaped_other: u64,
    /// Half-open: not closed by the server within the reap timeout.
    pub not_reaped: u64,
    pub fail_connect: u64,
    pub fail_upgrade: u64,
    pub fail_login: u64,
    pub fail_timeout: u64,
    /// Data messages nobody should have sent to a soak connection.
    pub unexpected: u64,
    /// Not started, or still open, when the soak was stopped.
    pub abandoned: u64,
}

impl SoakCounts {
    pub fn add(&mut self, o: &SoakCounts) {
        self.started += o.started;
        self.done += o.done;
        self.clean += o.clean;
        self.abrupt += o.abrupt;
        self.unlogged_reaped += o.unlogged_reaped;
        self.silent_reaped += o.silent_reaped;
        self.silent_pinged += o.silent_pinged;
        self.clean_unclean += o.clean_unclean;
        self.clean_timeout += o.clean_timeout;
        self.reaped_other += o.reaped_other;
        self.not_reaped += o.not_reaped;
        self.fail_connect += o.fail_connect;
        self.fail_upgrade += o.fail_upgrade;
        self.fail_login += o.fail_login;
        self.fail_timeout += o.fail_timeout;
        self.unexpected += o.unexpected;
        self.abandoned += o.abandoned;
    }

    /// Cycles that did not end as their kind should.
    pub fn failures(&self) -> u64 {
        self.clean_unclean
            + self.clean_timeout
            + self.reaped_other
            + self.not_reaped
            + self.fail_connect
            + self.fail_upgrade
            + self.fail_login
            + self.fail_timeout
            + self.unexpected
            + self.abandoned
    }
}

/// A worker's soak.
#[derive(Serialize, Deserialize, Debug, Default)]
pub struct SoakReport {
    pub counts: SoakCounts,
    /// Start, and the end of the last cycle (monotonic ns).
    pub t0: u64,
    pub last_ns: u64,
    /// Connect + upgrade (+ login) latency.
    pub connect_hist: HistCounts,
    /// From going silent to the server's close: unlogged and silent ones.
    pub reap_unlogged_hist: HistCounts,
    pub reap_silent_hist: HistCounts,
    /// Clean: our close frame to the server's.
    pub close_hist: HistCounts,
}

/// Errors a worker counts across phases. The coordinator sums them and
/// prints them as they are, as the summary's `errors` object.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ErrorCounts {
    /// TCP connect refused/unreachable, or the socket could not be made.
    pub fail_connect: u64,
    /// No (valid) 101 response.
    pub fail_upgrade: u64,
    /// Login refused or answered with something else.
    pub fail_login: u64,
    /// Connect + upgrade + login did not finish in time.
    pub fail_timeout: u64,
    /// An established connection closed or reset by the server.
    pub dropped: u64,
    /// Bytes from the server that are not valid WebSocket frames.
    pub protocol_errors: u64,
    /// Text messages that are neither targeted nor broadcast payloads
    /// (e.g. `error: ...` replies): a sign the flood or server misbehaves.
    pub unexpected: u64,
    /// Targeted messages arriving when no targeted run is active (too late
    /// to be counted: they were already counted lost).
    pub stray: u64,
    /// Pings answered, to show the server's keepalive works.
    pub pings: u64,
}

impl ErrorCounts {
    pub fn add(&mut self, o: &ErrorCounts) {
        self.fail_connect += o.fail_connect;
        self.fail_upgrade += o.fail_upgrade;
        self.fail_login += o.fail_login;
        self.fail_timeout += o.fail_timeout;
        self.dropped += o.dropped;
        self.protocol_errors += o.protocol_errors;
        self.unexpected += o.unexpected;
        self.stray += o.stray;
        self.pings += o.pings;
    }
}

/// Worker to coordinator.
#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Event {
    Ready {
        pid: u32,
    },
    InitDone,
    /// At most once a second while a phase runs: `done` and `failed` are
    /// what the phase counts (e.g. sent and delivered).
    Progress {
        phase: Phase,
        done: u64,
        failed: u64,
    },
    Error {
        msg: String,
    },
    ConnectDone(ConnectReport),
    /// An API run (`Traffic::Api`) is set up: its messages may come.
    TargetedArmed,
    /// Every message of the run was sent, every steady one expected here
    /// arrived and every churned connection is back (or failed to be).
    TargetedDone,
    TargetedReport(Box<TrafficReport>),
    /// Answer to `TargetedTally`: messages sent and counted delivered so
    /// far, and whether this worker still has messages to send.
    TargetedTally {
        seq: u64,
        sent: u64,
        delivered: u64,
        sending: bool,
    },
    BcastArmed {
        b: u32,
    },
    BcastSent {
        b: u32,
        ok: bool,
    },
    /// Every connection here that must get broadcast `b` has it.
    BcastDone {
        b: u32,
        received: u64,
        max_latency_ns: u64,
    },
    BcastReport(BcastReport),
    TeardownDone(TeardownReport),
    Stats(ErrorCounts),
    CalibConnectDone {
        ok: u64,
        failed: u64,
        t0: u64,
        last_ns: u64,
    },
    CalibArmed,
    CalibFanoutDone {
        round: u32,
        count: u64,
        last_ns: u64,
    },
    CalibReport {
        sent: u64,
        received: u64,
        hist: HistCounts,
    },
    CalibClosed,
    /// Every soak cycle of this worker ended (or the soak was stopped).
    SoakDone(Box<SoakReport>),
    /// Never sent by a worker: the coordinator's reader makes it up when a
    /// worker's stdout closes.
    Exited,
}

/// `pick!(Pattern => value)`: a picker for `Workers::wait_for` that takes
/// the events matching the pattern (and guard) and leaves the others.
macro_rules! pick {
    ($p:pat $(if $g:expr)? => $v:expr) => {
        |e: $crate::proto::Event| match e {
            $p $(if $g)? => Ok($v),
            other => Err(other),
        }
    };
}
pub(crate) use pick;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        let cmd = Command::Targeted(TrafficPlan {
            kind: Traffic::Churn,
            seed: 7,
            msgs: 100,
            rate: 2000.0,
            churn: 0.05,
            start_ns: 123,
            id_base: 0,
            give_up_lag_ns: None,
        });
        let line = serde_json::to_string(&cmd).unwrap();
        assert!(
            line.starts_with(r#"{"cmd":"targeted","kind":"churn","#),
            "{line}"
        );
        match serde_json::from_str::<Command>(&line).unwrap() {
            Command::Targeted(p) => assert_eq!((p.kind, p.seed, p.msgs), (Traffic::Churn, 7, 100)),
            other => panic!("{other:?}"),
        }
        let line = serde_json::to_string(&Command::Init {
            base: 0,
            count: 2,
            total: 4,
            targets: vec!["127.0.0.1:1234".parse().unwrap()],
            sources: vec![Ipv4Addr::new(127, 0, 1, 1)],
        })
        .unwrap();
        assert!(line.contains(r#""targets":["127.0.0.1:1234"]"#), "{line}");
        assert!(serde_json::from_str::<Command>(&line).is_ok());

        let ev = Event::Progress {
            phase: Phase::CalibrateConnect,
            done: 5,
            failed: 1,
        };
        let line = serde_json::to_string(&ev).unwrap();
        assert_eq!(
            line,
            r#"{"ev":"progress","phase":"calibrate-connect","done":5,"failed":1}"#
        );
        let report = Event::TargetedReport(Box::new(TrafficReport {
            sent: 3,
            hist: vec![(1000, 2), (5000, 1)],
            ..TrafficReport::default()
        }));
        let line = serde_json::to_string(&report).unwrap();
        match serde_json::from_str::<Event>(&line).unwrap() {
            Event::TargetedReport(r) => {
                assert_eq!(r.sent, 3);
                assert_eq!(r.hist, vec![(1000, 2), (5000, 1)]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn mistakes_are_errors_not_zeros() {
        // A missing field does not read as 0.
        assert!(serde_json::from_str::<Command>(r#"{"cmd":"bcast_arm"}"#).is_err());
        assert!(serde_json::from_str::<Command>(r#"{"cmd":"bcast_arm","bb":1}"#).is_err());
        assert!(serde_json::from_str::<Command>(r#"{"cmd":"no_such"}"#).is_err());
        assert!(serde_json::from_str::<Event>(r#"{"ev":"bcast_done","b":1}"#).is_err());
    }
}
