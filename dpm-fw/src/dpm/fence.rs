//! Fencing a KN whose lease expired, and fence points of closed logs.

use core::sync::atomic::Ordering;

use dinomo_hw::Persist;
use dinomo_shared::control::{LogSlot, LOG_ACTIVE};
use dinomo_shared::msg::Response;
use dinomo_shared::ErrorCode;

use super::{Dpm, LogState, Scratch, Stall};
use crate::index::IndexError;

/// The most recent fenced KNs, in a ring (a reader that falls more than its length behind
/// is told so and revokes nothing it missed; fencing is rare).
#[derive(Default)]
pub(super) struct FenceLog {
    count: u64,
    ring: [u32; FENCE_RING],
}

const FENCE_RING: usize = 32;

impl<P: Persist> Dpm<P> {
    /// Closes every active log of `kn_id` and merges each to its committed tail (what the
    /// KN acknowledged is durable in its logs, so after this it is in the index), then
    /// persists that tail as the log's fence point before replying. A write the KN lands
    /// later in a closed log is never merged, also after a restart, and its next block
    /// request is refused. Logs of the KN closed without a fence point (a close cut short
    /// by a crash) are fenced too. The blocks of every fenced log are quarantined.
    pub(super) fn fence_kn(
        &self,
        kn_id: u32,
        scratch: &mut Scratch,
    ) -> Result<Response, ErrorCode> {
        let mut logs = 0;
        let mut entries = 0;
        for log_id in 0..self.geo.max_logs {
            let target = match &*self.logs[log_id as usize].lock() {
                // Also a closed log not yet merged to its fence point because the index
                // had no room (an earlier fence whose merge failed): the fence succeeds only
                // once everything the KN acknowledged is in the index. A damaged log is
                // not retried (its damage is reported once and by `inspect`).
                Some(st)
                    if st.kn_id == kn_id
                        && !st.compaction
                        && (st.status == LOG_ACTIVE
                            || st.fence.is_none()
                            || (st.stall == Some(Stall::Index(IndexError::Full))
                                && st.fence.is_some_and(|f| st.cursor.next_seq <= f))) =>
                {
                    Some((st.generation, st.cursor.next_seq))
                }
                _ => None,
            };
            let Some((generation, next_seq)) = target else {
                continue;
            };
            match self.close_log(log_id, generation, true, scratch) {
                Ok(Response::Closed { merged_seq }) => {
                    logs += 1;
                    entries += (merged_seq + 1).saturating_sub(next_seq);
                }
                // Closed or reused by someone else meanwhile: not this KN's any more.
                Err(ErrorCode::NoSuchLog) => {}
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        {
            let mut f = self.fences.lock();
            let at = (f.count % FENCE_RING as u64) as usize;
            f.ring[at] = kn_id;
            f.count += 1;
            self.fence_count.store(f.count, Ordering::Release);
        }
        Ok(Response::Fenced { logs, entries })
    }

    /// KNs fenced since `*cursor` (a count this call advances), oldest first, passed to
    /// `revoke`. Returns how many fences were missed because the reader fell too far behind.
    pub fn fenced_since(&self, cursor: &mut u64, mut revoke: impl FnMut(u32)) -> u64 {
        if self.fence_count.load(Ordering::Acquire) == *cursor {
            return 0;
        }
        let f = self.fences.lock();
        let oldest = f.count.saturating_sub(FENCE_RING as u64);
        let missed = oldest.saturating_sub(*cursor);
        for n in (*cursor).max(oldest)..f.count {
            revoke(f.ring[(n % FENCE_RING as u64) as usize]);
        }
        *cursor = f.count;
        missed
    }

    /// Persists the fence point of a log that has none: its tail as merged, or for a
    /// stalled log as far as its entries verify (what was committed when it was closed).
    /// A log whose slot was already released has nothing left to fence.
    pub(super) fn fence_locked(
        &self,
        log_id: u32,
        guard: &mut Option<LogState>,
        scratch: &mut Scratch,
    ) {
        let Some(st) = guard.as_mut() else { return };
        if st.fence.is_some() {
            return;
        }
        let seq = match st.stall {
            None => st.cursor.next_seq - 1,
            Some(_) => self.tail_seq(log_id, st, scratch),
        };
        let off = self.geo.log_slot_off(log_id) + LogSlot::FENCE_OFFSET;
        self.pm.store_u64(off, LogSlot::encode_fence(seq));
        self.pm.persist(off, 8);
        st.fence = Some(seq);
        self.publish_mark(log_id, guard);
    }
}

#[cfg(all(test, feature = "std"))]
mod fence_tests {
    use dinomo_shared::msg::{Request, Response};
    use dinomo_shared::ErrorCode;

    use super::Scratch;
    use crate::testkit::{fresh, LogWriter};

    #[test]
    fn fence_merges_and_closes_only_the_fenced_kns_logs() {
        let (_r, dpm) = fresh(9);
        let mut s = Scratch::default();
        // No merge workers run: everything written stays unmerged until the fence.
        let mut a0 = LogWriter::open(&dpm, 3, 0).expect("open");
        let mut a1 = LogWriter::open(&dpm, 3, 1).expect("open");
        let mut b = LogWriter::open(&dpm, 4, 0).expect("open");
        for i in 0..20u32 {
            a0.put(format!("a0-{i}").as_bytes(), b"v0");
            a1.put(format!("a1-{i}").as_bytes(), b"v1");
            b.put(format!("b-{i}").as_bytes(), b"vb");
        }
        for w in [&mut a0, &mut a1, &mut b] {
            w.flush(&dpm).expect("flush");
        }
        assert_eq!(dpm.get(b"a0-3"), None);
        let r = dpm.execute(Request::FenceKn { kn_id: 3 }, &mut s);
        assert_eq!(
            r,
            Ok(Response::Fenced {
                logs: 2,
                entries: 40
            })
        );
        assert_eq!(dpm.get(b"a0-19").as_deref(), Some(&b"v0"[..]));
        assert_eq!(dpm.get(b"a1-0").as_deref(), Some(&b"v1"[..]));
        // The other KN's log is untouched (still active, not merged by the fence).
        assert_eq!(dpm.get(b"b-0"), None);
        let active: Vec<u32> = dpm
            .stats()
            .logs
            .iter()
            .filter(|l| l.state == dinomo_shared::control::LOG_ACTIVE)
            .map(|l| l.kn_id)
            .collect();
        assert_eq!(active, vec![4]);
        // The fenced writer cannot extend its log any more; fencing again is a no-op.
        assert_eq!(a0.next_block(&dpm), Err(ErrorCode::NoSuchLog));
        assert_eq!(
            dpm.execute(Request::FenceKn { kn_id: 3 }, &mut s),
            Ok(Response::Fenced {
                logs: 0,
                entries: 0
            })
        );
    }
}
