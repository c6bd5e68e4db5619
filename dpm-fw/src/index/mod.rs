//! The persistent hash index (P-CLHT style). Being written.
