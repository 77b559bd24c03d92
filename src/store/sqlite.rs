//! SQLite backend (embedded store, one relay per file). TODO: being written.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{
    Backlog, Claim, ConnectOptions, DeadLetter, DlqFilter, DlqSelection, NewRow, SchemaState, SettleReport,
    Settlement, Status,
};

#[derive(Debug, Clone)]
pub struct SqliteStore {}

/// Held while a relay runs against a SQLite file.
#[derive(Debug)]
pub struct RelayLock {}

impl SqliteStore {
    pub async fn connect(_url: &str, _options: &ConnectOptions) -> anyhow::Result<SqliteStore> { anyhow::bail!("todo") }
    pub fn lock_for_relay(&self) -> anyhow::Result<RelayLock> { anyhow::bail!("todo") }
    pub async fn ping(&self) -> anyhow::Result<()> { anyhow::bail!("todo") }
    pub async fn migrate(&self) -> anyhow::Result<()> { anyhow::bail!("todo") }
    pub async fn schema_state(&self) -> anyhow::Result<SchemaState> { anyhow::bail!("todo") }
    pub async fn set_ordering_rules(&self, _rules: &BTreeMap<String, String>) -> anyhow::Result<()> { anyhow::bail!("todo") }
    pub async fn claim(&self, _token: i64, _limit: u32, _lease: Duration, _owner: &str) -> anyhow::Result<Claim> { anyhow::bail!("todo") }
    pub async fn renew(&self, _tokens: &[i64], _lease: Duration) -> anyhow::Result<u64> { anyhow::bail!("todo") }
    pub async fn release(&self, _tokens: &[i64]) -> anyhow::Result<u64> { anyhow::bail!("todo") }
    pub async fn settle(&self, _s: &Settlement, _keep_sent: bool) -> anyhow::Result<SettleReport> { anyhow::bail!("todo") }
    pub async fn status(&self) -> anyhow::Result<Status> { anyhow::bail!("todo") }
    pub async fn backlog(&self) -> anyhow::Result<Backlog> { anyhow::bail!("todo") }
    pub async fn enqueue(&self, _row: &NewRow) -> anyhow::Result<i64> { anyhow::bail!("todo") }
    pub async fn dlq_list(&self, _f: &DlqFilter) -> anyhow::Result<Vec<DeadLetter>> { anyhow::bail!("todo") }
    pub async fn dlq_get(&self, _id: i64) -> anyhow::Result<Option<DeadLetter>> { anyhow::bail!("todo") }
    pub async fn dlq_requeue(&self, _sel: &DlqSelection) -> anyhow::Result<u64> { anyhow::bail!("todo") }
    pub async fn dlq_purge(&self, _sel: &DlqSelection) -> anyhow::Result<u64> { anyhow::bail!("todo") }
    pub async fn prune_sent(&self, _ttl: Duration, _batch: u32) -> anyhow::Result<u64> { anyhow::bail!("todo") }
}
