//! A linearizability checker for histories of a key-value store whose keys are independent
//! registers (put / get / delete), after Wing & Gong's search with Lowe's memoization.
//!
//! Linearizability is compositional, so each key's history is checked on its own. For one
//! key the checker searches for an order of the operations that respects real time (an
//! operation that returned before another was invoked comes first) and in which every get
//! returns the value of the last put before it (`None` after a delete or at the start). It
//! explores "which pending operation takes effect next" depth first and remembers every
//! (set of operations already ordered, register value) it has seen, so no configuration is
//! explored twice.
//!
//! A write that failed with an error may or may not have taken effect (the store might
//! have made it durable before the error). It is recorded with an unknown response: the
//! search may place it anywhere after its invocation, or leave it out. A get that failed
//! says nothing and is not recorded.
//!
//! Use: one [`Recorder`] per thread (all made from one [`Clock`]), a timestamp from
//! [`Recorder::now`] before each call, the outcome recorded after it; at the end merge the
//! recorders into a [`History`] and [`History::check`] it.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::Instant;

/// A monotonic clock shared by every recorder of one history.
#[derive(Clone, Copy, Debug)]
pub struct Clock(Instant);

impl Clock {
    pub fn new() -> Self {
        Self(Instant::now())
    }

    /// Nanoseconds since the clock was made.
    pub fn now(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// What an operation did, with what a get returned.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Put(Vec<u8>),
    Delete,
    /// A get and the value it returned (`None`: absent).
    Get(Option<Vec<u8>>),
}

/// One operation of a history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation {
    pub key: Vec<u8>,
    pub op: Op,
    /// Clock time just before the call.
    pub invoke: u64,
    /// Clock time just after the reply; `None`: the outcome is unknown (a write that
    /// failed), so it may have taken effect at any time after `invoke`, or never.
    pub response: Option<u64>,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
        match &self.op {
            Op::Put(v) => write!(f, "put({})", show(v))?,
            Op::Delete => write!(f, "delete")?,
            Op::Get(Some(v)) => write!(f, "get -> {}", show(v))?,
            Op::Get(None) => write!(f, "get -> absent")?,
        }
        match self.response {
            Some(r) => write!(f, " [{} .. {}]", self.invoke, r),
            None => write!(f, " [{} .. ?]", self.invoke),
        }
    }
}

/// Records one thread's operations.
#[derive(Debug)]
pub struct Recorder {
    clock: Clock,
    ops: Vec<Operation>,
}

impl Recorder {
    pub fn new(clock: Clock) -> Self {
        Self {
            clock,
            ops: Vec::new(),
        }
    }

    /// The time to pass as `invoke`, taken just before a call.
    pub fn now(&self) -> u64 {
        self.clock.now()
    }

    /// A put invoked at `invoke`; `ok`: acknowledged (otherwise its outcome is unknown).
    pub fn put(&mut self, key: &[u8], value: &[u8], invoke: u64, ok: bool) {
        self.write(key, Op::Put(value.to_vec()), invoke, ok);
    }

    /// A delete invoked at `invoke`; `ok` as for [`Recorder::put`].
    pub fn delete(&mut self, key: &[u8], invoke: u64, ok: bool) {
        self.write(key, Op::Delete, invoke, ok);
    }

    fn write(&mut self, key: &[u8], op: Op, invoke: u64, ok: bool) {
        let response = ok.then(|| self.clock.now());
        self.ops.push(Operation {
            key: key.to_vec(),
            op,
            invoke,
            response,
        });
    }

    /// A get invoked at `invoke` that returned `value` (a failed get is not recorded).
    pub fn get(&mut self, key: &[u8], invoke: u64, value: Option<Vec<u8>>) {
        let response = Some(self.clock.now());
        self.ops.push(Operation {
            key: key.to_vec(),
            op: Op::Get(value),
            invoke,
            response,
        });
    }

    /// Operations recorded so far.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Most operations on one key the checker accepts (its memo keys grow with it).
pub const MAX_OPS_PER_KEY: usize = 1 << 14;

/// Most configurations explored for one key before giving up.
pub const MAX_STATES_PER_KEY: usize = 4_000_000;

/// Why a history failed the check.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// No order explains what the key's operations returned.
    #[error("history of key {key:?} is not linearizable ({} operations; first: {})",
        .ops.len(), .ops.first().map(ToString::to_string).unwrap_or_default())]
    NotLinearizable { key: String, ops: Vec<Operation> },
    /// The key's history is beyond the checker's bounds.
    #[error("history of key {key:?} is too large to check: {what}")]
    TooLarge { key: String, what: String },
}

/// What a successful check covered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub keys: usize,
    pub ops: usize,
    /// Writes with an unknown outcome.
    pub maybe_ops: usize,
    /// Configurations the search explored (all keys).
    pub states: usize,
}

/// A history of operations on many keys.
#[derive(Clone, Debug, Default)]
pub struct History {
    ops: Vec<Operation>,
}

impl History {
    pub fn new() -> Self {
        Self::default()
    }

    /// The operations of every recorder.
    pub fn from_recorders(recorders: impl IntoIterator<Item = Recorder>) -> Self {
        let mut h = Self::new();
        for r in recorders {
            h.ops.extend(r.ops);
        }
        h
    }

    pub fn push(&mut self, op: Operation) {
        self.ops.push(op);
    }

    pub fn ops(&self) -> &[Operation] {
        &self.ops
    }

    /// Checks every key, each starting absent.
    pub fn check(&self) -> Result<CheckReport, CheckError> {
        let mut by_key: HashMap<&[u8], Vec<&Operation>> = HashMap::new();
        for o in &self.ops {
            by_key.entry(&o.key).or_default().push(o);
        }
        let mut report = CheckReport {
            keys: by_key.len(),
            ops: self.ops.len(),
            maybe_ops: self.ops.iter().filter(|o| o.response.is_none()).count(),
            states: 0,
        };
        let mut keys: Vec<&[u8]> = by_key.keys().copied().collect();
        keys.sort_unstable();
        for k in keys {
            report.states += check_key(k, &by_key[k])?;
        }
        Ok(report)
    }
}

/// One key's operation, with values as small ids (0: absent).
#[derive(Clone, Copy, Debug)]
struct KeyOp {
    invoke: u64,
    /// `u64::MAX`: unknown outcome.
    response: u64,
    kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Sets the register to the value id (0 for a delete).
    Write(u32),
    /// Returned the value id.
    Read(u32),
}

/// Checks one key's operations; returns the configurations explored.
fn check_key(key: &[u8], ops: &[&Operation]) -> Result<usize, CheckError> {
    let name = || String::from_utf8_lossy(key).into_owned();
    if ops.len() > MAX_OPS_PER_KEY {
        return Err(CheckError::TooLarge {
            key: name(),
            what: format!("{} operations (at most {MAX_OPS_PER_KEY})", ops.len()),
        });
    }
    let fail = || {
        let mut all: Vec<Operation> = ops.iter().map(|&o| o.clone()).collect();
        all.sort_by_key(|o| o.invoke);
        CheckError::NotLinearizable {
            key: name(),
            ops: all,
        }
    };
    let mut ids: HashMap<&[u8], u32> = HashMap::new();
    let mut kops: Vec<KeyOp> = ops
        .iter()
        .map(|o| KeyOp {
            invoke: o.invoke,
            response: o.response.unwrap_or(u64::MAX),
            kind: match &o.op {
                Op::Put(v) => Kind::Write(value_id(&mut ids, Some(v))),
                Op::Delete => Kind::Write(0),
                Op::Get(v) => Kind::Read(value_id(&mut ids, v.as_deref())),
            },
        })
        .collect();
    kops.sort_by_key(|o| (o.invoke, o.response));
    // A get of a value no write produced can never be explained.
    let written: HashSet<u32> = kops
        .iter()
        .filter_map(|o| match o.kind {
            Kind::Write(v) => Some(v),
            Kind::Read(_) => None,
        })
        .collect();
    if kops
        .iter()
        .any(|o| matches!(o.kind, Kind::Read(v) if v != 0 && !written.contains(&v)))
    {
        return Err(fail());
    }
    search(&kops).map_err(|e| match e {
        SearchEnd::Exhausted => fail(),
        SearchEnd::TooManyStates => CheckError::TooLarge {
            key: name(),
            what: format!("more than {MAX_STATES_PER_KEY} configurations"),
        },
    })
}

/// A small id per distinct value (0: absent), so configurations are cheap to remember.
fn value_id<'a>(ids: &mut HashMap<&'a [u8], u32>, v: Option<&'a [u8]>) -> u32 {
    match v {
        None => 0,
        Some(v) => {
            let next = ids.len() as u32 + 1;
            *ids.entry(v).or_insert(next)
        }
    }
}

enum SearchEnd {
    Exhausted,
    TooManyStates,
}

/// A depth-first search frame: the configuration and the candidates still to try from it.
struct Frame {
    done: Vec<u64>,
    value: u32,
    /// Completed operations placed so far.
    placed: usize,
    candidates: Vec<usize>,
    next: usize,
}

/// Searches for a linearization of `ops` (sorted by invoke); returns the configurations
/// explored.
fn search(ops: &[KeyOp]) -> Result<usize, SearchEnd> {
    let n = ops.len();
    let words = n.div_ceil(64);
    let required = ops.iter().filter(|o| o.response != u64::MAX).count();
    let is_done = |d: &[u64], i: usize| d[i / 64] & (1 << (i % 64)) != 0;
    // Operations that may take effect next: not yet placed, and invoked before every
    // unplaced completed operation returned. Completed ones are tried first, writes with an
    // unknown outcome last: most of those never took effect, and trying to leave them out
    // first keeps the search linear in the history when there are many (a crash fails
    // every write in flight) instead of exploring which subset of them happened.
    let candidates = |d: &[u64]| -> Vec<usize> {
        let first = (0..n).find(|&i| !is_done(d, i)).unwrap_or(n);
        let min_resp = (first..n)
            .filter(|&i| !is_done(d, i))
            .map(|i| ops[i].response)
            .min()
            .unwrap_or(u64::MAX);
        let mut c: Vec<usize> = (first..n)
            .take_while(|&i| ops[i].invoke <= min_resp)
            .filter(|&i| !is_done(d, i))
            .collect();
        c.sort_by_key(|&i| ops[i].response == u64::MAX);
        c
    };
    let mut seen: HashSet<(Vec<u64>, u32)> = HashSet::new();
    let start = vec![0u64; words];
    if required == 0 {
        return Ok(1);
    }
    seen.insert((start.clone(), 0));
    let mut stack = vec![Frame {
        candidates: candidates(&start),
        done: start,
        value: 0,
        placed: 0,
        next: 0,
    }];
    while let Some(top) = stack.last_mut() {
        let Some(&i) = top.candidates.get(top.next) else {
            stack.pop();
            continue;
        };
        top.next += 1;
        let value = match ops[i].kind {
            Kind::Write(v) => v,
            Kind::Read(v) if v == top.value => v,
            Kind::Read(_) => continue,
        };
        let mut done = top.done.clone();
        done[i / 64] |= 1 << (i % 64);
        if !seen.insert((done.clone(), value)) {
            continue;
        }
        if seen.len() > MAX_STATES_PER_KEY {
            return Err(SearchEnd::TooManyStates);
        }
        let placed = top.placed + usize::from(ops[i].response != u64::MAX);
        if placed == required {
            return Ok(seen.len());
        }
        stack.push(Frame {
            candidates: candidates(&done),
            done,
            value,
            placed,
            next: 0,
        });
    }
    Err(SearchEnd::Exhausted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(v: &str, invoke: u64, response: u64) -> Operation {
        op(Op::Put(v.as_bytes().to_vec()), invoke, Some(response))
    }
    fn maybe_put(v: &str, invoke: u64) -> Operation {
        op(Op::Put(v.as_bytes().to_vec()), invoke, None)
    }
    fn del(invoke: u64, response: u64) -> Operation {
        op(Op::Delete, invoke, Some(response))
    }
    fn get(v: Option<&str>, invoke: u64, response: u64) -> Operation {
        op(
            Op::Get(v.map(|v| v.as_bytes().to_vec())),
            invoke,
            Some(response),
        )
    }
    fn op(op: Op, invoke: u64, response: Option<u64>) -> Operation {
        Operation {
            key: b"k".to_vec(),
            op,
            invoke,
            response,
        }
    }
    fn check(ops: Vec<Operation>) -> Result<CheckReport, CheckError> {
        let mut h = History::new();
        for o in ops {
            h.push(o);
        }
        h.check()
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let r = check(vec![
            get(None, 0, 1),
            put("a", 2, 3),
            get(Some("a"), 4, 5),
            del(6, 7),
            get(None, 8, 9),
        ]);
        assert!(r.is_ok(), "{r:?}");
    }

    #[test]
    fn stale_read_after_a_completed_write_is_rejected() {
        let r = check(vec![put("a", 0, 1), put("b", 2, 3), get(Some("a"), 4, 5)]);
        assert!(
            matches!(r, Err(CheckError::NotLinearizable { .. })),
            "{r:?}"
        );
        // Reading absent after a completed put is stale too.
        let r = check(vec![put("a", 0, 1), get(None, 2, 3)]);
        assert!(
            matches!(r, Err(CheckError::NotLinearizable { .. })),
            "{r:?}"
        );
    }

    #[test]
    fn concurrent_write_may_be_seen_or_not() {
        // The get overlaps put(b): either value is fine.
        for seen in ["a", "b"] {
            let r = check(vec![put("a", 0, 1), put("b", 2, 10), get(Some(seen), 3, 4)]);
            assert!(r.is_ok(), "{seen}: {r:?}");
        }
    }

    #[test]
    fn reads_may_not_go_back_in_time() {
        // Two sequential reads during a slow write: new then old is not linearizable.
        let r = check(vec![
            put("a", 0, 1),
            put("b", 2, 100),
            get(Some("b"), 3, 4),
            get(Some("a"), 5, 6),
        ]);
        assert!(
            matches!(r, Err(CheckError::NotLinearizable { .. })),
            "{r:?}"
        );
        let r = check(vec![
            put("a", 0, 1),
            put("b", 2, 100),
            get(Some("a"), 3, 4),
            get(Some("b"), 5, 6),
        ]);
        assert!(r.is_ok(), "{r:?}");
    }

    #[test]
    fn a_value_never_written_is_rejected() {
        let r = check(vec![put("a", 0, 1), get(Some("z"), 2, 3)]);
        assert!(
            matches!(r, Err(CheckError::NotLinearizable { .. })),
            "{r:?}"
        );
    }

    #[test]
    fn write_with_unknown_outcome_may_happen_late_or_never() {
        // Never happened.
        assert!(check(vec![
            put("a", 0, 1),
            maybe_put("b", 2),
            get(Some("a"), 5, 6)
        ])
        .is_ok());
        // Happened, long after its call.
        assert!(check(vec![
            put("a", 0, 1),
            maybe_put("b", 2),
            get(Some("a"), 5, 6),
            get(Some("b"), 7, 8),
        ])
        .is_ok());
        // But not before it was invoked.
        let r = check(vec![get(Some("b"), 0, 1), maybe_put("b", 2)]);
        assert!(
            matches!(r, Err(CheckError::NotLinearizable { .. })),
            "{r:?}"
        );
        // And once seen, a later read cannot go back to the older value.
        let r = check(vec![
            put("a", 0, 1),
            maybe_put("b", 2),
            get(Some("b"), 5, 6),
            get(Some("a"), 7, 8),
        ]);
        assert!(
            matches!(r, Err(CheckError::NotLinearizable { .. })),
            "{r:?}"
        );
    }

    #[test]
    fn keys_are_checked_independently() {
        let mut h = History::new();
        h.push(put("a", 0, 1));
        let mut other = get(Some("a"), 2, 3);
        other.key = b"other".to_vec();
        h.push(other);
        assert!(matches!(
            h.check(),
            Err(CheckError::NotLinearizable { key, .. }) if key == "other"
        ));
    }

    #[test]
    fn recorders_merge_into_one_history() {
        let clock = Clock::new();
        let mut a = Recorder::new(clock);
        let mut b = Recorder::new(clock);
        let t = a.now();
        a.put(b"x", b"1", t, true);
        let t = b.now();
        b.get(b"x", t, Some(b"1".to_vec()));
        let t = b.now();
        b.delete(b"x", t, false);
        let t = a.now();
        a.get(b"y", t, None);
        assert_eq!((a.len(), b.len()), (2, 2));
        let h = History::from_recorders([a, b]);
        let r = h.check().expect("linearizable");
        assert_eq!((r.keys, r.ops, r.maybe_ops), (2, 4, 1));
    }

    #[test]
    fn histories_beyond_the_bound_are_refused_not_misjudged() {
        let ops = (0..MAX_OPS_PER_KEY as u64 + 1)
            .map(|i| get(None, 2 * i, 2 * i + 1))
            .collect();
        assert!(matches!(check(ops), Err(CheckError::TooLarge { .. })));
    }

    #[test]
    fn many_writes_with_unknown_outcome_check_quickly() {
        // A crash window: every write fails with an unknown outcome, reads go on seeing
        // the last acknowledged value, and one unknown write shows up at the end.
        let mut ops = vec![put("a", 0, 1)];
        for i in 0..200u64 {
            let t = 10 + i * 10;
            ops.push(maybe_put(&format!("u{i}"), t));
            ops.push(get(Some("a"), t + 2, t + 4));
        }
        ops.push(get(Some("u150"), 5000, 5001));
        ops.push(get(Some("u150"), 5002, 5003));
        let r = check(ops).expect("linearizable");
        assert!(r.states < 100_000, "{r:?}");
    }

    #[test]
    fn many_concurrent_operations_check_quickly() {
        // 4 "threads" writing unique values with overlapping windows, reads seeing the
        // latest completed write: linearizable, and the memo keeps the search small.
        let mut ops = Vec::new();
        let mut last = None::<String>;
        for i in 0..2000u64 {
            let t = i * 10;
            if i % 3 == 0 {
                ops.push(get(last.as_deref(), t, t + 15));
            } else {
                let v = format!("v{i}");
                ops.push(put(&v, t, t + 5));
                last = Some(v);
            }
        }
        let r = check(ops).expect("linearizable");
        assert!(r.states < 100_000, "{r:?}");
    }
}
