//! Outcome reports.
