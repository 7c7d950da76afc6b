//! The throughput sweep (`--sweep`): targeted traffic stepped up through
//! `--sweep-rates` (msg/s, all workers together), `--sweep-secs` a step,
//! with the targeted phase's random schedule and its exactly-once and
//! order checks. It stops at the first step that is not sustained (see
//! `judge`) and reports, per step, the rate asked and achieved, latency,
//! lost/duplicated/misrouted/reordered and the CPU of server and flood,
//! then the highest rate sustained.
//!
//! A step that misses the bar is the measurement, not an error; messages
//! lost, duplicated, misrouted or reordered still fail the run.

use super::targeted::{self, Totals};
use super::{show_cores, Cpu, Ctx, Summary};
use crate::proto::{pick, Command, Event, Traffic, TrafficPlan};
use crate::report::summary_json;
use crate::sys;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A step keeps up when its senders and its deliveries both reach this
/// share of the rate asked.
pub const KEEP_UP: f64 = 0.95;
/// A sender this far behind its schedule gives the rest of the step up.
pub const GIVE_UP_LAG_NS: u64 = 1_000_000_000;
/// The step stops sending when more than this many seconds' worth of
/// messages (at the rate asked) are sent and not yet delivered: the
/// backlog grows, and letting it grow only makes the drain longer.
pub const BACKLOG_LIMIT_SECS: f64 = 1.0;
/// How often the coordinator asks the workers how far a step is.
const TALLY_EVERY: Duration = Duration::from_millis(100);
/// After the schedule, how long to wait at most for a backlog that is
/// still draining (each `--drain-secs` without a delivery ends it sooner).
const DRAIN_CAP: Duration = Duration::from_secs(30);

/// What a step measured, as far as the verdict needs it.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepFigures {
    /// Messages per second asked for.
    pub asked_per_sec: f64,
    /// Messages sent per second over the step (or longer, when the
    /// senders ran late).
    pub sent_per_sec: f64,
    /// Messages delivered per second, until the last one arrived (at
    /// least over the step's length).
    pub delivered_per_sec: f64,
    /// A sender gave the rest of its messages up: it was more than
    /// GIVE_UP_LAG_NS behind its schedule.
    pub senders_gave_up: bool,
    /// The step was stopped early because its backlog outgrew
    /// BACKLOG_LIMIT_SECS.
    pub backlog_stop: bool,
    /// p99 send-to-receive latency in µs (None: nothing delivered).
    pub p99_us: Option<f64>,
    pub lost: u64,
    pub duplicated: u64,
    pub misrouted: u64,
    pub reordered: u64,
}

/// Why a step is not sustained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shortfall {
    /// The senders did not keep up with the schedule (sent/s below
    /// KEEP_UP of the rate asked, or a sender gave up).
    SendersBehind,
    /// Deliveries did not keep up (delivered/s below KEEP_UP of the rate
    /// asked, or the backlog outgrew its limit and the step was stopped).
    DeliveryBehind,
    /// p99 latency above the bar (or nothing delivered to measure).
    P99OverBar,
    /// Messages lost, duplicated, misrouted or reordered (these also fail
    /// the run).
    Errors,
}

impl Shortfall {
    pub fn name(self) -> &'static str {
        match self {
            Shortfall::SendersBehind => "senders_behind",
            Shortfall::DeliveryBehind => "delivery_behind",
            Shortfall::P99OverBar => "p99_over_bar",
            Shortfall::Errors => "errors",
        }
    }
}

/// Everything a step falls short of; empty when it is sustained.
pub fn judge(f: &StepFigures, p99_bar_us: f64) -> Vec<Shortfall> {
    let mut why = Vec::new();
    let keep_up = KEEP_UP * f.asked_per_sec;
    // A step stopped for its backlog sent less on purpose: its send rate
    // says nothing about the senders.
    if f.senders_gave_up || (!f.backlog_stop && f.sent_per_sec < keep_up) {
        why.push(Shortfall::SendersBehind);
    }
    if f.backlog_stop || f.delivered_per_sec < keep_up {
        why.push(Shortfall::DeliveryBehind);
    }
    if f.p99_us.is_none_or(|p99| p99 > p99_bar_us) {
        why.push(Shortfall::P99OverBar);
    }
    if f.lost + f.duplicated + f.misrouted + f.reordered > 0 {
        why.push(Shortfall::Errors);
    }
    why
}

/// The highest rate asked of the steps sustained before the first that was
/// not (steps in the order run: (rate asked, sustained)); 0 when the first
/// was not.
pub fn max_sustained(steps: &[(u32, bool)]) -> u32 {
    steps
        .iter()
        .take_while(|s| s.1)
        .map(|s| s.0)
        .max()
        .unwrap_or(0)
}

/// One step as measured: figures for the verdict and the report.
struct Step {
    rate: u32,
    msgs: u32,
    totals: Totals,
    figures: StepFigures,
    /// The latest a message went out after its scheduled time, and the
    /// time from the end of the schedule to the last delivery (0 if none
    /// was later).
    send_lag_max_ms: f64,
    drain_ms: f64,
    /// CPU while the schedule ran.
    cpu: Cpu,
    why: Vec<Shortfall>,
}

impl Step {
    fn json(&self) -> Value {
        let f = &self.figures;
        let round = |x: f64| x.round();
        json!({
            "rate": self.rate,
            "msgs": self.msgs,
            "sent": self.totals.sent,
            "sent_per_sec": round(f.sent_per_sec),
            "delivered": self.totals.counts.delivered(),
            "delivered_per_sec": round(f.delivered_per_sec),
            "not_sent": self.totals.abandoned,
            "lost": f.lost,
            "duplicated": f.duplicated,
            "misrouted": f.misrouted,
            "reordered": f.reordered,
            "latency_us": summary_json(&self.totals.hist),
            "send_lag_max_ms": (self.send_lag_max_ms * 10.0).round() / 10.0,
            "drain_ms": (self.drain_ms * 10.0).round() / 10.0,
            "cpu": self.cpu.json(),
            "sustained": self.why.is_empty(),
            "why": self.why.iter().map(|w| w.name()).collect::<Vec<_>>(),
        })
    }

    /// One row of the text table (see `HEADER`).
    fn row(&self) -> String {
        let f = &self.figures;
        let h = &self.totals.hist;
        let q = |x: f64| {
            if h.is_empty() {
                "-".to_string()
            } else {
                format!("{:.1}", h.value_at_quantile(x) as f64 / 1000.0)
            }
        };
        let verdict = if self.why.is_empty() {
            "sustained".to_string()
        } else {
            let names: Vec<_> = self.why.iter().map(|w| w.name()).collect();
            format!("no: {}", names.join(", "))
        };
        format!(
            "  {:>8} {:>8.0} {:>8.0} {:>9} {:>9} {:>9} {:>6} {:>4} {:>4} {:>5} {:>7} {:>8.1} {:>8.1} {:>6} {:>6}  {verdict}",
            self.rate,
            f.sent_per_sec,
            f.delivered_per_sec,
            q(0.5),
            q(0.99),
            q(0.999),
            f.lost,
            f.duplicated,
            f.misrouted,
            f.reordered,
            self.totals.abandoned,
            self.send_lag_max_ms,
            self.drain_ms,
            show_cores(self.cpu.server),
            show_cores(self.cpu.flood),
        )
    }
}

/// Header of the text table.
const HEADER: &str = "     asked   sent/s  deliv/s    p50 us    p99 us  p99.9 us   lost  dup  mis reord notsent lag ms drain ms server  flood  verdict";

/// Sleeps until `at` (monotonic ns), keeping up with worker progress.
fn sleep_until(ctx: &mut Ctx, at: u64) {
    loop {
        let now = sys::now_ns();
        if now >= at {
            return;
        }
        std::thread::sleep(Duration::from_nanos((at - now).min(50_000_000)));
        ctx.workers.drain_progress();
    }
}

/// Asks every worker how far the run is: (sent, delivered, any still
/// sending), summed; None if a worker did not answer.
fn tally(ctx: &mut Ctx, seq: u64) -> Option<(u64, u64, bool)> {
    ctx.workers.send_all(&Command::TargetedTally { seq });
    let answers = ctx.workers.wait_for(
        ctx.procs(),
        Duration::from_secs(2),
        None,
        pick!(Event::TargetedTally { seq: s, sent, delivered, sending } if s == seq
            => (sent, delivered, sending)),
    );
    if answers.len() < ctx.procs() {
        return None;
    }
    Some((
        answers.iter().map(|a| a.0).sum(),
        answers.iter().map(|a| a.1).sum(),
        answers.iter().any(|a| a.2),
    ))
}

/// Runs step `i` at `rate` msg/s and measures it.
fn step(ctx: &mut Ctx, i: usize, rate: u32, tally_seq: &mut u64) -> Step {
    let args = ctx.args;
    let secs = args.sweep_secs;
    let msgs = (f64::from(rate) * secs).round().max(1.0) as u32;
    let duration_ns = (secs * 1e9) as u64;
    let backlog_limit = (f64::from(rate) * BACKLOG_LIMIT_SECS).max(100.0) as u64;
    let mut ask = |ctx: &mut Ctx| {
        *tally_seq += 1;
        tally(ctx, *tally_seq)
    };
    // Every worker builds the step's schedule first: give it time.
    let start = sys::now_ns() + 100_000_000 + u64::from(msgs) * 1_000;
    let end = start + duration_ns;
    ctx.workers.phase_start();
    ctx.workers.send_all(&Command::Targeted(TrafficPlan {
        kind: Traffic::Sweep,
        seed: args.seed.wrapping_add(2 + i as u64),
        msgs,
        rate: f64::from(rate),
        churn: 0.0,
        start_ns: start,
        id_base: (i as u64 + 1) << 32,
        give_up_lag_ns: Some(GIVE_UP_LAG_NS),
    }));
    sleep_until(ctx, start);
    let mark = ctx.cpu_mark();
    // While the schedule runs: stop it when the backlog runs away.
    let mut backlog_stop = false;
    while sys::now_ns() < end {
        sleep_until(ctx, end.min(sys::now_ns() + TALLY_EVERY.as_nanos() as u64));
        if let Some((sent, delivered, _)) = ask(ctx) {
            if sent.saturating_sub(delivered) > backlog_limit {
                ctx.workers.send_all(&Command::TargetedStop);
                backlog_stop = true;
                break;
            }
        }
    }
    let cpu = mark.measure(ctx);
    // Then until every sender is done and everything sent has arrived; a
    // backlog may drain as long as deliveries go on (up to DRAIN_CAP), and
    // what has not come --drain-secs after the last delivery is lost.
    let drain_start = Instant::now();
    let mut last_progress = Instant::now();
    let mut last_delivered = 0;
    let quiet = Duration::from_secs_f64(args.drain_secs) + Duration::from_nanos(GIVE_UP_LAG_NS);
    while drain_start.elapsed() < DRAIN_CAP && last_progress.elapsed() < quiet {
        match ask(ctx) {
            Some((sent, delivered, false)) if delivered >= sent => break,
            Some((_, delivered, _)) if delivered > last_delivered => {
                last_delivered = delivered;
                last_progress = Instant::now();
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let totals = targeted::collect(ctx);
    let c = &totals.counts;
    let (last_send, last_recv) = (totals.last_send_ns, totals.last_recv_ns);
    let window = |last: u64| (last.saturating_sub(start).max(duration_ns)) as f64 / 1e9;
    let figures = StepFigures {
        asked_per_sec: f64::from(rate),
        sent_per_sec: totals.sent as f64 / window(last_send),
        delivered_per_sec: c.delivered() as f64 / window(last_recv),
        senders_gave_up: totals.fell_behind,
        backlog_stop,
        p99_us: (!totals.hist.is_empty())
            .then(|| totals.hist.value_at_quantile(0.99) as f64 / 1000.0),
        // Every message sent must arrive (a step cut short sent fewer, so
        // what is due is what was sent, not the whole schedule).
        lost: totals.sent.saturating_sub(c.delivered()),
        duplicated: c.duplicated,
        misrouted: c.misrouted,
        reordered: c.reordered,
    };
    let mut why = judge(&figures, args.sweep_p99_ms * 1000.0);
    if totals.reports < ctx.procs() && !why.contains(&Shortfall::Errors) {
        why.push(Shortfall::Errors);
    }
    Step {
        rate,
        msgs,
        send_lag_max_ms: totals.max_send_lag_ns as f64 / 1e6,
        drain_ms: last_recv.saturating_sub(end) as f64 / 1e6,
        totals,
        figures,
        cpu,
        why,
    }
}

/// The sweep phase.
pub fn run(ctx: &mut Ctx, sum: &mut Summary) {
    let args = ctx.args;
    let rates: Vec<String> = args.sweep_rates.iter().map(|r| r.to_string()).collect();
    println!(
        "\n== sweep: targeted traffic at {} msg/s, {} s a step, until a step is not sustained \
         (p99 above {} ms, or sent or delivered per second below {:.0}% of the rate asked)",
        rates.join(", "),
        args.sweep_secs,
        args.sweep_p99_ms,
        KEEP_UP * 100.0
    );
    println!("{HEADER}");
    let mut steps = Vec::new();
    let mut verdicts = Vec::new();
    let mut tally_seq = 0;
    for (i, &rate) in args.sweep_rates.iter().enumerate() {
        let s = step(ctx, i, rate, &mut tally_seq);
        println!("{}", s.row());
        let f = &s.figures;
        if f.lost + f.duplicated + f.misrouted + f.reordered > 0 || s.totals.reports < ctx.procs() {
            sum.fail(format!(
                "sweep at {rate} msg/s: lost/duplicated/misrouted/reordered messages"
            ));
        }
        steps.push(s.json());
        verdicts.push((rate, s.why.is_empty()));
        if !s.why.is_empty() {
            break;
        }
    }
    let max = max_sustained(&verdicts);
    if max > 0 {
        println!("  highest rate sustained: {max} msg/s");
    } else {
        println!("  highest rate sustained: none (the first step was not)");
    }
    sum.set(
        "sweep",
        json!({
            "steps": steps,
            "max_sustained_per_sec": max,
            "step_secs": args.sweep_secs,
            "p99_bar_ms": args.sweep_p99_ms,
            "keep_up": KEEP_UP,
        }),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step at 10,000 msg/s that met every bar.
    fn good() -> StepFigures {
        StepFigures {
            asked_per_sec: 10_000.0,
            sent_per_sec: 10_000.0,
            delivered_per_sec: 9_990.0,
            p99_us: Some(800.0),
            ..StepFigures::default()
        }
    }

    #[test]
    fn sustained_when_every_bar_is_met() {
        assert_eq!(judge(&good(), 5000.0), vec![]);
        // At the edges: exactly the bar, exactly 95%.
        let edge = StepFigures {
            sent_per_sec: 9_500.0,
            delivered_per_sec: 9_500.0,
            p99_us: Some(5000.0),
            ..good()
        };
        assert_eq!(judge(&edge, 5000.0), vec![]);
    }

    #[test]
    fn p99_over_the_bar() {
        let f = StepFigures {
            p99_us: Some(5000.1),
            ..good()
        };
        assert_eq!(judge(&f, 5000.0), vec![Shortfall::P99OverBar]);
        // Nothing delivered: no latency to judge, not sustained.
        let f = StepFigures {
            p99_us: None,
            delivered_per_sec: 0.0,
            ..good()
        };
        assert_eq!(
            judge(&f, 5000.0),
            vec![Shortfall::DeliveryBehind, Shortfall::P99OverBar]
        );
    }

    #[test]
    fn senders_behind() {
        let f = StepFigures {
            sent_per_sec: 9_400.0,
            ..good()
        };
        assert_eq!(judge(&f, 5000.0), vec![Shortfall::SendersBehind]);
        // A sender that gave up fails the step even if the rest kept pace.
        let f = StepFigures {
            senders_gave_up: true,
            ..good()
        };
        assert_eq!(judge(&f, 5000.0), vec![Shortfall::SendersBehind]);
    }

    #[test]
    fn deliveries_behind() {
        let f = StepFigures {
            delivered_per_sec: 9_000.0,
            ..good()
        };
        assert_eq!(judge(&f, 5000.0), vec![Shortfall::DeliveryBehind]);
        // Stopped for a growing backlog: delivery is behind, and the send
        // rate of a step cut short does not blame the senders.
        let f = StepFigures {
            backlog_stop: true,
            sent_per_sec: 4_000.0,
            ..good()
        };
        assert_eq!(judge(&f, 5000.0), vec![Shortfall::DeliveryBehind]);
    }

    #[test]
    fn errors_are_not_sustained() {
        for f in [
            StepFigures { lost: 1, ..good() },
            StepFigures {
                duplicated: 1,
                ..good()
            },
            StepFigures {
                misrouted: 1,
                ..good()
            },
            StepFigures {
                reordered: 1,
                ..good()
            },
        ] {
            assert_eq!(judge(&f, 5000.0), vec![Shortfall::Errors]);
        }
    }

    #[test]
    fn highest_rate_before_the_first_miss() {
        assert_eq!(
            max_sustained(&[(5000, true), (10000, true), (20000, false)]),
            10000
        );
        assert_eq!(max_sustained(&[(5000, false)]), 0);
        assert_eq!(max_sustained(&[]), 0);
        // A later step that happens to pass does not count.
        assert_eq!(
            max_sustained(&[(5000, true), (10000, false), (20000, true)]),
            5000
        );
        assert_eq!(max_sustained(&[(5000, true), (10000, true)]), 10000);
    }
}
