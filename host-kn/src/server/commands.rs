//! The introspection commands a Redis Cluster client relies on: `HELLO`, `INFO` (with the
//! DINOMO section of counters) and `CLUSTER`.

use dinomo_shared::resp::{Out, Proto};
use dinomo_shared::slot::{key_slot, SLOTS};

use super::conn::Conn;
use super::node_id;
use crate::ShardStats;

impl Conn {
    pub(super) fn hello(&mut self, args: &[Vec<u8>], o: &mut Out<'_>) {
        if let Some(v) = args.get(1) {
            match v.as_slice() {
                b"2" => self.proto = Proto::Resp2,
                b"3" => self.proto = Proto::Resp3,
                _ => {
                    o.error("NOPROTO unsupported protocol version");
                    return;
                }
            }
        }
        o.proto = self.proto;
        o.map(7);
        o.bulk(b"server");
        o.bulk(b"dinomo");
        o.bulk(b"version");
        o.bulk(env!("CARGO_PKG_VERSION").as_bytes());
        o.bulk(b"proto");
        o.int(if self.proto == Proto::Resp3 { 3 } else { 2 });
        o.bulk(b"id");
        o.int(self.shared.kn_id as i64);
        o.bulk(b"mode");
        o.bulk(b"cluster");
        o.bulk(b"role");
        o.bulk(b"master");
        o.bulk(b"modules");
        o.array(0);
    }

    pub(super) fn info(&self, s: &ShardStats) -> String {
        let v = &self.view;
        let ops = (s.gets + s.puts + s.deletes).max(1) as f64;
        let gets = s.gets.max(1) as f64;
        let writes = (s.puts + s.deletes).max(1) as f64;
        let mut t = String::new();
        let mut kv = |k: &str, v: String| {
            t.push_str(k);
            t.push(':');
            t.push_str(&v);
            t.push_str("\r\n");
        };
        kv("# Server\r\nredis_version", "7.0.0".into());
        kv("dinomo_version", env!("CARGO_PKG_VERSION").into());
        kv("redis_mode", "cluster".into());
        kv("process_id", std::process::id().to_string());
        kv("tcp_port", split_addr(&self.shared.addr).1.to_string());
        kv("\r\n# Cluster\r\ncluster_enabled", "1".into());
        kv("\r\n# DINOMO\r\nkn_id", self.shared.kn_id.to_string());
        kv("map_epoch", v.map.epoch().to_string());
        kv("map_settled", u8::from(v.msg.settled).to_string());
        kv("slots_owned", v.map.slots_of(self.shared.kn_id).to_string());
        kv("shards", self.shared.shards.len().to_string());
        kv("gets", s.gets.to_string());
        kv("puts", s.puts.to_string());
        kv("deletes", s.deletes.to_string());
        kv(
            "rts_per_op",
            format!(
                "{:.3}",
                (s.read_rts + s.write_rts + s.maintenance_rts) as f64 / ops
            ),
        );
        kv(
            "read_rts_per_get",
            format!("{:.3}", s.read_rts as f64 / gets),
        );
        kv(
            "write_rts_per_write",
            format!("{:.3}", s.write_rts as f64 / writes),
        );
        kv(
            "hit_ratio_value",
            format!("{:.4}", s.hit_value as f64 / gets),
        );
        kv(
            "hit_ratio_shortcut",
            format!("{:.4}", s.hit_shortcut as f64 / gets),
        );
        kv(
            "hit_ratio_local",
            format!("{:.4}", s.hit_local as f64 / gets),
        );
        kv("miss_ratio", format!("{:.4}", s.miss as f64 / gets));
        kv("cache_value_bytes", s.cache.value_bytes.to_string());
        kv("cache_shortcut_bytes", s.cache.shortcut_bytes.to_string());
        kv("cache_budget_bytes", s.cache.budget_bytes.to_string());
        kv("cache_values", s.cache.values.to_string());
        kv("cache_shortcuts", s.cache.shortcuts.to_string());
        kv("unmerged_entries", s.unmerged.to_string());
        kv("unmerged_queue", s.unmerged_queue.to_string());
        kv("flushes", s.flushes.to_string());
        kv(
            "entries_per_flush",
            format!("{:.2}", s.flushed_entries as f64 / s.flushes.max(1) as f64),
        );
        kv("wrong_owner", s.wrong_owner.to_string());
        // Raw counters, so that a client can compute figures over an interval.
        kv("read_rts", s.read_rts.to_string());
        kv("write_rts", s.write_rts.to_string());
        kv("maintenance_rts", s.maintenance_rts.to_string());
        kv("hit_value", s.hit_value.to_string());
        kv("hit_shortcut", s.hit_shortcut.to_string());
        kv("hit_local", s.hit_local.to_string());
        kv("miss", s.miss.to_string());
        kv(
            "fabric_bytes",
            (s.fabric.read_bytes + s.fabric.write_bytes).to_string(),
        );
        t
    }

    pub(super) fn cluster(&self, args: &[Vec<u8>], o: &mut Out<'_>) {
        let v = &self.view;
        let sub = upper(&args[1]);
        let node = |o: &mut Out<'_>, kn: u16, addr: &str| {
            let (host, port) = split_addr(addr);
            o.array(3);
            o.bulk(host.as_bytes());
            o.int(port as i64);
            o.bulk(node_id(kn).as_bytes());
        };
        match (sub.as_str(), args.len()) {
            ("KEYSLOT", 3) => o.int(key_slot(&args[2]) as i64),
            ("MYID", 2) => o.bulk(node_id(self.shared.kn_id).as_bytes()),
            ("SLOTS", 2) => {
                o.array(v.msg.ranges.len());
                for &(a, b, kn) in &v.msg.ranges {
                    o.array(3);
                    o.int(a as i64);
                    o.int(b as i64);
                    node(o, kn, v.addrs.get(&kn).map_or("", String::as_str));
                }
            }
            ("SHARDS", 2) => {
                o.array(v.msg.kns.len());
                for (kn, addr) in &v.msg.kns {
                    let mine: Vec<_> = v.msg.ranges.iter().filter(|r| r.2 == *kn).collect();
                    let (host, port) = split_addr(addr);
                    o.map(2);
                    o.bulk(b"slots");
                    o.array(mine.len() * 2);
                    for r in &mine {
                        o.int(r.0 as i64);
                        o.int(r.1 as i64);
                    }
                    o.bulk(b"nodes");
                    o.array(1);
                    o.map(7);
                    o.bulk(b"id");
                    o.bulk(node_id(*kn).as_bytes());
                    o.bulk(b"port");
                    o.int(port as i64);
                    o.bulk(b"ip");
                    o.bulk(host.as_bytes());
                    o.bulk(b"endpoint");
                    o.bulk(host.as_bytes());
                    o.bulk(b"role");
                    o.bulk(b"master");
                    o.bulk(b"replication-offset");
                    o.int(0);
                    o.bulk(b"health");
                    o.bulk(b"online");
                }
            }
            ("NODES", 2) => {
                let mut t = String::new();
                for (kn, addr) in &v.msg.kns {
                    let (host, port) = split_addr(addr);
                    let flags = if *kn == self.shared.kn_id {
                        "myself,master"
                    } else {
                        "master"
                    };
                    t.push_str(&format!(
                        "{} {host}:{port}@{} {flags} - 0 0 {} connected",
                        node_id(*kn),
                        port.checked_add(10000).unwrap_or(0),
                        v.map.epoch()
                    ));
                    for r in v.msg.ranges.iter().filter(|r| r.2 == *kn) {
                        if r.0 == r.1 {
                            t.push_str(&format!(" {}", r.0));
                        } else {
                            t.push_str(&format!(" {}-{}", r.0, r.1));
                        }
                    }
                    t.push('\n');
                }
                o.bulk(t.as_bytes());
            }
            ("INFO", 2) => {
                let assigned: usize = v.msg.ranges.iter().map(|r| (r.1 - r.0) as usize + 1).sum();
                let ok = assigned == SLOTS as usize;
                let t = format!(
                    "cluster_enabled:1\r\ncluster_state:{}\r\ncluster_slots_assigned:{assigned}\r\ncluster_slots_ok:{assigned}\r\ncluster_slots_pfail:0\r\ncluster_slots_fail:0\r\ncluster_known_nodes:{n}\r\ncluster_size:{n}\r\ncluster_current_epoch:{e}\r\ncluster_my_epoch:{e}\r\n",
                    if ok { "ok" } else { "fail" },
                    n = v.msg.kns.len(),
                    e = v.map.epoch()
                );
                o.text(&t);
            }
            _ => o.error(&format!(
                "ERR unknown subcommand or wrong number of arguments for 'cluster|{}'",
                sub.to_ascii_lowercase()
            )),
        }
    }
}

pub(super) fn upper(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_ascii_uppercase()
}

fn split_addr(a: &str) -> (&str, u16) {
    match a.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().unwrap_or(0)),
        None => (a, 0),
    }
}
