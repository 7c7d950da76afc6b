//! The `corepush` binary in a child process, as an operator runs it: its
//! stderr lines arrive on a channel, it is killed on drop.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use super::PATIENCE;

/// A running server binary and what it printed.
pub struct ServerProcess {
    child: Child,
    lines: Receiver<String>,
    /// The address it listens on, from its startup line.
    pub addr: SocketAddr,
    /// Its startup line (`listening on ADDR with N shards; ...`).
    pub startup: String,
}

impl ServerProcess {
    /// `corepush` with `args`, ready for more settings before `spawn`.
    pub fn command(args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_corepush"));
        cmd.args(args).env("RUST_LOG", "info");
        cmd
    }

    /// Starts `cmd` and waits for its startup line.
    pub fn spawn(mut cmd: Command) -> ServerProcess {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn corepush");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = ServerProcess {
            child,
            lines,
            addr: "127.0.0.1:0".parse().unwrap(),
            startup: String::new(),
        };
        server.startup = server.wait_line("listening on");
        server.addr = server
            .startup
            .split("listening on ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {:?}", server.startup));
        server
    }

    /// Waits for a stderr line containing `needle`.
    pub fn wait_line(&self, needle: &str) -> String {
        self.wait_line_within(needle, PATIENCE)
    }

    /// Waits up to `patience` for a stderr line containing `needle`.
    pub fn wait_line_within(&self, needle: &str, patience: Duration) -> String {
        let deadline = Instant::now() + patience;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        panic!("no stderr line with {needle:?}");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the server did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL: the server gets no chance to say goodbye.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
