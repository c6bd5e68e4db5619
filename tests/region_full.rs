//! A region filled to its limit, as processes (a DPM, a manager, a KN) on loopback: a
//! small region with the smallest index area takes distinct keys until the memory node
//! grants no more log space. Every write is either acknowledged (`+OK`) or refused with an
//! `-OOM` error before it had any effect; reads and deletes keep working while the region
//! is full; and after the KN is killed with SIGKILL and a new KN takes over, every
//! acknowledged key reads back its value (or nil if acknowledged deleted) and every refused
//! one reads nil. (Before, the index area filled up while writes were still acknowledged,
//! the fence answered `Corrupt`, and the new owner read acknowledged keys as nil.)

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::procs::{ready_addr, spawn_kn, wait_map, Conn, Proc, DEADLINE};
use common::{dinomo, stderr};
use dinomo::resp::Value;

const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Commands sent before their replies are read.
const PIPELINE: u64 = 256;

fn key(i: u64) -> Vec<u8> {
    format!("k{i}").into_bytes()
}

fn value(i: u64) -> Vec<u8> {
    format!("v{i}").into_bytes()
}

struct Cluster {
    _dir: tempfile::TempDir,
    region: PathBuf,
    _dpm: Proc,
    _manager: Proc,
    mgr: String,
}

impl Cluster {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let region = dir.path().join("region");
        let r = region.to_str().expect("utf-8").to_string();
        // 2 MiB in 32 KiB blocks, the smallest index area (64 KiB, ~3 000 keys): full after
        // some 20 000 keys, most of their index in log blocks.
        let o = dinomo(&[
            "dpm",
            "format",
            "--path",
            &r,
            "--size",
            "2M",
            "--block-size",
            "32K",
            "--index-percent",
            "1",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let (dpm, _) = Proc::spawn(&["dpm", "serve", "--path", &r, "--workers", "1", "--no-pin"]);
        let (manager, out) = Proc::spawn(&[
            "manager",
            "--dpm",
            &r,
            "--listen",
            "127.0.0.1:0",
            "--lease-ms",
            "600",
        ]);
        let mgr = ready_addr(out);
        Self {
            _dir: dir,
            region,
            _dpm: dpm,
            _manager: manager,
            mgr,
        }
    }

    /// Starts a KN; returns its id, address and process.
    fn start_kn(&self) -> (u16, String, Proc) {
        let r = self.region.to_str().expect("utf-8");
        spawn_kn(r, &self.mgr, &["--threads", "1", "--cache", "1M"])
    }
}

/// Sends `cmds` pipelined and returns their replies in order.
fn pipelined(c: &mut Conn, cmds: &[Vec<Vec<u8>>]) -> Vec<Value> {
    for cmd in cmds {
        let args: Vec<&[u8]> = cmd.iter().map(|a| a.as_slice()).collect();
        assert!(c.send(&args), "send");
    }
    (0..cmds.len())
        .map(|_| c.read().expect("a reply"))
        .collect()
}

fn get_all(c: &mut Conn, keys: &[u64]) -> Vec<Value> {
    let mut out = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(PIPELINE as usize) {
        let cmds: Vec<Vec<Vec<u8>>> = chunk
            .iter()
            .map(|&i| vec![b"GET".to_vec(), key(i)])
            .collect();
        out.extend(pipelined(c, &cmds));
    }
    out
}

#[test]
fn a_full_region_refuses_writes_before_acknowledging_and_loses_nothing_acknowledged() {
    let c = Cluster::start();
    let (first_id, addr, mut kn) = c.start_kn();
    wait_map(&c.mgr, 1);
    let mut conn = Conn::open(&addr, REPLY_TIMEOUT).expect("connect");
    let mut acked: Vec<u64> = Vec::new();
    let mut refused: Vec<u64> = Vec::new();
    let mut oom_text = String::new();
    let mut next = 0u64;
    let t0 = Instant::now();
    // Distinct keys until a whole pipeline is refused.
    loop {
        let cmds: Vec<Vec<Vec<u8>>> = (next..next + PIPELINE)
            .map(|i| vec![b"SET".to_vec(), key(i), value(i)])
            .collect();
        let replies = pipelined(&mut conn, &cmds);
        let mut refused_now = 0;
        for (i, r) in (next..).zip(replies) {
            match r {
                Value::Simple(s) if s == "OK" => acked.push(i),
                Value::Error(e) if e.starts_with("OOM ") => {
                    refused.push(i);
                    refused_now += 1;
                    oom_text = e;
                }
                other => panic!("SET k{i}: unexpected reply {other:?}"),
            }
        }
        next += PIPELINE;
        if refused_now == PIPELINE {
            break;
        }
        assert!(
            next < 200_000 && t0.elapsed() < DEADLINE,
            "the region never filled: {} acknowledged",
            acked.len()
        );
    }
    assert!(acked.len() > 6_000, "only {} acknowledged", acked.len());
    assert!(
        oom_text.contains("region is full") && oom_text.contains("--region-size"),
        "the refusal says what happened and what to do: {oom_text}"
    );
    // Reads keep working while the region is full; refused writes changed nothing.
    let sample: Vec<u64> = acked.iter().copied().step_by(97).collect();
    for (i, v) in sample.iter().zip(get_all(&mut conn, &sample)) {
        assert_eq!(v, Value::Bulk(value(*i)), "GET k{i} while full");
    }
    let refused_sample: Vec<u64> = refused.iter().copied().step_by(31).collect();
    for (i, v) in refused_sample
        .iter()
        .zip(get_all(&mut conn, &refused_sample))
    {
        assert_eq!(v, Value::Nil, "refused SET k{i} must have no effect");
    }
    // Still refused, still readable: the state is stable, not a momentary hiccup.
    let r = pipelined(
        &mut conn,
        &[vec![b"SET".to_vec(), b"one-more".to_vec(), b"x".to_vec()]],
    );
    assert!(
        matches!(&r[0], Value::Error(e) if e.starts_with("OOM ")),
        "{r:?}"
    );

    // Deletes still work when full (they need no index room): the block kept behind the
    // last refused spare takes them.
    let doomed: Vec<u64> = acked.split_off(acked.len() - 500);
    let cmds: Vec<Vec<Vec<u8>>> = doomed
        .iter()
        .map(|&i| vec![b"DEL".to_vec(), key(i)])
        .collect();
    for (i, r) in doomed.iter().zip(pipelined(&mut conn, &cmds)) {
        assert_eq!(r, Value::Int(1), "DEL k{i} while full");
    }
    for (i, v) in doomed.iter().zip(get_all(&mut conn, &doomed)) {
        assert_eq!(v, Value::Nil, "deleted k{i}");
    }

    // SIGKILL the KN; a new KN takes its slots once the manager fenced it.
    kn.signal(nix::sys::signal::Signal::SIGKILL);
    kn.wait();
    let (second_id, addr2, _kn2) = c.start_kn();
    assert_ne!(second_id, first_id);
    let t1 = Instant::now();
    loop {
        let map = wait_map(&c.mgr, 1);
        if map.addr_of(second_id).is_some() && map.addr_of(first_id).is_none() {
            break;
        }
        assert!(
            t1.elapsed() < DEADLINE,
            "the new KN never took over: {map:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut conn2 = Conn::open(&addr2, REPLY_TIMEOUT).expect("connect");
    let replies = get_all(&mut conn2, &acked);
    let lost: Vec<u64> = acked
        .iter()
        .zip(&replies)
        .filter(|(i, v)| **v != Value::Bulk(value(**i)))
        .map(|(i, _)| *i)
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged keys lost after the failover, e.g. k{:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)]
    );
    for (i, v) in doomed.iter().zip(get_all(&mut conn2, &doomed)) {
        assert_eq!(
            v,
            Value::Nil,
            "acknowledged DEL k{i} lost after the failover"
        );
    }
    let refused_set: HashSet<u64> = refused.iter().copied().collect();
    let refused_all: Vec<u64> = refused_set.into_iter().collect();
    for (i, v) in refused_all.iter().zip(get_all(&mut conn2, &refused_all)) {
        assert_eq!(v, Value::Nil, "refused SET k{i} became visible");
    }
}
