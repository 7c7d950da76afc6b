//! Thousands of connections on several shards, all sending and receiving at
//! once, with exact delivery checked: nothing lost, duplicated, reordered per
//! sender, or misrouted.

mod util;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use corepush::stats::Counter;
use util::*;

const CONNS: usize = 3000;
const THREADS: usize = 12;
const SENDS_EACH: usize = 8;
const BROADCASTERS: usize = 4;

/// Who sender `i`'s message `k` goes to: a connection index, or None for all.
fn plan(i: usize, k: usize) -> Option<usize> {
    if k == 0 && i < BROADCASTERS {
        return None;
    }
    let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (k as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    Some((h.wrapping_mul(0x1656_67B1_9E37_79F9) >> 20) as usize % CONNS)
}

/// Messages each connection must receive, as (sender, seq), sorted.
fn expected() -> Vec<Vec<(usize, usize)>> {
    let mut out = vec![Vec::new(); CONNS];
    for i in 0..CONNS {
        for k in 0..SENDS_EACH {
            match plan(i, k) {
                Some(r) => out[r].push((i, k)),
                None => out.iter_mut().for_each(|e| e.push((i, k))),
            }
        }
    }
    out
}

/// A barrier that gives up (panics) instead of hanging when a thread died.
struct Rendezvous {
    arrived: AtomicUsize,
    parties: usize,
}

impl Rendezvous {
    fn new(parties: usize) -> Arc<Rendezvous> {
        Arc::new(Rendezvous {
            arrived: AtomicUsize::new(0),
            parties,
        })
    }

    fn wait(&self) {
        self.arrived.fetch_add(1, Ordering::SeqCst);
        let start = Instant::now();
        while self.arrived.load(Ordering::SeqCst) < self.parties {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "a client thread died"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[test]
fn thousands_of_connections_exchange_exactly() {
    let server = TestServer::start(3);
    let addr = server.addr;
    let expected = Arc::new(expected());
    let start = Rendezvous::new(THREADS + 1);
    let sent = Rendezvous::new(THREADS + 1);
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (start, sent, expected) = (start.clone(), sent.clone(), expected.clone());
            std::thread::spawn(move || {
                let mine: Vec<usize> = (t..CONNS).step_by(THREADS).collect();
                let mut conns: Vec<Ws> = mine
                    .iter()
                    .map(|&i| login(addr, &format!("load-{i}")))
                    .collect();
                start.wait();
                for k in 0..SENDS_EACH {
                    for (ws, &i) in conns.iter_mut().zip(&mine) {
                        let to = match plan(i, k) {
                            Some(r) => format!("load-{r}"),
                            None => "all".into(),
                        };
                        let target = plan(i, k).map_or("all".into(), |r| r.to_string());
                        send_text(ws, &format!("{to}:{i} {k} {target}"));
                    }
                }
                sent.wait();
                let mut problems = Vec::new();
                for (ws, &r) in conns.iter_mut().zip(&mine) {
                    let expected = &expected[r];
                    let mut got = Vec::with_capacity(expected.len());
                    for _ in 0..expected.len() {
                        let text = recv_text(ws);
                        let mut parts = text.split(' ');
                        let i: usize = parts.next().unwrap().parse().unwrap();
                        let k: usize = parts.next().unwrap().parse().unwrap();
                        let target = parts.next().unwrap();
                        if target != "all" && target != r.to_string() {
                            problems.push(format!("misrouted: {text} reached {r}"));
                        }
                        got.push((i, k));
                    }
                    // Per-sender order: each sender's messages in send order.
                    let mut last = std::collections::HashMap::new();
                    for &(i, k) in &got {
                        if let Some(prev) = last.insert(i, k) {
                            if k <= prev {
                                problems.push(format!("{r}: from {i}, {k} after {prev}"));
                            }
                        }
                    }
                    got.sort_unstable();
                    if got != *expected {
                        problems.push(format!("{r}: wrong set of messages"));
                    }
                }
                (conns, problems)
            })
        })
        .collect();
    start.wait();
    sent.wait();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let problems: Vec<&String> = results.iter().flat_map(|(_, p)| p).collect();
    assert!(
        problems.is_empty(),
        "{} problems, first: {:?}",
        problems.len(),
        &problems[..problems.len().min(5)]
    );

    // Exactly the planned deliveries, and not one more on any socket.
    let planned: u64 = expected.iter().map(|e| e.len() as u64).sum();
    let s = server.wait_for("every delivery counted", |s| {
        s.get(Counter::DeliveredSameShard) + s.get(Counter::DeliveredCrossShard) >= planned
    });
    assert_eq!(
        s.get(Counter::DeliveredSameShard) + s.get(Counter::DeliveredCrossShard),
        planned
    );
    assert!(s.get(Counter::DeliveredSameShard) > 0 && s.get(Counter::DeliveredCrossShard) > 0);
    for (conns, _) in &results {
        for ws in conns {
            ws.get_ref().set_nonblocking(true).unwrap();
            let mut byte = [0u8; 1];
            let extra = std::io::Read::read(&mut ws.get_ref(), &mut byte);
            assert!(extra.is_err(), "an unexpected extra message");
        }
    }
    let per_shard = server.shard_stats();
    assert!(per_shard
        .iter()
        .all(|s| s.get(Counter::LoggedIn) > CONNS as u64 / 10));
    drop(results);
    server.wait_empty();
}
