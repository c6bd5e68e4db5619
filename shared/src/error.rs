//! Error codes carried in control-message replies and shared by both sides.

use core::fmt;

/// A status code in a control-message reply. `Ok` is 0; every other value is an error.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Success.
    Ok = 0,
    /// The message kind is unknown to the receiver.
    UnknownMessage = 1,
    /// A field of the request is out of range.
    InvalidArgument = 2,
    /// No free log block is left in the region.
    RegionFull = 3,
    /// Every log slot of the log-mapping table is in use.
    NoFreeLog = 4,
    /// The log named by the request is not open.
    NoSuchLog = 5,
    /// The requester's lease epoch is older than the one recorded: it has been fenced.
    Fenced = 6,
    /// The index area has no room left to grow.
    IndexFull = 7,
    /// The DPM is shutting down.
    ShuttingDown = 8,
    /// The request did not complete in time.
    Timeout = 9,
    /// The region's contents failed validation.
    Corrupt = 10,
    /// Every indirect cell is in use.
    NoFreeCell = 11,
    /// The cell named by the request is not allocated.
    NoSuchCell = 12,
    /// The epoch is not newer than the stored one (a cluster map from an older manager).
    StaleEpoch = 13,
}

impl ErrorCode {
    /// Decodes a wire value; unknown values become `None`.
    pub const fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            0 => Self::Ok,
            1 => Self::UnknownMessage,
            2 => Self::InvalidArgument,
            3 => Self::RegionFull,
            4 => Self::NoFreeLog,
            5 => Self::NoSuchLog,
            6 => Self::Fenced,
            7 => Self::IndexFull,
            8 => Self::ShuttingDown,
            9 => Self::Timeout,
            10 => Self::Corrupt,
            11 => Self::NoFreeCell,
            12 => Self::NoSuchCell,
            13 => Self::StaleEpoch,
            _ => return None,
        })
    }

    /// A short, human-readable description.
    pub const fn describe(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::UnknownMessage => "unknown control message",
            Self::InvalidArgument => "invalid argument",
            Self::RegionFull => "no free log block left in the region",
            Self::NoFreeLog => "every log slot is in use",
            Self::NoSuchLog => "no such open log",
            Self::Fenced => "lease epoch is stale: the requester has been fenced",
            Self::IndexFull => "the index area is full",
            Self::ShuttingDown => "the DPM is shutting down",
            Self::Timeout => "timed out",
            Self::Corrupt => "region contents are corrupt",
            Self::NoFreeCell => "every indirect cell is in use",
            Self::NoSuchCell => "no such indirect cell",
            Self::StaleEpoch => "the epoch is not newer than the stored one",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for v in 0..=13u16 {
            let c = ErrorCode::from_u16(v).expect("known code");
            assert_eq!(c as u16, v);
        }
        assert_eq!(ErrorCode::from_u16(14), None);
    }
}
