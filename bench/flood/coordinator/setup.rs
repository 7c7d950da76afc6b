//! Before any phase: resolve the targets, choose the worker count from the
//! open-file limit, choose the source addresses, start the workers and
//! give each its share of the connections.

use super::workers::{split, Workers};
use super::{Ctx, FD_RESERVE};
use crate::proto::{pick, Command, Event};
use crate::sys;
use crate::Args;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, ToSocketAddrs};
use std::time::Duration;

/// Resolves `host:port` to an IPv4 address.
fn resolve(target: &str) -> Option<SocketAddrV4> {
    target.to_socket_addrs().ok()?.find_map(|a| match a {
        SocketAddr::V4(v4) => Some(v4),
        SocketAddr::V6(_) => None,
    })
}

/// Everything up to the first phase. On an error it prints why and
/// returns the exit code (2).
pub fn start(args: &Args) -> Result<Ctx<'_>, i32> {
    let (soft, hard) = sys::raise_nofile_limit();
    if args.sweep
        && (args.sweep_rates.is_empty()
            || args.sweep_rates.contains(&0)
            || args.sweep_secs.is_nan()
            || args.sweep_secs <= 0.0
            || args.sweep_p99_ms.is_nan()
            || args.sweep_p99_ms <= 0.0)
    {
        eprintln!(
            "corepush-flood: --sweep needs rates above 0 (--sweep-rates), and --sweep-secs and --sweep-p99-ms above 0"
        );
        return Err(2);
    }
    if args.soak_conns.is_some()
        && (args.soak_mix.len() != 4
            || args.soak_mix.iter().all(|&w| w == 0)
            || args.soak_slots == 0
            || args.soak_reap_secs.is_nan()
            || args.soak_reap_secs <= 0.0)
    {
        eprintln!(
            "corepush-flood: --soak-mix takes four weights (clean,abrupt,unlogged,silent), not all 0; \
             --soak-slots and --soak-reap-secs must be above 0"
        );
        return Err(2);
    }
    let mut targets = Vec::new();
    for t in &args.targets {
        match resolve(t) {
            Some(a) => targets.push(a),
            None => {
                eprintln!("corepush-flood: cannot resolve --target {t} to an IPv4 address");
                return Err(2);
            }
        }
    }
    let per_proc = soft.saturating_sub(FD_RESERVE).max(1);
    let conns = u64::from(args.conns);
    let procs = args
        .procs
        .unwrap_or_else(|| conns.div_ceil(per_proc).max(1) as usize)
        .max(1);
    if conns.div_ceil(procs as u64) > per_proc {
        eprintln!(
            "corepush-flood: {conns} connections over {procs} process(es) need {} fds each, \
             but one process may open {soft} (hard limit {hard}); use --procs {} or raise `ulimit -n`",
            conns.div_ceil(procs as u64) + FD_RESERVE,
            conns.div_ceil(per_proc)
        );
        return Err(2);
    }
    // A soak worker also holds up to --soak-slots short connections.
    let slots = if args.soak_conns.is_some() {
        u64::from(args.soak_slots)
    } else {
        0
    };
    if slots > 0 && conns.div_ceil(procs as u64) + slots > per_proc {
        eprintln!(
            "corepush-flood: {} steady connections and --soak-slots {slots} per worker need more than the \
             {per_proc} fds one process may use; lower --soak-slots or add --procs",
            conns.div_ceil(procs as u64)
        );
        return Err(2);
    }
    let loopback = targets.iter().all(|t| t.ip().is_loopback());
    let sources = if loopback && args.sources != "none" {
        match source_pool(&args.sources, 64) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("corepush-flood: {e}");
                return Err(2);
            }
        }
    } else {
        Vec::new()
    };
    let mut server_pids = args.server_pids.clone();
    server_pids.sort_unstable();
    server_pids.dedup();

    println!("corepush-flood: {conns} connections to {:?}, {procs} worker process(es), fd limit {soft}/{hard}, {} source address(es)",
        args.targets, sources.len());
    let mut workers = match Workers::spawn(procs) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("corepush-flood: cannot start workers: {e}");
            return Err(2);
        }
    };
    let ready = workers.wait_for(
        procs,
        Duration::from_secs(10),
        None,
        pick!(Event::Ready { .. } => ()),
    );
    if ready.len() < procs {
        eprintln!("corepush-flood: workers did not start");
        workers.shutdown();
        return Err(2);
    }
    for w in 0..procs {
        let (lo, hi) = split(conns as usize, procs, w);
        workers.send(
            w,
            &Command::Init {
                base: lo as u32,
                count: (hi - lo) as u32,
                total: conns as u32,
                targets: targets.clone(),
                sources: sources.clone(),
            },
        );
    }
    workers.wait_for(
        procs,
        Duration::from_secs(10),
        None,
        pick!(Event::InitDone => ()),
    );
    Ok(Ctx {
        args,
        workers,
        server_pids,
        conns,
        fd_soft_limit: soft,
    })
}

/// Source addresses from a CIDR: up to `max` host addresses, skipping
/// 127.0.0.x (the usual bind address) when the range is wide enough, and
/// last octets 0 and 255.
pub fn source_pool(cidr: &str, max: usize) -> Result<Vec<Ipv4Addr>, String> {
    let (ip, bits) = cidr
        .split_once('/')
        .ok_or_else(|| format!("--sources {cidr}: expected a.b.c.d/prefix"))?;
    let ip: Ipv4Addr = ip
        .parse()
        .map_err(|_| format!("--sources {cidr}: bad address"))?;
    let bits: u32 = bits
        .parse()
        .map_err(|_| format!("--sources {cidr}: bad prefix"))?;
    if bits > 32 {
        return Err(format!("--sources {cidr}: bad prefix"));
    }
    let mask = if bits == 0 {
        0
    } else {
        u32::MAX << (32 - bits)
    };
    let net = u32::from(ip) & mask;
    let size = if bits == 0 {
        u64::from(u32::MAX) + 1
    } else {
        1u64 << (32 - bits)
    };
    let start = if size > 512 { 257 } else { 1 };
    let mut out = Vec::new();
    let mut off = start;
    while out.len() < max && off < size {
        let a = net + off as u32;
        let last = a & 0xFF;
        if last != 0 && last != 255 {
            out.push(Ipv4Addr::from(a));
        }
        off += 1;
    }
    if out.is_empty() && size == 1 {
        out.push(ip);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_from_cidr() {
        let s = source_pool("127.0.0.0/8", 4).unwrap();
        assert_eq!(
            s,
            vec![
                Ipv4Addr::new(127, 0, 1, 1),
                Ipv4Addr::new(127, 0, 1, 2),
                Ipv4Addr::new(127, 0, 1, 3),
                Ipv4Addr::new(127, 0, 1, 4)
            ]
        );
        let s = source_pool("127.0.0.0/30", 10).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(
            source_pool("127.0.0.9/32", 10).unwrap(),
            vec![Ipv4Addr::new(127, 0, 0, 9)]
        );
        assert!(source_pool("nonsense", 1).is_err());
    }
}
