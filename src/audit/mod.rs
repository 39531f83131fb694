//! The append-only audit log: one JSON object per line in `state_dir/audit.jsonl`,
//! flushed to disk (fsync) before a decision is answered, hash-chained ([`chain`]),
//! rotated by size (`audit.jsonl.1` is the newest rotated file); queries and CSV export.

pub mod anchor;
pub mod chain;
pub mod export;
pub mod journal;
pub mod limit;
pub mod log;
pub mod query;
pub mod read;
pub mod record;

pub use export::{write_csv, CSV_HEADER};
pub use journal::Position;
pub use log::{AuditError, AuditLog};
pub use read::{files, read_all, read_positioned, read_records, read_records_from, Positioned, AUDIT_FILE};
pub use record::{enum_text, Action, AuditFilter, AuditRecord, Batch, Outcome};
