//! The worker processes as the coordinator sees them: started as this
//! same binary with the hidden `--worker N` flag, sent `Command`s on their
//! stdin, read `Event`s from their stdout (one reader thread each), with
//! progress printed to stderr at most once a second.

use crate::proto::{Command, Event, Phase};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::process::{self, Child, ChildStdin, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// The slice [lo, hi) of `total` items that worker `w` of `k` owns.
pub fn split(total: usize, k: usize, w: usize) -> (usize, usize) {
    (total * w / k, total * (w + 1) / k)
}

/// The worker that owns item `i` of `total` split over `k`.
pub fn owner(total: usize, k: usize, i: usize) -> usize {
    (0..k)
        .find(|&w| {
            let (lo, hi) = split(total, k, w);
            i >= lo && i < hi
        })
        .unwrap_or(0)
}

/// The running worker processes and the channel their output arrives on.
pub struct Workers {
    children: Vec<Child>,
    /// Where commands are written, one per worker.
    stdins: Vec<ChildStdin>,
    /// (worker, event) from the reader threads.
    rx: Receiver<(usize, Event)>,
    /// Events that arrived while waiting for something else.
    backlog: VecDeque<Event>,
    /// Latest progress per worker: (phase, done, failed).
    progress: Vec<(Option<Phase>, u64, u64)>,
    /// When progress was last printed, and the total done then (for a rate).
    last_print: Instant,
    last_done: u64,
}

impl Workers {
    /// Starts `k` workers running this executable with the same arguments.
    pub fn spawn(k: usize) -> std::io::Result<Workers> {
        let exe = std::env::current_exe()?;
        let args: Vec<String> = std::env::args().skip(1).collect();
        let (tx, rx) = mpsc::channel();
        let mut children = Vec::new();
        let mut stdins = Vec::new();
        for w in 0..k {
            let mut child = process::Command::new(&exe)
                .args(&args)
                .arg("--worker")
                .arg(w.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()?;
            stdins.push(child.stdin.take().expect("piped stdin"));
            let stdout = child.stdout.take().expect("piped stdout");
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    match serde_json::from_str::<Event>(&line) {
                        Ok(ev) => {
                            if tx.send((w, ev)).is_err() {
                                break;
                            }
                        }
                        Err(_) => eprintln!("worker {w}: {line}"),
                    }
                }
                let _ = tx.send((w, Event::Exited));
            });
            children.push(child);
        }
        Ok(Workers {
            children,
            stdins,
            rx,
            backlog: VecDeque::new(),
            progress: vec![(None, 0, 0); k],
            last_print: Instant::now(),
            last_done: 0,
        })
    }

    pub fn len(&self) -> usize {
        self.stdins.len()
    }

    /// Process ids of the workers (for their CPU time).
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    pub fn send(&mut self, w: usize, cmd: &Command) {
        let line = serde_json::to_string(cmd).expect("commands serialize");
        let _ = writeln!(self.stdins[w], "{line}");
        let _ = self.stdins[w].flush();
    }

    pub fn send_all(&mut self, cmd: &Command) {
        for w in 0..self.len() {
            self.send(w, cmd);
        }
    }

    /// Handles progress and errors; returns events worth keeping.
    fn absorb(&mut self, w: usize, ev: Event) -> Option<Event> {
        match ev {
            Event::Progress {
                phase,
                done,
                failed,
            } => {
                self.progress[w] = (Some(phase), done, failed);
                self.print_progress();
                None
            }
            Event::Error { msg } => {
                eprintln!("worker {w}: {msg}");
                None
            }
            Event::Exited => {
                eprintln!("worker {w} exited");
                Some(ev)
            }
            _ => Some(ev),
        }
    }

    /// One stderr line per second at most while a phase runs.
    fn print_progress(&mut self) {
        let elapsed = self.last_print.elapsed();
        if elapsed < Duration::from_millis(950) {
            return;
        }
        // Summed over the workers in worker 0's phase (another may be in
        // another phase, such as soak and traffic at once).
        let phase = self.progress[0].0;
        let same = self.progress.iter().filter(|p| p.0 == phase);
        let (done, failed) = same.fold((0, 0), |(d, f), p| (d + p.1, f + p.2));
        let rate = done.saturating_sub(self.last_done) as f64 / elapsed.as_secs_f64();
        let (done_what, other_what) = match phase {
            Some(Phase::Connect) => ("established", "failed"),
            Some(Phase::Targeted | Phase::Churn | Phase::Sweep) => ("sent", "delivered"),
            Some(Phase::Api) => ("delivered", "misrouted"),
            Some(Phase::Teardown) => ("closed", "unclean"),
            Some(Phase::Soak) => ("cycles done", "failed"),
            Some(Phase::CalibrateConnect) | None => ("connected", "failed"),
        };
        let phase = phase.map_or("", Phase::name);
        eprintln!("  [{phase}] {done} {done_what}, {failed} {other_what}, {rate:.0}/s");
        self.last_print = Instant::now();
        self.last_done = done;
    }

    /// Resets the progress rate at a phase start.
    pub fn phase_start(&mut self) {
        self.last_print = Instant::now();
        self.last_done = 0;
        for p in &mut self.progress {
            *p = (None, 0, 0);
        }
    }

    /// Reads pending events without waiting (keeps them in the backlog).
    pub fn drain_progress(&mut self) {
        while let Ok((w, ev)) = self.rx.try_recv() {
            if let Some(ev) = self.absorb(w, ev) {
                self.backlog.push_back(ev);
            }
        }
    }

    /// Takes the events `pick` wants that have arrived, without waiting.
    pub fn take_ready<T>(&mut self, pick: impl Fn(Event) -> Result<T, Event>) -> Vec<T> {
        self.drain_progress();
        let mut got = Vec::new();
        let mut keep = VecDeque::new();
        while let Some(ev) = self.backlog.pop_front() {
            match pick(ev) {
                Ok(t) => got.push(t),
                Err(ev) => keep.push_back(ev),
            }
        }
        self.backlog = keep;
        got
    }

    /// The `done` figures of the workers' latest progress in `phase`,
    /// summed.
    pub fn progress_done(&self, phase: Phase) -> u64 {
        self.progress
            .iter()
            .filter(|p| p.0 == Some(phase))
            .map(|p| p.1)
            .sum()
    }

    /// Waits until `pick` took `n` events or `timeout` passed, and returns
    /// what it took (`pick!` makes one from a pattern). Events it leaves
    /// wait in the backlog for a later call. `poll`, if given, is called
    /// between checks (and should block briefly).
    pub fn wait_for<T>(
        &mut self,
        n: usize,
        timeout: Duration,
        mut poll: Option<&mut dyn FnMut()>,
        pick: impl Fn(Event) -> Result<T, Event>,
    ) -> Vec<T> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        let mut keep = VecDeque::new();
        while let Some(ev) = self.backlog.pop_front() {
            if got.len() >= n {
                keep.push_back(ev);
                continue;
            }
            match pick(ev) {
                Ok(t) => got.push(t),
                Err(ev) => keep.push_back(ev),
            }
        }
        self.backlog = keep;
        let mut exited = 0;
        while got.len() < n {
            let now = Instant::now();
            if now >= deadline {
                eprintln!("  timed out waiting: got {} of {n} answers", got.len());
                break;
            }
            let next = match poll.as_mut() {
                Some(p) => {
                    p();
                    self.rx.try_recv().ok()
                }
                None => match self
                    .rx
                    .recv_timeout((deadline - now).min(Duration::from_millis(200)))
                {
                    Ok(e) => Some(e),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                },
            };
            let Some(ev) = next.and_then(|(w, ev)| self.absorb(w, ev)) else {
                continue;
            };
            if matches!(ev, Event::Exited) {
                exited += 1;
                if exited >= self.len() {
                    break;
                }
                continue;
            }
            match pick(ev) {
                Ok(t) => got.push(t),
                Err(ev) => self.backlog.push_back(ev),
            }
        }
        got
    }

    /// Tells every worker to exit and reaps them.
    pub fn shutdown(&mut self) {
        self.send_all(&Command::Exit);
        for c in &mut self.children {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_cover_everything() {
        let mut next = 0;
        for w in 0..3 {
            let (lo, hi) = split(10, 3, w);
            assert_eq!(lo, next);
            next = hi;
        }
        assert_eq!(next, 10);
        assert_eq!(owner(10, 3, 0), 0);
        assert_eq!(owner(10, 3, 3), 1);
        assert_eq!(owner(10, 3, 9), 2);
    }
}
