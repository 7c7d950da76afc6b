//! The `corepush` binary as an operator runs it: the startup line, the
//! open-file limit, running out of descriptors, and stopping on SIGTERM.

mod util;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use util::process::ServerProcess;
use util::*;

/// Starts the server binary with `args` (on free ports unless `--listen`
/// is given), with its open-file limit lowered to `fd_limit` if set.
fn start(args: &[&str], fd_limit: Option<u64>) -> ServerProcess {
    let mut cmd = ServerProcess::command(&[]);
    if !args.contains(&"--listen") {
        cmd.args(["--listen", "127.0.0.1:0"]);
    }
    // The API on a free port too: tests run side by side.
    cmd.args(["--api-listen", "127.0.0.1:0"]).args(args);
    if let Some(limit) = fd_limit {
        // SAFETY: setrlimit is async-signal-safe; it runs in the child
        // between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let lim = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    ServerProcess::spawn(cmd)
}

#[test]
fn startup_line_says_address_shards_and_capacity() {
    let server = start(&["--shards", "2"], None);
    let line = &server.startup;
    assert!(
        line.contains(&format!("listening on {} with 2 shards", server.addr)),
        "{line}"
    );
    assert!(line.contains("open-file limit"), "{line}");
    assert!(line.contains("allows about"), "{line}");
    assert!(
        !line.contains('\u{1b}'),
        "no colour codes when stderr is a pipe: {line:?}"
    );
    close(login(server.addr, "cli-user"));
}

#[test]
fn the_soft_open_file_limit_is_raised_to_the_hard_limit() {
    let mut cmd_limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reads this process's limit into the struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cmd_limit) };
    let hard = cmd_limit.rlim_max.min(4096);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_corepush"));
    cmd.args(["--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"])
        .args(["--shards", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: setrlimit between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: 256,
                rlim_max: hard,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        line.contains(&format!("open-file limit {hard} (was 256)")),
        "{line}"
    );
}

#[test]
fn sigterm_closes_clients_with_1001_and_exits_zero() {
    let mut server = start(&["--shards", "2"], None);
    let mut clients: Vec<Ws> = (0..6)
        .map(|i| login(server.addr, &format!("term-{i}")))
        .collect();
    server.signal(libc::SIGTERM);
    for ws in &mut clients {
        assert_eq!(expect_close(ws), (1001, "server shutting down".into()));
    }
    drop(clients);
    assert!(server.wait_exit().success());
}

#[test]
fn out_of_descriptors_keeps_serving_and_resumes_accepting() {
    // A hard limit of 96 leaves room for a few dozen connections.
    let server = start(&["--shards", "1"], Some(96));
    // Log in while there is room, until accepting stalls.
    let mut clients = Vec::new();
    let mut pending: Vec<TcpStream> = Vec::new();
    for i in 0..120 {
        if pending.is_empty() {
            let mut s = tcp(server.addr);
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s.write_all(UPGRADE.as_bytes()).unwrap();
            if read_http_head(&mut s).starts_with("HTTP/1.1 101") {
                s.write_all(&client_frame(true, 1, format!("fd-{i}").as_bytes()))
                    .unwrap();
                read_frame(&mut s).expect("login reply");
                clients.push(s);
                continue;
            }
            pending.push(s); // its upgrade waits in the backlog
        } else {
            pending.push(tcp(server.addr));
        }
    }
    assert!(
        clients.len() > 20,
        "only {} connections fitted",
        clients.len()
    );
    assert!(!pending.is_empty(), "the limit was never reached");
    server.wait_line("out of file descriptors");

    // The connections already open are still served.
    clients[0]
        .write_all(&client_frame(true, 1, b"fd-1:still served"))
        .unwrap();
    clients[1].set_read_timeout(Some(PATIENCE)).unwrap();
    assert_eq!(read_frame(&mut clients[1]).unwrap().1, b"still served");

    // Free descriptors: the waiting connection is accepted and upgraded.
    for mut s in clients.drain(2..) {
        s.write_all(&client_frame(true, 8, &[3, 232])).unwrap();
        read_close(&mut s);
    }
    let waiting = &mut pending[0];
    waiting.set_read_timeout(Some(PATIENCE)).unwrap();
    let head = read_http_head(waiting);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_second_server_on_a_served_address_refuses_to_start() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let first = start(&["--listen", &listen, "--shards", "2"], None);
    let second = Command::new(env!("CARGO_BIN_EXE_corepush"))
        .args(["--listen", &listen, "--shards", "2", "--api-listen", "off"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(err.contains("already in use by another process"), "{err}");
    // The first one still gets every connection: uids on both of its
    // shards see each other's messages.
    let mut clients: Vec<Ws> = (0..20)
        .map(|i| login(first.addr, &format!("only-{i}")))
        .collect();
    for (i, ws) in clients.iter_mut().enumerate() {
        send_text(ws, &format!("only-{}:from {i}", (i + 1) % 20));
    }
    for i in 0..20 {
        assert_eq!(recv_text(&mut clients[(i + 1) % 20]), format!("from {i}"));
    }
}

/// The descriptor numbers this process has open.
fn open_fds() -> Vec<u32> {
    let mut fds: Vec<u32> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    // The directory being read had one too; it is closed now.
    fds.retain(|&fd| {
        // SAFETY: fcntl(F_GETFD) only asks whether the descriptor is open.
        let flags = unsafe { libc::fcntl(fd as i32, libc::F_GETFD) };
        flags != -1
    });
    fds
}

/// Run by `a_failed_start_closes_what_it_opened` in a process of its own,
/// whose open-file limit it lowers so the second shard cannot set up its
/// ring.
#[test]
#[ignore = "run in a child process by a_failed_start_closes_what_it_opened"]
fn child_of_a_failed_start() {
    let port = free_port();
    let before = open_fds();
    // The open-file limit caps descriptor numbers: leave exactly five free
    // numbers below it, so one ring fits and not two (listeners 2,
    // eventfds 2, rings 2).
    let mut limit = 0u64;
    let mut free = 0;
    while free < 5 {
        if !before.contains(&(limit as u32)) {
            free += 1;
        }
        limit += 1;
    }
    let lim = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: setrlimit only reads the struct; lowering is always allowed.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    let config = corepush::Config {
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
        shards: 2,
        ..corepush::Config::default()
    };
    let error = corepush::start(config).err().expect("a shard cannot start");
    assert!(error.to_string().contains("ulimit -n"), "{error}");
    assert_eq!(open_fds(), before, "every descriptor it opened is closed");
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is free again");
}

#[test]
fn a_failed_start_closes_what_it_opened() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_of_a_failed_start",
            "--nocapture",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("1 passed"), "the child ran: {text}");
}

#[test]
fn help_documents_every_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_corepush"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--listen",
        "--shards",
        "--no-pin",
        "--backlog",
        "--max-message-bytes",
        "--max-outbound-bytes",
        "--handshake-timeout-ms",
        "--login-timeout-ms",
        "--ping-interval-ms",
        "--idle-timeout-ms",
        "--close-timeout-ms",
        "--max-client-rate",
        "--max-connections",
        "--max-connections-per-ip",
        "--max-pending-bytes",
        "--inbox-capacity",
        "--login-secret",
        "--client-sends",
        "--idle-poll-us",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
    }
    assert!(
        help.contains("0.0.0.0:1234"),
        "the default address is shown"
    );
}
