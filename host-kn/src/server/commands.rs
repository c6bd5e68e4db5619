//! The introspection commands clients rely on: `HELLO`, `COMMAND` (the command table and
//! its key specifications, which cluster clients route by), `CLIENT` (with a registry of
//! the open connections for `CLIENT LIST`), `CONFIG`, `INFO` (Redis's sections and the
//! DINOMO section of counters), `CLUSTER`, `TIME` and `LASTSAVE`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dinomo_shared::resp::{Out, Proto};
use dinomo_shared::slot::{key_slot, SLOTS};

use super::acl::{
    command_count, command_docs, command_entry, command_info_by_name, command_keys, command_list,
    glob_match,
};
use super::conn::Conn;
use super::{node_id, ClientLimits, Shared, View};
use crate::ShardStats;

/// The Redis version this node's commands follow (`INFO`'s `redis_version`).
const REDIS_VERSION: &str = "7.2.0";

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
        self.sync_client();
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

    /// `COMMAND [COUNT | INFO name... | LIST [FILTERBY ...] | DOCS [name...] | GETKEYS cmd
    /// arg... | GETKEYSANDFLAGS cmd arg...]`: the command table, which cluster clients
    /// (redis-py's RedisCluster, ioredis) read to find a command's keys and so its slot.
    pub(super) fn command(&self, args: &[Vec<u8>], o: &mut Out<'_>) {
        let Some(sub) = args.get(1).map(|a| upper(a)) else {
            o.array(command_count());
            for id in 0..command_count() {
                command_entry(id, o);
            }
            return;
        };
        let argc = args.len();
        match sub.as_str() {
            "COUNT" if argc == 2 => o.int(command_count() as i64),
            "INFO" => {
                if argc == 2 {
                    o.array(command_count());
                    for id in 0..command_count() {
                        command_entry(id, o);
                    }
                    return;
                }
                o.array(argc - 2);
                for a in &args[2..] {
                    if !command_info_by_name(a, o) {
                        o.null();
                    }
                }
            }
            "LIST" => match command_list(&args[2..]) {
                Ok(names) => {
                    o.array(names.len());
                    for n in names {
                        o.bulk(n.to_ascii_lowercase().as_bytes());
                    }
                }
                Err(e) => o.error(&e),
            },
            "DOCS" => command_docs(&args[2..], o),
            "GETKEYS" | "GETKEYSANDFLAGS" if argc >= 3 => match command_keys(&args[2..]) {
                Ok(keys) => {
                    o.array(keys.len());
                    for (k, flags) in keys {
                        if sub == "GETKEYS" {
                            o.bulk(k);
                        } else {
                            o.array(2);
                            o.bulk(k);
                            o.array(flags.len());
                            for f in flags {
                                o.simple(f);
                            }
                        }
                    }
                }
                Err(e) => o.error(e),
            },
            "COUNT" | "GETKEYS" | "GETKEYSANDFLAGS" => o.error(&format!(
                "ERR wrong number of arguments for 'command|{}' command",
                sub.to_ascii_lowercase()
            )),
            _ => o.error(&format!(
                "ERR unknown subcommand '{}'. Try COMMAND HELP.",
                clip(&String::from_utf8_lossy(&args[1]))
            )),
        }
    }

    /// `TIME`: the Unix time as seconds and microseconds.
    pub(super) fn time(&self, o: &mut Out<'_>) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        o.array(2);
        o.bulk(now.as_secs().to_string().as_bytes());
        o.bulk(now.subsec_micros().to_string().as_bytes());
    }

    /// `LASTSAVE`: when this node started. There is nothing to save: every acknowledged
    /// write is already durable in the memory node, so the data was "saved" as of start
    /// and at every write since.
    pub(super) fn lastsave(&self, o: &mut Out<'_>) {
        o.int(self.shared.intro.started_unix as i64);
    }

    /// Copies what `CLIENT LIST` shows of this connection to its registry entry (at
    /// `HELLO`, `CLIENT SETNAME`, `CLIENT SETINFO`: never per request).
    pub(super) fn sync_client(&self) {
        let user = self
            .user
            .map(|u| self.shared.acl.user(u).name().to_string())
            .unwrap_or_default();
        let mut m = self.reg.cell.meta.lock().unwrap_or_else(|e| e.into_inner());
        *m = ClientMeta {
            name: self.name.clone(),
            lib: self.lib.clone(),
            resp: if self.proto == Proto::Resp3 { 3 } else { 2 },
            user,
        };
    }

    /// This connection's registry values as they are now (`CLIENT INFO`, and this
    /// connection's own line of `CLIENT LIST`).
    fn own_meta(&self) -> ClientMeta {
        ClientMeta {
            name: self.name.clone(),
            lib: self.lib.clone(),
            resp: if self.proto == Proto::Resp3 { 3 } else { 2 },
            user: self
                .user
                .map(|u| self.shared.acl.user(u).name().to_string())
                .unwrap_or_default(),
        }
    }

    /// `CLIENT ID | GETNAME | SETNAME | SETINFO | INFO | LIST | NO-EVICT | NO-TOUCH |
    /// REPLY ON`; every other subcommand (`KILL`, `PAUSE`, `REPLY OFF`, ...) is refused by
    /// name rather than answered with a success that did nothing.
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
                    self.sync_client();
                    o.simple("OK");
                }
                Err(e) => o.error(e),
            },
            ("SETINFO", 4) => {
                let v = args[3].clone();
                if v.iter().any(|&b| !(b'!'..=b'~').contains(&b)) {
                    o.error(&format!(
                        "ERR {} cannot contain spaces, newlines or special characters.",
                        String::from_utf8_lossy(&args[2][..args[2].len().min(64)])
                    ));
                    return;
                }
                match upper(&args[2]).as_str() {
                    "LIB-NAME" => {
                        self.lib.0 = Some(v);
                        self.sync_client();
                        o.simple("OK");
                    }
                    "LIB-VER" => {
                        self.lib.1 = Some(v);
                        self.sync_client();
                        o.simple("OK");
                    }
                    _ => o.error(&format!(
                        "ERR Unrecognized option '{}'",
                        String::from_utf8_lossy(&args[2][..args[2].len().min(64)])
                    )),
                }
            }
            ("INFO", 2) => {
                let mut line = client_line(&self.reg.cell, &self.own_meta(), "client|info");
                line.push('\n');
                o.bulk(line.as_bytes());
            }
            ("LIST", _) => self.client_list(&args[2..], o),
            ("NO-EVICT" | "NO-TOUCH", 3) => match upper(&args[2]).as_str() {
                "ON" | "OFF" => o.simple("OK"),
                _ => o.error("ERR syntax error"),
            },
            ("REPLY", 3) => match upper(&args[2]).as_str() {
                "ON" => o.simple("OK"),
                "OFF" | "SKIP" => o.error(
                    "ERR CLIENT REPLY OFF and SKIP are not supported by this node (every \
                     command is answered)",
                ),
                _ => o.error("ERR syntax error"),
            },
            (
                "ID" | "GETNAME" | "SETNAME" | "SETINFO" | "INFO" | "NO-EVICT" | "NO-TOUCH"
                | "REPLY",
                _,
            ) => o.error(&format!(
                "ERR wrong number of arguments for 'client|{}' command",
                sub.to_ascii_lowercase()
            )),
            _ => o.error(&format!(
                "ERR CLIENT {} is not supported by this node (it serves CLIENT ID, GETNAME, \
                 SETNAME, SETINFO, INFO, LIST, NO-EVICT, NO-TOUCH and REPLY ON)",
                clip(&sub)
            )),
        }
    }

    /// `CLIENT LIST [TYPE normal|master|replica|pubsub] [ID id...]`: every connection in
    /// Redis's line format.
    fn client_list(&self, filter: &[Vec<u8>], o: &mut Out<'_>) {
        let mut ids: Option<Vec<u64>> = None;
        let mut normal = true;
        let mut i = 0;
        while i < filter.len() {
            match upper(&filter[i]).as_str() {
                "TYPE" if i + 1 < filter.len() => {
                    match upper(&filter[i + 1]).as_str() {
                        "NORMAL" => normal = true,
                        "MASTER" | "REPLICA" | "SLAVE" | "PUBSUB" => normal = false,
                        _ => {
                            o.error(&format!(
                                "ERR Unknown client type '{}'",
                                clip(&String::from_utf8_lossy(&filter[i + 1]))
                            ));
                            return;
                        }
                    }
                    i += 2;
                }
                "ID" if i + 1 < filter.len() => {
                    let mut want = Vec::new();
                    for a in &filter[i + 1..] {
                        match std::str::from_utf8(a)
                            .ok()
                            .and_then(|s| s.parse::<u64>().ok())
                        {
                            Some(id) if id > 0 => want.push(id),
                            _ => {
                                o.error("ERR Invalid client ID");
                                return;
                            }
                        }
                    }
                    ids = Some(want);
                    i = filter.len();
                }
                _ => {
                    o.error("ERR syntax error");
                    return;
                }
            }
        }
        let mut cells: Vec<Arc<ClientCell>> = if normal {
            self.shared
                .intro
                .clients
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .filter(|c| ids.as_ref().map_or(true, |w| w.contains(&c.id)))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        cells.sort_by_key(|c| c.id);
        let mut t = String::new();
        for c in cells {
            let (meta, cmd) = if c.id == self.reg.cell.id {
                (self.own_meta(), "client|list")
            } else {
                let m = c.meta.lock().unwrap_or_else(|e| e.into_inner()).clone();
                (m, "NULL")
            };
            t.push_str(&client_line(&c, &meta, cmd));
            t.push('\n');
        }
        o.bulk(t.as_bytes());
    }

    /// `CONFIG GET pattern...`, `CONFIG SET param value [param value ...]` for the
    /// parameters that can change safely while serving (`timeout`, `maxclients`),
    /// `CONFIG RESETSTAT`; the rest (`CONFIG REWRITE`, other parameters) are refused by
    /// name: those are fixed when this node starts.
    pub(super) async fn config(&self, args: &[Vec<u8>], o: &mut Out<'_>) {
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
            "SET" if args.len() >= 4 && args.len() % 2 == 0 => match self.config_set(&args[2..]) {
                Ok(()) => o.simple("OK"),
                Err(e) => o.error(&e),
            },
            "RESETSTAT" if args.len() == 2 => {
                self.shared.intro.reset_stats();
                let shared = Arc::clone(&self.shared);
                let expired = tokio::task::spawn_blocking(move || shared.stats().expired)
                    .await
                    .unwrap_or_default();
                self.shared.expired_base.store(expired, Ordering::Relaxed);
                o.simple("OK");
            }
            "GET" | "SET" | "RESETSTAT" => o.error(&format!(
                "ERR wrong number of arguments for 'config|{}' command",
                sub.to_ascii_lowercase()
            )),
            _ => o.error(&format!(
                "ERR CONFIG {} is not supported by this node (it serves CONFIG GET, SET and \
                 RESETSTAT; its configuration lives on its command line)",
                clip(&sub)
            )),
        }
    }

    /// Checks every pair first, then applies them all (Redis's all-or-nothing).
    fn config_set(&self, pairs: &[Vec<u8>]) -> Result<(), String> {
        let intro = &self.shared.intro;
        let mut apply: Vec<(&str, u64)> = Vec::new();
        for pair in pairs.chunks_exact(2) {
            let param = String::from_utf8_lossy(&pair[0]).to_ascii_lowercase();
            let value = std::str::from_utf8(&pair[1])
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok());
            let bad = |why: &str| {
                format!(
                    "ERR CONFIG SET failed (possibly related to argument '{}') - {why}",
                    clip(&param)
                )
            };
            match param.as_str() {
                "timeout" => {
                    let v =
                        value.ok_or_else(|| bad("argument couldn't be parsed into an integer"))?;
                    if v > i32::MAX as u64 {
                        return Err(bad("argument must be between 0 and 2147483647 inclusive"));
                    }
                    apply.push(("timeout", v));
                }
                "maxclients" => {
                    let v =
                        value.ok_or_else(|| bad("argument couldn't be parsed into an integer"))?;
                    if v == 0 || v > intro.maxclients_cap as u64 {
                        return Err(bad(&format!(
                            "argument must be between 1 and {} inclusive (the open-file limit \
                             this node started with)",
                            intro.maxclients_cap
                        )));
                    }
                    apply.push(("maxclients", v));
                }
                p => {
                    let how = match p {
                        "requirepass" => "--requirepass-file or --acl-file".to_string(),
                        "maxmemory" => "--cache".to_string(),
                        p => format!("--{p}"),
                    };
                    return Err(format!(
                        "ERR CONFIG SET '{}' is not supported by this node: its parameters are \
                         fixed when it starts (dinomo kn {})",
                        clip(p),
                        clip(&how)
                    ));
                }
            }
        }
        for (p, v) in apply {
            match p {
                "timeout" => intro.timeout_secs.store(v, Ordering::Relaxed),
                _ => intro.maxclients.store(v as usize, Ordering::Relaxed),
            }
        }
        Ok(())
    }

    fn config_params(&self) -> Vec<(&'static str, String)> {
        let l = &self.shared.client;
        let intro = &self.shared.intro;
        let yes_no = |b: bool| if b { "yes" } else { "no" }.to_string();
        vec![
            ("maxclients", intro.maxclients().to_string()),
            ("timeout", intro.timeout().as_secs().to_string()),
            ("client-query-buffer-limit", l.query_buffer.to_string()),
            ("proto-max-bulk-len", l.proto_max_bulk_len.to_string()),
            ("client-reply-limit", l.reply.to_string()),
            ("protected-mode", yes_no(self.shared.protected_mode)),
            // Nothing is saved to disk: every acknowledged write is already durable in the
            // memory node, which is what an always-fsynced append-only file gives Redis.
            ("save", String::new()),
            ("appendonly", "yes".into()),
            ("appendfsync", "always".into()),
            // The cache budget: keys are never evicted, only cached values and shortcuts.
            ("maxmemory", intro.maxmemory.to_string()),
            ("maxmemory-policy", "noeviction".into()),
            ("databases", "1".into()),
            ("cluster-enabled", "yes".into()),
            ("port", split_addr(&self.shared.addr).1.to_string()),
        ]
    }

    /// `INFO [section ...]`: gathers the shards' counters, then [`Conn::info`].
    pub(super) async fn info_command(
        &mut self,
        args: &[Vec<u8>],
        keyspace: Option<(u64, u64)>,
        o: &mut Out<'_>,
    ) {
        let shared = Arc::clone(&self.shared);
        let stats = tokio::task::spawn_blocking(move || shared.stats())
            .await
            .unwrap_or_default();
        self.refresh();
        let ops = self.ops_per_sec().await;
        o.text(&info(
            &self.shared,
            &self.view,
            &args[1..],
            &stats,
            keyspace,
            ops,
        ));
    }

    /// Commands per second over the interval since an earlier `INFO` between 0.1 s and
    /// 10 s ago, or else over a 100 ms wait.
    async fn ops_per_sec(&self) -> f64 {
        let intro = &self.shared.intro;
        let recent = |now: Instant| {
            let s = intro.samples.lock().unwrap_or_else(|e| e.into_inner());
            s.iter()
                .rev()
                .find(|(t, _)| {
                    let age = now.saturating_duration_since(*t);
                    age >= Duration::from_millis(100) && age <= Duration::from_secs(10)
                })
                .copied()
        };
        let now = Instant::now();
        let total = intro.commands();
        let (t0, n0) = match recent(now) {
            Some(s) => s,
            None => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                (now, total)
            }
        };
        let (t1, n1) = (Instant::now(), intro.commands());
        {
            let mut s = intro.samples.lock().unwrap_or_else(|e| e.into_inner());
            s.retain(|(t, _)| t1.saturating_duration_since(*t) <= Duration::from_secs(10));
            if s.len() >= 16 {
                s.remove(0);
            }
            s.push((t1, n1));
        }
        let secs = t1.saturating_duration_since(t0).as_secs_f64();
        if secs > 0.0 {
            n1.saturating_sub(n0) as f64 / secs
        } else {
            0.0
        }
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

/// The text of `INFO` for `sections` (none, `default`, `all`, `everything` or section
/// names), from the shards' counters `s`, the key and expiring-key counts of the
/// database if known (`keyspace`, else no `db0` line), and the command rate.
pub(super) fn info(
    shared: &Shared,
    view: &View,
    sections: &[Vec<u8>],
    s: &ShardStats,
    keyspace: Option<(u64, u64)>,
    ops_per_sec: f64,
) -> String {
    const ALL: &[&str] = &[
        "server",
        "clients",
        "memory",
        "persistence",
        "stats",
        "replication",
        "cpu",
        "cluster",
        "keyspace",
        "dinomo",
    ];
    let wanted: Vec<String> = sections
        .iter()
        .map(|a| String::from_utf8_lossy(a).to_ascii_lowercase())
        .collect();
    let all = wanted.is_empty()
        || wanted
            .iter()
            .any(|w| matches!(w.as_str(), "default" | "all" | "everything"));
    let show = |name: &str| all || wanted.iter().any(|w| w == name);
    let mut t = String::new();
    for name in ALL.iter().filter(|n| show(n)) {
        if !t.is_empty() {
            t.push_str("\r\n");
        }
        info_section(shared, view, &mut t, name, s, keyspace, ops_per_sec);
    }
    t
}

fn info_section(
    shared: &Shared,
    view: &View,
    t: &mut String,
    name: &str,
    s: &ShardStats,
    keyspace: Option<(u64, u64)>,
    ops_per_sec: f64,
) {
    use std::fmt::Write;
    let intro = &shared.intro;
    let title = match name {
        "dinomo" => "DINOMO".to_string(),
        n => {
            let mut c = n.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        }
    };
    let _ = write!(t, "# {title}\r\n");
    let mut kv = |k: &str, v: &dyn std::fmt::Display| {
        let _ = write!(t, "{k}:{v}\r\n");
    };
    let uptime = intro.started.elapsed();
    match name {
        "server" => {
            kv("redis_version", &REDIS_VERSION);
            kv("dinomo_version", &env!("CARGO_PKG_VERSION"));
            kv("redis_mode", &"cluster");
            kv("os", &std::env::consts::OS);
            kv("arch_bits", &(usize::BITS));
            kv("process_id", &std::process::id());
            kv("tcp_port", &split_addr(&shared.addr).1);
            kv("uptime_in_seconds", &uptime.as_secs());
            kv("uptime_in_days", &(uptime.as_secs() / 86_400));
            kv("executable", &"dinomo");
        }
        "clients" => {
            kv("connected_clients", &shared.clients.load(Ordering::Acquire));
            kv("maxclients", &intro.maxclients());
            kv("blocked_clients", &0);
        }
        "memory" => {
            let rss = rss_anon_bytes().unwrap_or(0);
            kv("used_memory", &rss);
            kv("used_memory_human", &human_bytes(rss));
            kv("used_memory_rss", &rss);
            kv("maxmemory", &intro.maxmemory);
            kv("maxmemory_human", &human_bytes(intro.maxmemory));
            kv("maxmemory_policy", &"noeviction");
            kv("cache_value_bytes", &s.cache.value_bytes);
            kv("cache_shortcut_bytes", &s.cache.shortcut_bytes);
            kv("cache_budget_bytes", &s.cache.budget_bytes);
            kv("cache_history_bytes", &s.cache.history_bytes);
        }
        "persistence" => {
            kv("loading", &0);
            kv("async_loading", &0);
            // Every acknowledged write is durable in the memory node when it is
            // acknowledged: there is never anything left to save.
            kv(
                "write_durability",
                &"acknowledged_writes_are_persistent_in_memory_node",
            );
            kv("rdb_changes_since_last_save", &0);
            kv("rdb_bgsave_in_progress", &0);
            kv("rdb_last_save_time", &intro.started_unix);
            kv("rdb_last_bgsave_status", &"ok");
            kv("aof_enabled", &1);
            kv("aof_rewrite_in_progress", &0);
            kv("aof_last_write_status", &"ok");
        }
        "stats" => {
            kv(
                "total_connections_received",
                &intro.connections.load(Ordering::Relaxed),
            );
            kv("total_commands_processed", &intro.commands());
            kv("instantaneous_ops_per_sec", &(ops_per_sec.round() as u64));
            kv("rejected_connections", &0);
            kv(
                "expired_keys",
                &s.expired
                    .saturating_sub(shared.expired_base.load(Ordering::Relaxed)),
            );
            kv("evicted_keys", &0);
            kv("keyspace_hits", &s.gets.saturating_sub(s.absent));
            kv("keyspace_misses", &s.absent);
        }
        "replication" => {
            kv("role", &"master");
            kv("connected_slaves", &0);
            kv("master_repl_offset", &0);
        }
        "cpu" => {
            let (user, sys) = cpu_seconds();
            kv("used_cpu_sys", &format!("{sys:.6}"));
            kv("used_cpu_user", &format!("{user:.6}"));
            kv("used_cpu_sys_children", &"0.000000");
            kv("used_cpu_user_children", &"0.000000");
        }
        "cluster" => kv("cluster_enabled", &1),
        "keyspace" => {
            // As in Redis, an empty database has no line.
            if let Some((keys, expires)) = keyspace.filter(|k| k.0 > 0) {
                kv("db0", &format!("keys={keys},expires={expires},avg_ttl=0"));
            }
        }
        _ => info_dinomo(shared, view, t, s),
    }
}

fn info_dinomo(shared: &Shared, view: &View, t: &mut String, s: &ShardStats) {
    let v = &view;
    let ops = (s.gets + s.puts + s.deletes).max(1) as f64;
    let gets = s.gets.max(1) as f64;
    let writes = (s.puts + s.deletes).max(1) as f64;
    let mut kv = |k: &str, v: String| {
        t.push_str(k);
        t.push(':');
        t.push_str(&v);
        t.push_str("\r\n");
    };
    kv("kn_id", shared.kn_id.to_string());
    kv("map_epoch", v.map.epoch().to_string());
    kv("map_settled", u8::from(v.msg.settled).to_string());
    kv("slots_owned", v.map.slots_of(shared.kn_id).to_string());
    kv("shards", shared.shards.len().to_string());
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
    kv("cache_history_bytes", s.cache.history_bytes.to_string());
    kv("cache_arena_compactions", s.cache.compactions.to_string());
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
pub(super) fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Stripes of the command counter (connections of one shard thread share one).
const COUNTER_STRIPES: usize = 8;

/// A counter on its own cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Padded(AtomicU64);

/// What `INFO`, `CLIENT LIST` and `CONFIG` need beyond the shards' counters: the command
/// and connection counters, the registry of open connections, and the parameters
/// `CONFIG SET` may change while serving.
#[derive(Debug)]
pub(super) struct Introspection {
    pub(super) started: Instant,
    /// The Unix time (seconds) this node started.
    pub(super) started_unix: u64,
    /// `maxclients` now (`CONFIG SET maxclients`), at most [`Introspection::maxclients_cap`].
    maxclients: AtomicUsize,
    /// `maxclients` as fitted to the open-file limit at start.
    maxclients_cap: usize,
    /// `timeout` now, in seconds (zero: never).
    timeout_secs: AtomicU64,
    /// The cache budget (`maxmemory`).
    maxmemory: u64,
    /// Commands processed, striped by shard thread; added once per read of a connection.
    commands: [Padded; COUNTER_STRIPES],
    /// Connections accepted and served (`total_connections_received`).
    connections: AtomicU64,
    /// Every open client connection by id; locked at connect, disconnect and
    /// `CLIENT LIST` only.
    clients: Mutex<HashMap<u64, Arc<ClientCell>>>,
    /// Recent `(time, total commands)` samples for `instantaneous_ops_per_sec`.
    samples: Mutex<Vec<(Instant, u64)>>,
}

impl Introspection {
    pub(super) fn new(limits: &ClientLimits, maxmemory: u64) -> Self {
        Self {
            started: Instant::now(),
            started_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            maxclients: AtomicUsize::new(limits.maxclients),
            maxclients_cap: limits.maxclients,
            timeout_secs: AtomicU64::new(limits.timeout.as_secs()),
            maxmemory,
            commands: Default::default(),
            connections: AtomicU64::new(0),
            clients: Mutex::new(HashMap::new()),
            samples: Mutex::new(Vec::new()),
        }
    }

    /// `maxclients` now.
    pub(super) fn maxclients(&self) -> usize {
        self.maxclients.load(Ordering::Relaxed)
    }

    /// `timeout` now (zero: never).
    pub(super) fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs.load(Ordering::Relaxed))
    }

    /// Commands processed since start (or `CONFIG RESETSTAT`).
    pub(super) fn commands(&self) -> u64 {
        self.commands
            .iter()
            .map(|c| c.0.load(Ordering::Relaxed))
            .sum()
    }

    fn reset_stats(&self) {
        for c in &self.commands {
            c.0.store(0, Ordering::Relaxed);
        }
        self.connections.store(0, Ordering::Relaxed);
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

/// What `CLIENT LIST` shows of a connection that changes only at `HELLO`, `CLIENT
/// SETNAME` and `CLIENT SETINFO`.
#[derive(Clone, Debug, Default)]
pub(super) struct ClientMeta {
    name: Option<Vec<u8>>,
    lib: (Option<Vec<u8>>, Option<Vec<u8>>),
    resp: u8,
    user: String,
}

/// A connection in the registry.
#[derive(Debug)]
pub(super) struct ClientCell {
    id: u64,
    addr: SocketAddr,
    laddr: String,
    since: Instant,
    /// Milliseconds since `since` at the connection's last read of commands.
    active_ms: AtomicU64,
    meta: Mutex<ClientMeta>,
}

/// A connection's registration: in the registry from [`ClientReg::new`] until dropped
/// (the connection ends).
pub(super) struct ClientReg {
    shared: Arc<Shared>,
    cell: Arc<ClientCell>,
    stripe: usize,
}

impl ClientReg {
    /// Registers connection `id` from `peer`, served on shard thread `stripe`, logged in
    /// as `user` (if any).
    pub(super) fn new(
        shared: &Arc<Shared>,
        id: u64,
        peer: SocketAddr,
        stripe: usize,
        user: Option<usize>,
    ) -> Self {
        let cell = Arc::new(ClientCell {
            id,
            addr: peer,
            laddr: shared.addr.clone(),
            since: Instant::now(),
            active_ms: AtomicU64::new(0),
            meta: Mutex::new(ClientMeta {
                resp: 2,
                user: user
                    .map(|u| shared.acl.user(u).name().to_string())
                    .unwrap_or_default(),
                ..ClientMeta::default()
            }),
        });
        shared.intro.connections.fetch_add(1, Ordering::Relaxed);
        shared
            .intro
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, Arc::clone(&cell));
        Self {
            shared: Arc::clone(shared),
            cell,
            stripe: stripe % COUNTER_STRIPES,
        }
    }

    /// After one read of a connection: `commands` more were processed, and it was active
    /// at `at`.
    pub(super) fn read(&self, commands: u64, at: Instant) {
        if commands > 0 {
            self.shared.intro.commands[self.stripe]
                .0
                .fetch_add(commands, Ordering::Relaxed);
        }
        let ms = at.saturating_duration_since(self.cell.since).as_millis() as u64;
        self.cell.active_ms.store(ms, Ordering::Relaxed);
    }
}

impl Drop for ClientReg {
    fn drop(&mut self) {
        self.shared
            .intro
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.cell.id);
    }
}

/// One connection in Redis's `CLIENT LIST` line format. What this node does not track
/// per connection (buffers, memory, file descriptor) is given as Redis gives it for an
/// idle connection with nothing buffered (`fd=-1`: the descriptor is not kept); `cmd` is
/// known for the asking connection only (`NULL` for others).
fn client_line(c: &ClientCell, m: &ClientMeta, cmd: &str) -> String {
    let text = |b: &Option<Vec<u8>>| {
        b.as_deref()
            .map(String::from_utf8_lossy)
            .unwrap_or_default()
            .into_owned()
    };
    let age = c.since.elapsed();
    let idle = age
        .as_millis()
        .saturating_sub(u128::from(c.active_ms.load(Ordering::Relaxed)))
        / 1000;
    format!(
        "id={} addr={} laddr={} fd=-1 name={} age={} idle={idle} flags=N db=0 sub=0 psub=0 \
         ssub=0 multi=-1 qbuf=0 qbuf-free=0 argv-mem=0 multi-mem=0 rbs=0 rbp=0 obl=0 oll=0 \
         omem=0 tot-mem=0 events=r cmd={cmd} user={} redir=-1 resp={} lib-name={} lib-ver={}",
        c.id,
        c.addr,
        c.laddr,
        text(&m.name),
        age.as_secs(),
        m.user,
        m.resp,
        text(&m.lib.0),
        text(&m.lib.1),
    )
}

/// The process's anonymous resident memory (`RssAnon` of /proc/self/status), in bytes.
fn rss_anon_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_rss_anon(&status)
}

fn parse_rss_anon(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    let kb: u64 = line
        .trim_start_matches("RssAnon:")
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Bytes as Redis's `*_human` fields write them (`1.50M`).
fn human_bytes(b: u64) -> String {
    let units = ["B", "K", "M", "G", "T", "P"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b}B")
    } else {
        format!("{v:.2}{}", units[u])
    }
}

/// The process's user and system CPU time, in seconds.
fn cpu_seconds() -> (f64, f64) {
    // SAFETY: an all-zero rusage is a valid value of the plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes only the struct it is given, which outlives the call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return (0.0, 0.0);
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(ru.ru_utime), secs(ru.ru_stime))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::LeaseGate;
    use dinomo_shared::manager_proto::{MapMsg, MgrAuth, Role};
    use std::sync::atomic::AtomicBool;
    use std::sync::RwLock;

    fn shared() -> Arc<Shared> {
        let client = ClientLimits::default();
        Arc::new(Shared {
            kn_id: 3,
            addr: "127.0.0.1:7001".into(),
            shards: Vec::new(),
            view: RwLock::new(Arc::new(View::new(MapMsg::empty()))),
            version: AtomicU64::new(0),
            lease: Arc::new(LeaseGate::new(Duration::from_millis(100))),
            max_value: 1 << 20,
            limits: dinomo_shared::resp::Limits::default(),
            client,
            acl: Arc::new(super::super::Acl::default()),
            protected_mode: true,
            tls: None,
            clients: AtomicUsize::new(2),
            fenced: AtomicBool::new(false),
            drain: AtomicBool::new(false),
            latency: super::super::latency::LatencyHist::default(),
            conns: AtomicU64::new(0),
            placed: AtomicU64::new(0),
            released: AtomicU64::new(0),
            lease_epoch: 1,
            lease_len: Duration::from_secs(1),
            mgr_auth: MgrAuth {
                secret: None,
                role: Role::Kn,
                id: "test".into(),
            },
            intro: Introspection::new(&client, 64 << 20),
            expired_base: AtomicU64::new(3),
        })
    }

    fn sections(text: &str) -> Vec<&str> {
        text.lines().filter_map(|l| l.strip_prefix("# ")).collect()
    }

    #[test]
    fn info_has_every_section_and_redis_selection_rules() {
        let sh = shared();
        let view = sh.view();
        let stats = ShardStats {
            expired: 10,
            gets: 10,
            absent: 4,
            ..ShardStats::default()
        };
        let all = [
            "Server",
            "Clients",
            "Memory",
            "Persistence",
            "Stats",
            "Replication",
            "Cpu",
            "Cluster",
            "Keyspace",
            "DINOMO",
        ];
        let a = |l: &[&str]| -> Vec<Vec<u8>> { l.iter().map(|s| s.as_bytes().to_vec()).collect() };
        for sel in [&[][..], &["default"], &["all"], &["EVERYTHING"]] {
            let t = info(&sh, &view, &a(sel), &stats, Some((5, 2)), 12.4);
            assert_eq!(sections(&t), all, "{sel:?}");
            // Every line is "# Section", "key:value" or a blank line between sections.
            for l in t.split("\r\n") {
                assert!(
                    l.is_empty() || l.starts_with("# ") || l.contains(':'),
                    "{l:?}"
                );
            }
            assert!(t.contains("\r\ndb0:keys=5,expires=2,avg_ttl=0\r\n"));
            assert!(t.contains("\r\nkeyspace_hits:6\r\nkeyspace_misses:4\r\n"));
            assert!(t.contains("\r\ninstantaneous_ops_per_sec:12\r\n"));
            assert!(t.contains("\r\nexpired_keys:7\r\n"));
            assert!(t.contains("\r\nrole:master\r\nconnected_slaves:0\r\n"));
            assert!(t.contains("\r\nmaxmemory:67108864\r\n"));
            assert!(t.contains("\r\nconnected_clients:2\r\n"));
            assert!(t.contains("\r\nkn_id:3\r\n"));
        }
        let t = info(&sh, &view, &a(&["memory", "Keyspace"]), &stats, None, 0.0);
        assert_eq!(sections(&t), ["Memory", "Keyspace"]);
        assert!(!t.contains("db0"), "no key count, no db0 line");
        assert!(t.starts_with("# Memory\r\nused_memory:"));
        let t = info(&sh, &view, &a(&["nosuch"]), &stats, None, 0.0);
        assert!(t.is_empty());
    }

    #[test]
    fn client_list_lines_follow_redis_format() {
        let sh = shared();
        let peer: SocketAddr = "10.0.0.9:5555".parse().expect("addr");
        let reg = ClientReg::new(&sh, 42, peer, 11, sh.acl.initial_user());
        assert_eq!(sh.intro.connections.load(Ordering::Relaxed), 1);
        reg.read(5, Instant::now());
        reg.read(0, Instant::now());
        assert_eq!(sh.intro.commands(), 5);
        let meta = ClientMeta {
            name: Some(b"worker".to_vec()),
            lib: (Some(b"redis-py".to_vec()), Some(b"5.3.1".to_vec())),
            resp: 3,
            user: "default".into(),
        };
        let line = client_line(&reg.cell, &meta, "client|list");
        let fields: Vec<(&str, &str)> = line
            .split(' ')
            .map(|f| f.split_once('=').expect("key=value"))
            .collect();
        let keys: Vec<&str> = fields.iter().map(|f| f.0).collect();
        assert_eq!(
            keys,
            [
                "id",
                "addr",
                "laddr",
                "fd",
                "name",
                "age",
                "idle",
                "flags",
                "db",
                "sub",
                "psub",
                "ssub",
                "multi",
                "qbuf",
                "qbuf-free",
                "argv-mem",
                "multi-mem",
                "rbs",
                "rbp",
                "obl",
                "oll",
                "omem",
                "tot-mem",
                "events",
                "cmd",
                "user",
                "redir",
                "resp",
                "lib-name",
                "lib-ver"
            ]
        );
        let get = |k: &str| fields.iter().find(|f| f.0 == k).map(|f| f.1);
        assert_eq!(get("id"), Some("42"));
        assert_eq!(get("addr"), Some("10.0.0.9:5555"));
        assert_eq!(get("laddr"), Some("127.0.0.1:7001"));
        assert_eq!(get("name"), Some("worker"));
        assert_eq!(get("age"), Some("0"));
        assert_eq!(get("idle"), Some("0"));
        assert_eq!(get("resp"), Some("3"));
        assert_eq!(get("lib-name"), Some("redis-py"));
        assert_eq!(get("lib-ver"), Some("5.3.1"));
        assert_eq!(get("user"), Some("default"));
        // The registry holds the connection until its registration is dropped.
        assert!(sh.intro.clients.lock().expect("lock").contains_key(&42));
        sh.intro.reset_stats();
        assert_eq!(sh.intro.commands(), 0);
        drop(reg);
        assert!(sh.intro.clients.lock().expect("lock").is_empty());
    }

    #[test]
    fn memory_figures_are_read_and_written_as_redis_does() {
        let status = "Name:\tkn\nVmRSS:\t  9000 kB\nRssAnon:\t    2048 kB\nRssFile:\t 1 kB\n";
        assert_eq!(parse_rss_anon(status), Some(2 << 20));
        assert_eq!(parse_rss_anon("Name:\tkn\n"), None);
        assert!(rss_anon_bytes().is_some_and(|b| b > 0));
        assert_eq!(human_bytes(900), "900B");
        assert_eq!(human_bytes(1536), "1.50K");
        assert_eq!(human_bytes(64 << 20), "64.00M");
        let (user, sys) = cpu_seconds();
        assert!(user >= 0.0 && sys >= 0.0);
    }
}
