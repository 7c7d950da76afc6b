//! A worker process: one epoll loop driving thousands of WebSocket client
//! connections, plus the bare-TCP calibration clients. It takes commands
//! (`proto::Command`) as JSON lines on stdin and answers with events
//! (`proto::Event`) on stdout; the coordinator decides when each phase
//! starts.
//!
//! This file is the loop and the command dispatch. The connections
//! themselves are `client::Client`; each phase keeps its state and logic
//! in its own file under `worker/` (connect, targeted, churn, broadcast,
//! teardown) and `Phases` routes what the client observes to them. The
//! churn soak's short connections are not the client's: `worker/soak.rs`
//! runs them on the same loop.

mod broadcast;
mod churn;
mod connect;
mod soak;
mod targeted;
mod teardown;

use crate::calibrate::Clients;
use crate::client::{Client, Delivery, Observer};
use crate::payload;
use crate::proto::{Command, Event, Phase};
use crate::sys::{self, Epoll, EV_IN};
use crate::Args;
use std::io::{self, Write};

/// epoll token of the command pipe.
const TOKEN_STDIN: u64 = u64::MAX;
/// Tokens at or above this are calibration sockets (token - CALIB_BASE).
pub const CALIB_BASE: u64 = 1 << 40;

/// Writes one event to the coordinator, as a JSON line.
pub fn emit(ev: Event) {
    let line = serde_json::to_string(&ev).expect("events serialize");
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The state of each phase in this worker. It is the client's `Observer`:
/// logins, failures, closes and messages go to the phase they belong to.
#[derive(Default)]
struct Phases {
    connect: Option<connect::ConnectPhase>,
    targeted: Option<targeted::TargetedPhase>,
    bcast: broadcast::Broadcasts,
    teardown: Option<teardown::Teardown>,
}

impl Observer for Phases {
    fn logged_in(&mut self, _li: usize, reconnect: bool, latency_ns: u64, now: u64) {
        if reconnect {
            if let Some(t) = self.targeted.as_mut() {
                t.churn.on_reconnected(latency_ns);
            }
        } else if let Some(c) = self.connect.as_mut() {
            c.on_established(latency_ns, now);
        }
    }

    fn attempt_failed(&mut self, reconnect: bool) {
        if reconnect {
            if let Some(t) = self.targeted.as_mut() {
                t.churn.on_reconnect_failed();
            }
        } else if let Some(c) = self.connect.as_mut() {
            c.on_failed();
        }
    }

    fn closed(&mut self, clean: bool, since_ns: u64, now: u64) {
        if let Some(t) = self.teardown.as_mut() {
            t.on_closed(clean, now.saturating_sub(since_ns));
        }
    }

    fn message(&mut self, li: usize, g: u32, body: &[u8], now: u64) -> Delivery {
        match body.first() {
            Some(&payload::TARGETED) => match self.targeted.as_mut() {
                Some(t) => t.on_message(g, body, now),
                None => Delivery::Stray,
            },
            Some(&payload::BROADCAST) => self.bcast.on_message(li, body, now),
            _ => Delivery::Unexpected,
        }
    }
}

pub struct Worker {
    /// Worker number (0-based).
    index: usize,
    /// Connections across all workers: the schedule picks among all.
    total: u32,
    client: Client,
    phases: Phases,
    calib: Option<Clients>,
    /// The churn soak's connections (`--soak-conns`).
    soak: Option<soak::Soak>,
    /// Partial command line from stdin.
    cmd_buf: Vec<u8>,
    /// Last progress line sent (ns), to send at most one per second.
    last_progress: u64,
    /// Last timeout scan (ns).
    last_scan: u64,
    /// Set by the exit command.
    exit: bool,
}

impl Worker {
    /// Runs the worker until the coordinator says exit or closes stdin.
    pub fn run(args: &Args, index: usize) -> i32 {
        sys::raise_nofile_limit();
        let _ = sys::set_nonblocking(0);
        let ep = match Epoll::new(1024) {
            Ok(ep) => ep,
            Err(e) => {
                eprintln!("worker {index}: epoll: {e}");
                return 1;
            }
        };
        if let Err(e) = ep.add(0, TOKEN_STDIN, EV_IN) {
            eprintln!("worker {index}: epoll add stdin: {e}");
            return 1;
        }
        let mut w = Worker {
            index,
            total: 0,
            client: Client::new(index, ep, args.uid_prefix.clone(), args.seed),
            phases: Phases::default(),
            calib: None,
            soak: None,
            cmd_buf: Vec::new(),
            last_progress: 0,
            last_scan: 0,
            exit: false,
        };
        emit(Event::Ready {
            pid: std::process::id(),
        });
        while !w.exit {
            let timeout = w.timeout_ns();
            let n = w.client.ep_mut().wait_ns(timeout);
            for i in 0..n {
                let (token, events) = w.client.ep().event(i);
                if token == TOKEN_STDIN {
                    w.on_stdin();
                } else if token >= soak::SOAK_BASE {
                    if let Some(s) = w.soak.as_mut() {
                        s.on_event((token - soak::SOAK_BASE) as usize, events);
                    }
                } else if token >= CALIB_BASE {
                    if let Some(c) = w.calib.as_mut() {
                        c.on_event(w.client.ep(), (token - CALIB_BASE) as usize, events);
                    }
                } else {
                    w.client.on_event(token as usize, events, &mut w.phases);
                }
            }
            w.tick();
        }
        0
    }

    /// How long epoll may sleep (ns): until the next paced send or churn
    /// close, 10 ms while a phase needs timeout checks, else 100 ms.
    fn timeout_ns(&self) -> u64 {
        let now = sys::now_ns();
        let mut due = now + 100_000_000;
        let p = &self.phases;
        let soak = self.soak.as_ref().filter(|s| s.active());
        if p.connect.as_ref().is_some_and(|c| c.active()) || p.teardown.is_some() || soak.is_some()
        {
            due = now + 10_000_000;
        }
        if let Some(at) = soak.and_then(|s| s.next_due()) {
            due = due.min(at);
        }
        if let Some(at) = p.targeted.as_ref().and_then(|t| t.next_due()) {
            due = due.min(at);
        }
        if let Some(at) = self.calib.as_ref().and_then(Clients::next_due) {
            due = due.min(at);
        }
        due.saturating_sub(now)
    }

    fn on_stdin(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            match sys::read_fd(0, &mut buf) {
                Ok(0) => {
                    // Coordinator gone: stop.
                    self.exit = true;
                    return;
                }
                Ok(n) => self.cmd_buf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.exit = true;
                    return;
                }
            }
        }
        while let Some(pos) = self.cmd_buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.cmd_buf.drain(..=pos).collect();
            match serde_json::from_slice::<Command>(&line) {
                Ok(cmd) => self.on_command(cmd),
                Err(e) => eprintln!("worker {}: bad command: {e}", self.index),
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Init {
                base,
                count,
                total,
                targets,
                sources,
            } => {
                self.total = total;
                self.client.init(base, count, targets, sources);
                self.phases.bcast = broadcast::Broadcasts::new(count as usize);
                emit(Event::InitDone);
            }
            Command::Connect {
                rate,
                inflight,
                timeout_ns,
            } => {
                let c = connect::ConnectPhase::new(sys::now_ns(), rate, inflight, timeout_ns);
                self.phases.connect = Some(c);
            }
            Command::Targeted(plan) => self.start_targeted(&plan),
            Command::TargetedTally { seq } => self.tally_targeted(seq),
            Command::TargetedStop => {
                if let Some(t) = self.phases.targeted.as_mut() {
                    t.give_up();
                }
            }
            Command::TargetedReport => self.report_targeted(),
            Command::BcastArm { b } => {
                let ready = self.client.ready_count();
                self.phases.bcast.arm(b, ready);
            }
            Command::BcastSend { b, sender } => self.send_broadcast(b, sender),
            Command::BcastReport => emit(Event::BcastReport(self.phases.bcast.report())),
            Command::Teardown { timeout_ns } => self.start_teardown(timeout_ns),
            Command::Stats => emit(Event::Stats(*self.client.counters())),
            Command::CalibConnect { addr, n, inflight } => {
                let sources = self.client.sources().to_vec();
                let base = self.client.base() as usize;
                self.calib = Some(Clients::new(addr, sources, base, n, inflight));
            }
            Command::CalibFanout { round } => {
                if let Some(c) = self.calib.as_mut() {
                    c.arm_fanout(round);
                }
                emit(Event::CalibArmed);
            }
            Command::CalibOneway {
                start_ns,
                rate,
                count,
                round,
            } => {
                if let Some(c) = self.calib.as_mut() {
                    c.start_oneway(start_ns, rate, count, round);
                }
            }
            Command::CalibReport => match self.calib.as_mut() {
                Some(c) => emit(c.report()),
                None => emit(Event::CalibReport {
                    sent: 0,
                    received: 0,
                    hist: Vec::new(),
                }),
            },
            Command::CalibClose => {
                if let Some(mut c) = self.calib.take() {
                    c.close_all();
                }
                emit(Event::CalibClosed);
            }
            Command::Soak(plan) => self.start_soak(plan),
            Command::SoakStop => self.stop_soak(),
            Command::Exit => self.exit = true,
        }
    }

    /// Periodic work: pacing, timeouts, completion, progress.
    fn tick(&mut self) {
        let now = sys::now_ns();
        self.tick_connect(now);
        self.tick_targeted(now);
        self.tick_teardown(now);
        self.tick_soak(now);
        if let Some(c) = self.calib.as_mut() {
            c.tick(self.client.ep(), now);
        }
        if now.saturating_sub(self.last_scan) > 200_000_000 {
            self.last_scan = now;
            // Attempts (also churn reconnects) time out as the connect
            // phase says.
            if let Some(timeout) = self.phases.connect.as_ref().map(|c| c.timeout_ns()) {
                self.client
                    .fail_late_attempts(now, timeout, &mut self.phases);
            }
        }
        if now.saturating_sub(self.last_progress) >= 1_000_000_000 {
            self.last_progress = now;
            self.progress();
        }
    }

    /// At most one progress event a second, for the phase that is running.
    fn progress(&self) {
        let p = &self.phases;
        let (phase, done, failed) = if let Some(s) = self.soak.as_ref().filter(|s| s.active()) {
            s.progress()
        } else if let Some(c) = p.connect.as_ref().filter(|c| c.active()) {
            (Phase::Connect, c.established(), c.failed())
        } else if let Some(t) = p.targeted.as_ref().filter(|t| t.active()) {
            t.progress()
        } else if let Some(t) = p.teardown.as_ref().filter(|t| t.active()) {
            t.progress()
        } else if let Some((phase, done)) = self.calib.as_ref().and_then(Clients::progress) {
            (phase, done, 0)
        } else {
            return;
        };
        emit(Event::Progress {
            phase,
            done,
            failed,
        });
    }
}
