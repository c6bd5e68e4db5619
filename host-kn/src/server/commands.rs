//! The introspection commands a Redis Cluster client relies on: `HELLO`, `INFO` (with the
//! DINOMO section of counters) and `CLUSTER`.

use dinomo_shared::resp::{Out, Proto};
use dinomo_shared::slot::{key_slot, SLOTS};

use super::acl::glob_match;
use super::conn::Conn;
use super::node_id;
use crate::ShardStats;

impl Conn {
    /// `HELLO [protover [AUTH user password] [SETNAME name]]`, with Redis's checks in
    /// Redis's order: nothing changes unless every part is valid and the login (if any)
    /// succeeded.
    pub(super) fn hello(&mut self, args: &[Vec<u8>], o: &mut Out<'_>) {
        let mut proto = self.proto;
        if let Some(v) = args.get(1) {
            match v.as_slice() {
                b"2" => proto = Proto::Resp2,
                b"3" => proto = Proto::Resp3,
                _ => {
                    o.error("NOPROTO unsupported protocol version");
                    return;
                }
            }
        }
        let mut login = None;
        let mut name = None;
        let mut i = 2;
        while i < args.len() {
            let more = args.len() - i - 1;
            match upper(&args[i]).as_str() {
                "AUTH" if more >= 2 => {
                    login = Some((&args[i + 1], &args[i + 2]));
                    i += 3;
                }
                "SETNAME" if more >= 1 => {
                    name = Some(&args[i + 1]);
                    i += 2;
                }
                _ => {
                    o.error(&format!(
                        "ERR Syntax error in HELLO option '{}'",
                        String::from_utf8_lossy(&args[i][..args[i].len().min(64)])
                    ));
                    return;
                }
            }
        }
        if let Some(n) = name {
            if let Err(e) = valid_client_name(n) {
                o.error(e);
                return;
            }
        }
        match login {
            Some((user, password)) => match self.shared.acl.authenticate(user, password) {
                Some(u) => self.user = Some(u),
                None => {
                    tracing::info!(peer = %self.peer, "HELLO AUTH failed");
                    o.error("WRONGPASS invalid username-password pair or user is disabled.");
                    return;
                }
            },
            None if self.user.is_none() => {
                o.error(
                    "NOAUTH HELLO must be called with the client already authenticated, \
                     otherwise the HELLO <proto> AUTH <user> <pass> option can be used to \
                     authenticate the client and select the RESP protocol version at the same \
                     time",
                );
                return;
            }
            None => {}
        }
        if let Some(n) = name {
            self.name = (!n.is_empty()).then(|| n.clone());
        }
        self.proto = proto;
        o.proto = self.proto;
        o.map(7);
        o.bulk(b"server");
        o.bulk(b"dinomo");
        o.bulk(b"version");
        o.bulk(env!("CARGO_PKG_VERSION").as_bytes());
        o.bulk(b"proto");
        o.int(if self.proto == Proto::Resp3 { 3 } else { 2 });
        o.bulk(b"id");
        o.int(self.id as i64);
        o.bulk(b"mode");
        o.bulk(b"cluster");
        o.bulk(b"role");
        o.bulk(b"master");
        o.bulk(b"modules");
        o.array(0);
    }

    /// `CLIENT ID | GETNAME | SETNAME | SETINFO | INFO`; every other subcommand (`KILL`,
    /// `LIST`, `PAUSE`, ...) is refused by name rather than answered with a success that did
    /// nothing.
    pub(super) fn client(&mut self, args: &[Vec<u8>], o: &mut Out<'_>) {
        let sub = upper(&args[1]);
        match (sub.as_str(), args.len()) {
            ("ID", 2) => o.int(self.id as i64),
            ("GETNAME", 2) => match &self.name {
                Some(n) => o.bulk(n),
                None => o.null(),
            },
            ("SETNAME", 3) => match valid_client_name(&args[2]) {
                Ok(()) => {
                    self.name = (!args[2].is_empty()).then(|| args[2].clone());
                    o.simple("OK");
                }
                Err(e) => o.error(e),
            },
            ("SETINFO", 4) => {
                let v = args[3].clone();
                match upper(&args[2]).as_str() {
                    "LIB-NAME" => {
                        self.lib.0 = Some(v);
                        o.simple("OK");
                    }
                    "LIB-VER" => {
                        self.lib.1 = Some(v);
                        o.simple("OK");
                    }
                    _ => o.error(&format!(
                        "ERR Unrecognized option '{}'",
                        String::from_utf8_lossy(&args[2][..args[2].len().min(64)])
                    )),
                }
            }
            ("INFO", 2) => {
                let text = |b: &Option<Vec<u8>>| {
                    b.as_deref()
                        .map(String::from_utf8_lossy)
                        .unwrap_or_default()
                        .into_owned()
                };
                let user = self
                    .user
                    .map(|u| self.shared.acl.user(u).name().to_string())
                    .unwrap_or_default();
                let line = format!(
                    "id={} addr={} laddr={} name={} user={user} lib-name={} lib-ver={} resp={}\n",
                    self.id,
                    self.peer,
                    self.shared.addr,
                    text(&self.name),
                    text(&self.lib.0),
                    text(&self.lib.1),
                    if self.proto == Proto::Resp3 { 3 } else { 2 }
                );
                o.bulk(line.as_bytes());
            }
            ("ID" | "GETNAME" | "SETNAME" | "SETINFO" | "INFO", _) => o.error(&format!(
                "ERR wrong number of arguments for 'client|{}' command",
                sub.to_ascii_lowercase()
            )),
            _ => o.error(&format!(
                "ERR CLIENT {} is not supported by this node (it serves CLIENT ID, GETNAME, \
                 SETNAME, SETINFO and INFO)",
                clip(&sub)
            )),
        }
    }

    /// `CONFIG GET pattern...` over the client-facing parameters; `CONFIG SET` and the rest
    /// are refused by name: this node's parameters are fixed when it starts.
    pub(super) fn config(&self, args: &[Vec<u8>], o: &mut Out<'_>) {
        let sub = upper(&args[1]);
        match sub.as_str() {
            "GET" if args.len() >= 3 => {
                let params = self.config_params();
                let hits: Vec<&(&str, String)> = params
                    .iter()
                    .filter(|(name, _)| {
                        args[2..]
                            .iter()
                            .any(|p| glob_match(&p.to_ascii_lowercase(), name.as_bytes()))
                    })
                    .collect();
                o.map(hits.len());
                for (name, value) in hits {
                    o.bulk(name.as_bytes());
                    o.bulk(value.as_bytes());
                }
            }
            "SET" if args.len() >= 4 => {
                let param = String::from_utf8_lossy(&args[2]).to_ascii_lowercase();
                let how = match param.as_str() {
                    "requirepass" => "--requirepass-file or --acl-file".to_string(),
                    p => format!("--{p}"),
                };
                o.error(&format!(
                    "ERR CONFIG SET '{}' is not supported by this node: its parameters are \
                     fixed when it starts (dinomo kn {})",
                    clip(&param),
                    clip(&how)
                ));
            }
            "GET" | "SET" => o.error(&format!(
                "ERR wrong number of arguments for 'config|{}' command",
                sub.to_ascii_lowercase()
            )),
            _ => o.error(&format!(
                "ERR CONFIG {} is not supported by this node (it serves CONFIG GET)",
                clip(&sub)
            )),
        }
    }

    fn config_params(&self) -> Vec<(&'static str, String)> {
        let l = &self.shared.client;
        vec![
            ("maxclients", l.maxclients.to_string()),
            ("timeout", l.timeout.as_secs().to_string()),
            ("client-query-buffer-limit", l.query_buffer.to_string()),
            ("proto-max-bulk-len", l.proto_max_bulk_len.to_string()),
            ("client-reply-limit", l.reply.to_string()),
            (
                "protected-mode",
                if self.shared.protected_mode {
                    "yes"
                } else {
                    "no"
                }
                .to_string(),
            ),
        ]
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
        kv(
            "\r\n# Clients\r\nconnected_clients",
            self.shared
                .clients
                .load(std::sync::atomic::Ordering::Acquire)
                .to_string(),
        );
        kv("maxclients", self.shared.client.maxclients.to_string());
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
        // One-sided verbs at the memory node (READ, WRITE, CAS, FAA, FLUSH): what its NIC
        // serves, beside the round trips the KN waited for.
        kv("fabric_verbs", s.fabric.verbs().to_string());
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

/// Redis's rule for client names: no spaces, newlines or other special characters.
fn valid_client_name(n: &[u8]) -> Result<(), &'static str> {
    if n.iter().all(|&b| (b'!'..=b'~').contains(&b)) {
        Ok(())
    } else {
        Err("ERR Client names cannot contain spaces, newlines or special characters.")
    }
}

/// At most 64 characters of `s`, for echoing client input in an error.
fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}
