//! The durable cluster map as control messages carry it.
//!
//! A map is one owner (`u16` KN id, or [`NO_KN`]) per slot: 32 KiB, far more than a 64-byte
//! frame. The manager sends it as runs of slots with one owner ([`SlotRange`]s, packed six
//! to a frame) and then the CRC of the whole owner table, which the DPM checks against what
//! it staged before it commits the map. Both sides build ranges and CRCs with the functions
//! here, so they agree on them byte for byte.

use core::iter::{Fuse, Take};

use crate::control::NO_KN;
use crate::crc::CRC32C;
use crate::slot::SLOTS;

/// Slots `first..=last` owned by KN `kn` ([`NO_KN`]: by nobody).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlotRange {
    pub first: u16,
    pub last: u16,
    pub kn: u16,
}

/// Ranges one `MapRanges` frame carries.
pub const RANGES_PER_FRAME: usize = 6;

/// Bit 63 of a packed range: set in every packed range, so a zero word carries none.
const PRESENT: u64 = 1 << 63;
/// Bits of a packed range that no field uses; a word with any of them set is not a range.
const RESERVED: u64 = !(PRESENT | 0xFFFF_FFFF_FFFF);

impl SlotRange {
    /// The range as one word: bits 0-15 `first`, 16-31 `last`, 32-47 `kn`, bit 63 set.
    pub const fn pack(self) -> u64 {
        PRESENT | self.first as u64 | (self.last as u64) << 16 | (self.kn as u64) << 32
    }

    /// The range a packed word carries; `None` for zero (no range) and for a word that is
    /// not a packed range (bit 63 clear, or a bit of 48-62 set).
    pub const fn unpack(word: u64) -> Option<Self> {
        if word & PRESENT == 0 || word & RESERVED != 0 {
            return None;
        }
        Some(Self {
            first: word as u16,
            last: (word >> 16) as u16,
            kn: (word >> 32) as u16,
        })
    }

    /// Whether the range can go into a map of a region with `max_kns` KNs: `first <= last`,
    /// `last` a slot, and `kn` one of the region's KNs or [`NO_KN`].
    pub const fn fits(&self, max_kns: u32) -> bool {
        self.first <= self.last
            && self.last < SLOTS
            && (self.kn == NO_KN || (self.kn as u32) < max_kns)
    }
}

/// The ranges that describe an owner table (the owner of each slot, in slot order; owners
/// past [`SLOTS`] are ignored): one per run of equal owners, runs of [`NO_KN`] left out
/// (a staged map starts with no owner for any slot).
pub fn map_ranges<I: IntoIterator<Item = u16>>(owners: I) -> MapRanges<I::IntoIter> {
    MapRanges {
        owners: owners.into_iter().take(SLOTS as usize).fuse(),
        slot: 0,
        run: None,
    }
}

/// Iterator of [`map_ranges`].
#[derive(Clone, Debug)]
pub struct MapRanges<I> {
    owners: Fuse<Take<I>>,
    /// Slot of the next owner to read.
    slot: u16,
    /// The run being read: its first slot and owner.
    run: Option<(u16, u16)>,
}

impl<I: Iterator<Item = u16>> Iterator for MapRanges<I> {
    type Item = SlotRange;

    fn next(&mut self) -> Option<SlotRange> {
        loop {
            let Some(kn) = self.owners.next() else {
                // `slot` is past the last owner read, so at least 1 while a run is open.
                let (first, run_kn) = self.run.take()?;
                return (run_kn != NO_KN).then_some(SlotRange {
                    first,
                    last: self.slot - 1,
                    kn: run_kn,
                });
            };
            let slot = self.slot;
            // At most SLOTS owners are read, so this stays within u16.
            self.slot += 1;
            match self.run {
                Some((_, run_kn)) if run_kn == kn => {}
                Some((first, run_kn)) => {
                    self.run = Some((slot, kn));
                    if run_kn != NO_KN {
                        return Some(SlotRange {
                            first,
                            last: slot - 1,
                            kn: run_kn,
                        });
                    }
                }
                None => self.run = Some((slot, kn)),
            }
        }
    }
}

/// Packs ranges into the `ranges` argument of successive `MapRanges` frames, six to a
/// frame; the last frame's unused words are zero.
pub fn range_frames<I: IntoIterator<Item = SlotRange>>(ranges: I) -> RangeFrames<I::IntoIter> {
    RangeFrames {
        ranges: ranges.into_iter().fuse(),
    }
}

/// Iterator of [`range_frames`].
#[derive(Clone, Debug)]
pub struct RangeFrames<I> {
    ranges: Fuse<I>,
}

impl<I: Iterator<Item = SlotRange>> Iterator for RangeFrames<I> {
    type Item = [u64; RANGES_PER_FRAME];

    fn next(&mut self) -> Option<Self::Item> {
        let mut words = [0u64; RANGES_PER_FRAME];
        for (w, r) in words.iter_mut().zip(&mut self.ranges) {
            *w = r.pack();
        }
        (words[0] != 0).then_some(words)
    }
}

/// CRC-32C of an owner table as stored (each owner a little-endian `u16`, in slot order;
/// owners past [`SLOTS`] are ignored): what `MapCommit` carries and the DPM checks.
pub fn owners_crc<I: IntoIterator<Item = u16>>(owners: I) -> u32 {
    let mut digest = CRC32C.digest();
    let mut buf = [0u8; 256];
    let mut n = 0;
    for kn in owners.into_iter().take(SLOTS as usize) {
        buf[n..n + 2].copy_from_slice(&kn.to_le_bytes());
        n += 2;
        if n == buf.len() {
            digest.update(&buf);
            n = 0;
        }
    }
    digest.update(&buf[..n]);
    digest.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crc::crc32c;

    fn expand(ranges: impl IntoIterator<Item = SlotRange>) -> Vec<u16> {
        let mut owners = vec![NO_KN; SLOTS as usize];
        for r in ranges {
            owners[r.first as usize..=r.last as usize].fill(r.kn);
        }
        owners
    }

    #[test]
    fn packed_ranges_round_trip_and_garbage_is_no_range() {
        for r in [
            SlotRange {
                first: 0,
                last: 0,
                kn: 0,
            },
            SlotRange {
                first: 7,
                last: SLOTS - 1,
                kn: NO_KN,
            },
            SlotRange {
                first: u16::MAX,
                last: 3,
                kn: 12,
            },
        ] {
            assert_ne!(r.pack(), 0);
            assert_eq!(SlotRange::unpack(r.pack()), Some(r));
        }
        assert_eq!(SlotRange::unpack(0), None);
        assert_eq!(SlotRange::unpack(5), None, "present bit clear");
        assert_eq!(
            SlotRange::unpack(PRESENT | 1 << 50),
            None,
            "reserved bit set"
        );
    }

    #[test]
    fn fits_checks_order_slot_and_kn() {
        let r = |first, last, kn| SlotRange { first, last, kn };
        assert!(r(0, SLOTS - 1, 3).fits(4));
        assert!(r(5, 5, NO_KN).fits(4));
        assert!(!r(6, 5, 0).fits(4));
        assert!(!r(0, SLOTS, 0).fits(4));
        assert!(!r(0, 1, 4).fits(4));
    }

    #[test]
    fn ranges_cover_runs_and_leave_out_unowned_slots() {
        let mut owners = vec![NO_KN; SLOTS as usize];
        owners[0..10].fill(1);
        owners[10..20].fill(2);
        owners[30..SLOTS as usize].fill(1);
        let ranges: Vec<_> = map_ranges(owners.iter().copied()).collect();
        assert_eq!(
            ranges,
            [
                SlotRange {
                    first: 0,
                    last: 9,
                    kn: 1
                },
                SlotRange {
                    first: 10,
                    last: 19,
                    kn: 2
                },
                SlotRange {
                    first: 30,
                    last: SLOTS - 1,
                    kn: 1
                },
            ]
        );
        assert_eq!(expand(ranges), owners);
        assert_eq!(map_ranges([NO_KN; 5]).count(), 0);
        assert_eq!(map_ranges(core::iter::empty()).count(), 0);
        // Owners past the last slot are ignored.
        assert_eq!(map_ranges(core::iter::repeat(4)).count(), 1);
    }

    #[test]
    fn frames_carry_six_ranges_each() {
        let ranges: Vec<_> = (0..13u16)
            .map(|i| SlotRange {
                first: i,
                last: i,
                kn: i % 3,
            })
            .collect();
        let frames: Vec<_> = range_frames(ranges.iter().copied()).collect();
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[2][1..], [0; 5]);
        let back: Vec<_> = frames
            .iter()
            .flatten()
            .filter_map(|&w| SlotRange::unpack(w))
            .collect();
        assert_eq!(back, ranges);
        assert_eq!(range_frames(core::iter::empty()).count(), 0);
    }

    #[test]
    fn owners_crc_is_the_crc_of_the_stored_bytes() {
        let owners: Vec<u16> = (0..SLOTS).map(|s| (s / 100) % 7).collect();
        let bytes: Vec<u8> = owners.iter().flat_map(|o| o.to_le_bytes()).collect();
        assert_eq!(owners_crc(owners.iter().copied()), crc32c(&bytes));
        assert_eq!(owners_crc([1u16, 2, 3]), crc32c(&[1, 0, 2, 0, 3, 0]));
    }
}
