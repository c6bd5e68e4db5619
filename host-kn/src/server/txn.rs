//! Data commands run whole on their keys' owner shard, and transactions (`MULTI`, `EXEC`,
//! `DISCARD`, `WATCH`, `UNWATCH`).
//!
//! A command's keys are all in one slot, so one shard owns them and runs the command as one
//! job on its thread (see `shard::exec`): no other client's write comes between its reads
//! and its writes, and its reply goes back once its writes are durable. A transaction is
//! the same with several commands: `EXEC` sends the queued commands, and the check of the
//! watched keys, to the slot's shard as one job. So everything in a transaction must be in
//! one slot (`CROSSSLOT` otherwise), watched keys included.

use dinomo_shared::resp::Out;
use dinomo_shared::slot::key_slot;

use super::cmd::{self, Keyspace, Stored};
use super::conn::{kv_error, Conn};
use crate::error::KvError;
use crate::shard::{ExecJob, KeyAccess, Msg, ReplyResult, ShardTx};

/// A connection's transaction state.
#[derive(Default)]
pub(super) struct TxState {
    /// The commands queued since `MULTI`, if one is open.
    queued: Option<Vec<Vec<Vec<u8>>>>,
    /// A command was refused while queueing: `EXEC` discards the transaction.
    aborted: bool,
    watched: Vec<Watched>,
}

/// A watched key: where it lives and its write number when it was watched.
struct Watched {
    key: Vec<u8>,
    tx: ShardTx,
    version: u64,
    map_epoch: u64,
}

impl TxState {
    pub(super) fn in_multi(&self) -> bool {
        self.queued.is_some()
    }

    /// Stops watching every key (the shards forget them; nobody waits for that).
    fn unwatch_all(&mut self) {
        for w in self.watched.drain(..) {
            let key = w.key;
            let (done, _) = tokio::sync::oneshot::channel();
            let job = ExecJob(Box::new(move |acc: &mut dyn KeyAccess| acc.unwatch(&key)));
            let _ = w.tx.send(Msg::Exec { job, done });
        }
    }
}

impl Drop for TxState {
    fn drop(&mut self) {
        self.unwatch_all();
    }
}

/// The commands a transaction may queue besides the data commands.
fn queueable(name: &str) -> bool {
    matches!(name, "PING" | "ECHO")
}

/// One shard's keys as a command sees them.
struct OnShard<'a> {
    acc: &'a mut dyn KeyAccess,
    now: u64,
    max_value: usize,
}

impl Keyspace for OnShard<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Stored>, KvError> {
        Ok(self
            .acc
            .read(key)?
            .map(|(value, expire_at)| Stored { value, expire_at }))
    }

    fn put(&mut self, key: &[u8], value: Vec<u8>, expire_at: Option<u64>) -> Result<(), KvError> {
        self.acc.write(key, Some(value), expire_at)
    }

    fn delete(&mut self, key: &[u8]) -> Result<(), KvError> {
        self.acc.write(key, None, None)
    }

    fn now_ms(&self) -> u64 {
        self.now
    }

    fn max_value(&self) -> usize {
        self.max_value
    }
}

/// Runs one queued command inside a job, its reply to `o`. A command that failed at the
/// shard answers its error in place (the transaction goes on, as in Redis).
fn run_one(name: &str, args: &[Vec<u8>], ks: &mut OnShard<'_>, o: &mut Out<'_>) {
    match name {
        "PING" if args.len() == 1 => o.simple("PONG"),
        "PING" | "ECHO" => o.bulk(&args[args.len() - 1]),
        _ => {
            let at = o.buf.len();
            if let Err(e) = cmd::run(name, args, ks, o) {
                o.buf.truncate(at);
                o.error(&kv_error(&e));
            }
        }
    }
}

/// What a job's writes came to, once durable: the first failure, if any.
fn writes_failed(results: &[Option<ReplyResult>]) -> Option<KvError> {
    results.iter().find_map(|r| match r {
        Some(Err(e)) => Some(e.clone()),
        None => Some(KvError::ShuttingDown),
        Some(Ok(_)) => None,
    })
}

impl Conn {
    /// Runs a data command on its keys' owner shard and writes its reply.
    pub(super) async fn data_command(&mut self, name: &str, args: Vec<Vec<u8>>, o: &mut Out<'_>) {
        let keys = cmd::keys(name, &args);
        if keys.is_empty() {
            // Malformed: answered without touching a shard.
            let mut none = NoKeys;
            if cmd::run(name, &args, &mut none, o).is_err() {
                o.error("ERR syntax error");
            }
            return;
        }
        let tx = match self.shard_for(&keys) {
            Ok(tx) => tx,
            Err(e) => return o.error(&e),
        };
        let name = name.to_owned();
        let (proto, max_value) = (self.proto, self.shared.max_value);
        self.run_job(&tx, o, move |acc, buf| {
            let mut ks = OnShard {
                acc,
                now: crate::clock::now_ms(),
                max_value,
            };
            let mut o = Out { buf, proto };
            run_one(&name, &args, &mut ks, &mut o);
        })
        .await;
    }

    /// Sends `job` to a shard, waits for its reply and for its writes to be durable, and
    /// writes the reply (or the error that kept the writes from being acknowledged).
    async fn run_job(
        &mut self,
        tx: &ShardTx,
        o: &mut Out<'_>,
        job: impl FnOnce(&mut dyn KeyAccess, &mut Vec<u8>) + Send + 'static,
    ) {
        let (out_tx, out_rx) = tokio::sync::oneshot::channel();
        let (done, durable) = tokio::sync::oneshot::channel();
        let job = ExecJob(Box::new(move |acc: &mut dyn KeyAccess| {
            let mut buf = Vec::new();
            job(acc, &mut buf);
            let _ = out_tx.send(buf);
        }));
        if tx.send(Msg::Exec { job, done }).is_err() {
            return o.error(&kv_error(&KvError::ShuttingDown));
        }
        let (Ok(reply), Ok(results)) = (out_rx.await, durable.await) else {
            return o.error(&kv_error(&KvError::ShuttingDown));
        };
        match writes_failed(&results) {
            Some(e) => o.error(&kv_error(&e)),
            None => o.buf.extend_from_slice(&reply),
        }
    }

    /// `MULTI`.
    pub(super) fn multi(&mut self, o: &mut Out<'_>) {
        if self.tx.in_multi() {
            return o.error("ERR MULTI calls can not be nested");
        }
        self.tx.queued = Some(Vec::new());
        self.tx.aborted = false;
        o.simple("OK");
    }

    /// Queues a command of an open transaction (checked now, run at `EXEC`).
    pub(super) fn queue(&mut self, name: &str, args: Vec<Vec<u8>>, o: &mut Out<'_>) {
        let refusal = if cmd::serves(name) {
            let keys = cmd::keys(name, &args);
            if keys.is_empty() {
                // Malformed: Redis refuses it now and discards the transaction.
                let at = o.buf.len();
                let mut none = NoKeys;
                let _ = cmd::run(name, &args, &mut none, o);
                let said = String::from_utf8_lossy(&o.buf[at..]).into_owned();
                o.buf.truncate(at);
                Some(
                    said.trim_start_matches('-')
                        .trim_end_matches("\r\n")
                        .to_owned(),
                )
            } else {
                self.shard_index(&keys).err()
            }
        } else if queueable(name) {
            let fits = match name {
                "PING" => args.len() <= 2,
                _ => args.len() == 2,
            };
            (!fits).then(|| {
                format!(
                    "ERR wrong number of arguments for '{}' command",
                    name.to_ascii_lowercase()
                )
            })
        } else if super::acl::command_id(name).is_none() {
            Some(super::conn::unknown_command(&args))
        } else {
            Some(format!(
                "ERR {} is not allowed inside MULTI on this node (a transaction runs data \
                 commands of one slot)",
                super::commands::clip(name)
            ))
        };
        match refusal {
            Some(e) => {
                self.tx.aborted = true;
                o.error(&e);
            }
            None => {
                if let Some(q) = &mut self.tx.queued {
                    q.push(args);
                }
                o.simple("QUEUED");
            }
        }
    }

    /// `DISCARD`.
    pub(super) fn discard(&mut self, o: &mut Out<'_>) {
        if self.tx.queued.take().is_none() {
            return o.error("ERR DISCARD without MULTI");
        }
        self.tx.aborted = false;
        self.tx.unwatch_all();
        o.simple("OK");
    }

    /// `WATCH key...`.
    pub(super) async fn watch(&mut self, args: &[Vec<u8>], o: &mut Out<'_>) {
        if self.tx.in_multi() {
            return o.error("ERR WATCH inside MULTI is not allowed");
        }
        for key in &args[1..] {
            if self.tx.watched.iter().any(|w| &w.key == key) {
                continue;
            }
            let shard = match self.shard_index(&[key]) {
                Ok(i) => i,
                Err(e) => return o.error(&e),
            };
            let Some(tx) = self.shared.shards.get(shard).cloned() else {
                return o.error(&kv_error(&KvError::ShuttingDown));
            };
            let (got, answer) = tokio::sync::oneshot::channel();
            let (done, _) = tokio::sync::oneshot::channel();
            let k = key.clone();
            let job = ExecJob(Box::new(move |acc: &mut dyn KeyAccess| {
                // A key whose time has come is expired first: that counts as a write.
                let _ = acc.read(&k);
                let _ = got.send((acc.watch(&k), acc.map_epoch()));
            }));
            if tx.send(Msg::Exec { job, done }).is_err() {
                return o.error(&kv_error(&KvError::ShuttingDown));
            }
            let Ok((version, map_epoch)) = answer.await else {
                return o.error(&kv_error(&KvError::ShuttingDown));
            };
            self.tx.watched.push(Watched {
                key: key.clone(),
                tx,
                version,
                map_epoch,
            });
        }
        o.simple("OK");
    }

    /// `UNWATCH`.
    pub(super) fn unwatch(&mut self, o: &mut Out<'_>) {
        self.tx.unwatch_all();
        o.simple("OK");
    }

    /// `EXEC`: runs the queued commands as one job on their slot's shard, unless a watched
    /// key was written since it was watched (then the reply is a null array).
    pub(super) async fn exec_multi(&mut self, o: &mut Out<'_>) {
        let Some(queued) = self.tx.queued.take() else {
            return o.error("ERR EXEC without MULTI");
        };
        if std::mem::take(&mut self.tx.aborted) {
            self.tx.unwatch_all();
            return o.error("EXECABORT Transaction discarded because of previous errors.");
        }
        let mut keys: Vec<&[u8]> = queued
            .iter()
            .flat_map(|args| cmd::keys(&super::commands::upper(&args[0]), args))
            .collect();
        keys.extend(self.tx.watched.iter().map(|w| w.key.as_slice()));
        if keys.is_empty() {
            // Nothing but PING and ECHO.
            o.array(queued.len());
            for args in &queued {
                match args.len() {
                    1 => o.simple("PONG"),
                    n => o.bulk(&args[n - 1]),
                }
            }
            return;
        }
        let first = key_slot(keys[0]);
        if keys.iter().any(|k| key_slot(k) != first) {
            self.tx.unwatch_all();
            return o.error(
                "CROSSSLOT Keys in request don't hash to the same slot (a transaction on this \
                 node, watched keys included, must stay in one slot)",
            );
        }
        let route = keys[0].to_vec();
        let tx = match self.shard_for(&[&route]) {
            Ok(tx) => tx,
            Err(e) => {
                self.tx.unwatch_all();
                return o.error(&e);
            }
        };
        let watched: Vec<(Vec<u8>, u64, u64)> = self
            .tx
            .watched
            .drain(..)
            .map(|w| (w.key, w.version, w.map_epoch))
            .collect();
        let (proto, max_value) = (self.proto, self.shared.max_value);
        self.run_job(&tx, o, move |acc, buf| {
            let mut o = Out { buf, proto };
            // Reading a watched key first expires it if its time has come (a write).
            let mut clean = true;
            for (key, version, epoch) in &watched {
                let _ = acc.read(key);
                clean &= acc.watched(key) == Some(*version) && acc.map_epoch() == *epoch;
            }
            for (key, _, _) in &watched {
                acc.unwatch(key);
            }
            if !clean {
                return o.null_array();
            }
            let mut ks = OnShard {
                acc,
                now: crate::clock::now_ms(),
                max_value,
            };
            o.array(queued.len());
            for args in &queued {
                let name = super::commands::upper(&args[0]);
                run_one(&name, args, &mut ks, &mut o);
            }
        })
        .await;
    }

    /// `WAIT numreplicas timeout`: 0 at once. There are no replicas to wait for, and a
    /// write is durable in the memory node before it is acknowledged.
    pub(super) fn wait(&self, args: &[Vec<u8>], o: &mut Out<'_>) {
        match (cmd::string2ll(&args[1]), cmd::string2ll(&args[2])) {
            (Some(_), Some(t)) if t >= 0 => o.int(0),
            (Some(_), Some(_)) => o.error("ERR timeout is negative"),
            _ => o.error("ERR value is not an integer or out of range"),
        }
    }

    /// Forgets the transaction and the watched keys (`RESET`).
    pub(super) fn reset_tx(&mut self) {
        self.tx.queued = None;
        self.tx.aborted = false;
        self.tx.unwatch_all();
    }
}

/// A keyspace for a command that must not touch keys (malformed, or keyless).
struct NoKeys;

impl Keyspace for NoKeys {
    fn get(&mut self, _: &[u8]) -> Result<Option<Stored>, KvError> {
        Err(KvError::Corrupt("a malformed command touched a key".into()))
    }
    fn put(&mut self, _: &[u8], _: Vec<u8>, _: Option<u64>) -> Result<(), KvError> {
        Err(KvError::Corrupt("a malformed command touched a key".into()))
    }
    fn delete(&mut self, _: &[u8]) -> Result<(), KvError> {
        Err(KvError::Corrupt("a malformed command touched a key".into()))
    }
    fn now_ms(&self) -> u64 {
        crate::clock::now_ms()
    }
    fn max_value(&self) -> usize {
        0
    }
}
