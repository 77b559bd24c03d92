//! LISTEN for the insert trigger's notifications.

use sqlx::postgres::PgListener;

use super::{PgStore, CHANNEL};

impl PgStore {
    pub async fn notifications(&self) -> anyhow::Result<Notifications> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(CHANNEL).await?;
        Ok(Notifications { listener })
    }
}

/// Insert notifications. sqlx reconnects the listener by itself after a dropped
/// connection; notifications sent meanwhile are lost, which `next` reports.
pub struct Notifications {
    listener: PgListener,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// A row was committed.
    Inserted,
    /// The connection was re-established; notifications may have been missed.
    Reconnected,
}

impl Notifications {
    pub async fn next(&mut self) -> anyhow::Result<Wake> {
        match self.listener.try_recv().await? {
            Some(_) => Ok(Wake::Inserted),
            None => Ok(Wake::Reconnected),
        }
    }
}
