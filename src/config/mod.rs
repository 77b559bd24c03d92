//! Typed settings: one `Settings`, defaults in `Default` impls, loaded from a TOML
//! file, then `SERVERSYNC__SECTION__KEY` environment variables (and `DATABASE_URL`),
//! then command-line flags; validated once at start-up.
//!
//! The types and their defaults are here, with the deserializers their fields name
//! (`strict`, `duration_str`); `load` merges the sources and validates, so what a key
//! means reads apart from how its value arrives and is checked.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

mod load;

/// Default location of the configuration file, used when it exists.
pub const DEFAULT_CONFIG_PATH: &str = "config/serversync.toml";

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub ingest: IngestSettings,
    pub dispatch: DispatchSettings,
    pub retry: RetrySettings,
    pub ordering: OrderingSettings,
    pub storage: StorageSettings,
    pub metrics: MetricsSettings,
    pub retention: RetentionSettings,
    pub shutdown: ShutdownSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// `postgres://…` or `sqlite://path` (created if missing).
    pub url: Option<SecretString>,
    /// A file holding the URL (e.g. a systemd credential), read at start-up.
    pub url_file: Option<PathBuf>,
    #[serde(deserialize_with = "strict::whole")]
    pub max_connections: u32,
    #[serde(with = "duration_str")]
    pub acquire_timeout: Duration,
    /// Whether the relay's own commits (settles, retries, dead-letter moves, lease
    /// renewals) wait for PostgreSQL's WAL flush. `true` (the default): the server's
    /// `synchronous_commit` applies. `false`: they do not wait, which is still safe
    /// for at-least-once delivery (a server crash can undo the last fraction of a
    /// second of them: those rows are delivered again, in order, never lost), for
    /// servers whose flush is slow; no gain where it is fast (docs/BENCHMARKS.md).
    /// Claims never wait for the flush (a later settle's flush covers them); operator
    /// commands always do.
    #[serde(deserialize_with = "strict::flag")]
    pub synchronous_commit: bool,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: None,
            url_file: None,
            max_connections: 10,
            acquire_timeout: Duration::from_secs(5),
            synchronous_commit: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestSettings {
    pub base_url: String,
    /// Whole-request timeout for JSON batches.
    #[serde(with = "duration_str")]
    pub timeout: Duration,
    #[serde(with = "duration_str")]
    pub connect_timeout: Duration,
    /// Whole-request timeout for recording-file uploads. Unset (the default): the
    /// file's transfer at a floor of 1 MiB/s plus `timeout`, so a hung sink fails a
    /// small upload as fast as a JSON batch and a large file still has time to go.
    #[serde(default, with = "duration_str::option")]
    pub upload_timeout: Option<Duration>,
    pub auth_token: Option<SecretString>,
    pub auth_token_file: Option<PathBuf>,
    pub signing_secret: Option<SecretString>,
    pub signing_secret_file: Option<PathBuf>,
    /// A PEM file of CA certificates trusted for the ingest API's TLS in addition to
    /// the built-in public roots (a Frontend behind a private CA), so that
    /// verification never has to be turned off for one.
    pub ca_file: Option<PathBuf>,
    /// The certificates of `ca_file`, read and checked when the settings are loaded.
    #[serde(skip)]
    pub ca_certificates: Vec<reqwest::Certificate>,
    /// Trust the operating system's CA certificates too (its store, or
    /// `SSL_CERT_FILE` / `SSL_CERT_DIR` when set), as well as the built-in public
    /// roots: a CA an administrator installed with `update-ca-certificates` works
    /// without `ca_file`. Off: the built-in roots and `ca_file` only.
    #[serde(deserialize_with = "strict::flag")]
    pub system_roots: bool,
    /// Turn off TLS certificate verification. Never in production.
    #[serde(deserialize_with = "strict::flag")]
    pub danger_accept_invalid_certs: bool,
}

impl Default for IngestSettings {
    fn default() -> Self {
        Self {
            base_url: "http://localhost:3000".into(),
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            upload_timeout: None,
            auth_token: None,
            auth_token_file: None,
            signing_secret: None,
            signing_secret_file: None,
            ca_file: None,
            ca_certificates: Vec::new(),
            system_roots: true,
            danger_accept_invalid_certs: false,
        }
    }
}

impl IngestSettings {
    /// What `danger_accept_invalid_certs` does, said at every start and by `check`:
    /// a switch that turns off a protection is never silent.
    pub fn unverified_tls_warning(&self) -> Option<String> {
        self.danger_accept_invalid_certs.then(|| {
            "ingest.danger_accept_invalid_certs = true: the Frontend's TLS certificate is \
             not verified, so anyone on the network path can pose as it and read the rows \
             and the token (for a private CA, give its PEM file as ingest.ca_file instead)"
                .to_string()
        })
    }

    /// A bearer token about to cross a network in the clear: `http://` to a host
    /// other than the loopback (`check` says so; a sidecar or a service mesh that
    /// encrypts the hop is a reason to keep it).
    pub fn cleartext_token_warning(&self) -> Option<String> {
        let url = reqwest::Url::parse(&self.base_url).ok()?;
        let host = url.host_str()?;
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        (self.auth_token.is_some() && url.scheme() == "http" && !loopback).then(|| {
            format!(
                "ingest.auth_token is sent over plain http:// to {}: anyone on the network \
                 path can read it (use https://)",
                host
            )
        })
    }

    /// `base_url` as it may be shown and recorded: without its query (which some
    /// Frontends take a key in) or fragment.
    pub fn base_url_shown(&self) -> String {
        match reqwest::Url::parse(&self.base_url) {
            Ok(mut url) => {
                url.set_query(None);
                url.set_fragment(None);
                url.to_string()
            }
            Err(_) => self.base_url.clone(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchSettings {
    #[serde(deserialize_with = "strict::whole")]
    pub batch_size: u32,
    /// The most payload bytes in one JSON request (a row larger than this goes
    /// alone), and, times the requests a claim is for, in one claim: what bounds the
    /// relay's memory and the Frontend's request bodies when payloads are large. A
    /// claim counts payloads as PostgreSQL stores them (compressed when large).
    #[serde(deserialize_with = "strict::whole")]
    pub max_batch_bytes: u32,
    /// Batches a worker claims at once and settles in one transaction. Each batch is
    /// still its own request of up to `batch_size` entries, and a worker's requests go
    /// out at once; the workers are `concurrency ÷ batches_per_settle` (rounded down),
    /// so `concurrency` still bounds the batches in flight. Fewer, larger claims and
    /// settles cost the database less per row.
    #[serde(deserialize_with = "strict::whole")]
    pub batches_per_settle: u32,
    /// Batches (requests) in flight at once in one instance.
    #[serde(deserialize_with = "strict::whole")]
    pub concurrency: u32,
    /// Claim lanes in one instance. Each lane makes one claim at a time, for the
    /// worker that gets through and every worker of the lane queued behind it, from
    /// its own share of the ordering keys; so claims of different lanes run at once
    /// without scanning and skipping each other's rows. Workers are spread over the
    /// lanes. A lane whose share has nothing due claims from every key. Lanes split
    /// the keys only while a backlog is drained (the last claim came back full);
    /// otherwise every worker queues at the first lane and it claims from every key.
    #[serde(deserialize_with = "strict::whole")]
    pub claim_concurrency: u32,
    /// Poll for due rows this often when no notification arrives.
    #[serde(with = "duration_str")]
    pub poll_interval: Duration,
    /// How long a claim is held without renewal. Live relays renew every third of it.
    #[serde(with = "duration_str")]
    pub lease_duration: Duration,
    /// Entity types delivered as multipart file uploads.
    #[serde(deserialize_with = "names::deserialize")]
    pub file_entity_types: Vec<String>,
    /// When non-empty, the only JSON entity types that are routable; any other type
    /// (that is not a file type) is dead-lettered as `unknown_entity_type`.
    #[serde(deserialize_with = "names::deserialize")]
    pub json_entity_types: Vec<String>,
    /// File uploads in flight at once across the whole relay (every worker shares the bound).
    #[serde(deserialize_with = "strict::whole")]
    pub file_concurrency: u32,
    /// Consecutive sink-level failures (connect, timeout, 5xx, 429) after which the
    /// sink is taken as down: the relay pauses as a whole and stops charging attempts.
    #[serde(deserialize_with = "strict::whole")]
    pub outage_threshold: u32,
    /// First delay between probes while the sink is down (doubles up to max).
    #[serde(with = "duration_str")]
    pub probe_interval: Duration,
    #[serde(with = "duration_str")]
    pub max_probe_interval: Duration,
    /// LISTEN for inserts (PostgreSQL). Off behind poolers that forbid LISTEN.
    #[serde(deserialize_with = "strict::flag")]
    pub listen: bool,
}

impl Default for DispatchSettings {
    fn default() -> Self {
        Self {
            batch_size: 100,
            max_batch_bytes: 512 * 1024,
            batches_per_settle: 8,
            concurrency: 24,
            claim_concurrency: 3,
            poll_interval: Duration::from_secs(1),
            lease_duration: Duration::from_secs(60),
            file_entity_types: vec!["recording_file".into()],
            json_entity_types: Vec::new(),
            file_concurrency: 4,
            outage_threshold: 3,
            probe_interval: Duration::from_secs(1),
            max_probe_interval: Duration::from_secs(30),
            listen: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryPolicyKind {
    Exponential,
    EqualJitter,
    Fixed,
}

/// By hand, so that a wrong name lists the right ones instead of a Rust type name.
impl<'de> Deserialize<'de> for RetryPolicyKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        match name.as_str() {
            "exponential" => Ok(RetryPolicyKind::Exponential),
            "equal_jitter" => Ok(RetryPolicyKind::EqualJitter),
            "fixed" => Ok(RetryPolicyKind::Fixed),
            _ => Err(serde::de::Error::custom(format!(
                "unknown retry policy {name:?}, expected exponential, equal_jitter or fixed"
            ))),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySettings {
    pub policy: RetryPolicyKind,
    #[serde(deserialize_with = "strict::whole")]
    pub max_attempts: u32,
    #[serde(with = "duration_str")]
    pub base_delay: Duration,
    #[serde(with = "duration_str")]
    pub max_delay: Duration,
    pub overrides: BTreeMap<String, RetryOverride>,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            policy: RetryPolicyKind::Exponential,
            max_attempts: 10,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(600),
            overrides: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RetryOverride {
    pub policy: Option<RetryPolicyKind>,
    #[serde(default, deserialize_with = "strict::some_whole")]
    pub max_attempts: Option<u32>,
    #[serde(default, with = "duration_str::option")]
    pub base_delay: Option<Duration>,
    #[serde(default, with = "duration_str::option")]
    pub max_delay: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrderingSettings {
    /// Derive an ordering key for rows whose `ordering_key` is null.
    #[serde(deserialize_with = "strict::flag")]
    pub enabled: bool,
    /// entity_type → `entity_id` or `payload.<field>`.
    pub keys: BTreeMap<String, String>,
}

impl Default for OrderingSettings {
    fn default() -> Self {
        let keys = [
            ("call_log", "entity_id"),
            ("recording", "payload.callLogId"),
            ("recording_file", "payload.callLogId"),
        ];
        Self {
            enabled: true,
            keys: keys
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSettings {
    pub recordings_root: PathBuf,
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            recordings_root: PathBuf::from("/var/lib/serversync/recordings"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    #[serde(deserialize_with = "strict::flag")]
    pub enabled: bool,
    #[serde(deserialize_with = "listen_addr::deserialize")]
    pub listen: SocketAddr,
    /// How often backlog gauges are refreshed from the database.
    #[serde(with = "duration_str")]
    pub refresh_interval: Duration,
    /// Pending rows counted exactly per refresh; beyond, the gauges are estimated
    /// (PostgreSQL), so a huge backlog is never scanned every refresh.
    #[serde(deserialize_with = "strict::whole")]
    pub backlog_exact_rows: u32,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            refresh_interval: Duration::from_secs(10),
            backlog_exact_rows: 1_000_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSettings {
    #[serde(with = "duration_str")]
    pub sent_ttl: Duration,
    /// Keep no record of delivered rows at all.
    #[serde(deserialize_with = "strict::flag")]
    pub delete_sent: bool,
    #[serde(with = "duration_str")]
    pub prune_interval: Duration,
    #[serde(deserialize_with = "strict::whole")]
    pub prune_batch: u32,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        Self {
            sent_ttl: Duration::from_secs(7 * 24 * 3600),
            delete_sent: false,
            prune_interval: Duration::from_secs(60),
            prune_batch: 5000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownSettings {
    #[serde(with = "duration_str")]
    pub grace: Duration,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(30),
        }
    }
}

/// Command-line values that override the file and environment.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub database_url: Option<String>,
    pub ingest_url: Option<String>,
    pub batch_size: Option<u32>,
    pub concurrency: Option<u32>,
    pub metrics_listen: Option<SocketAddr>,
}

/// The effective retry parameters for one entity type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryParams {
    pub policy: RetryPolicyKind,
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl RetrySettings {
    pub fn for_entity(&self, entity_type: &str) -> RetryParams {
        let base = RetryParams {
            policy: self.policy,
            max_attempts: self.max_attempts,
            base_delay: self.base_delay,
            max_delay: self.max_delay,
        };
        match self.overrides.get(entity_type) {
            None => base,
            Some(o) => RetryParams {
                policy: o.policy.unwrap_or(base.policy),
                max_attempts: o.max_attempts.unwrap_or(base.max_attempts),
                base_delay: o.base_delay.unwrap_or(base.base_delay),
                max_delay: o.max_delay.unwrap_or(base.max_delay),
            },
        }
    }
}

/// Whole numbers and booleans as written. The config crate converts between kinds:
/// `max_attempts = 1.5` became 2 and `delete_sent = "yes"` became true, without a
/// word. Strings are accepted where they hold the right kind (environment values that
/// were not parsed), nothing else.
pub mod strict {
    use serde::de::{Deserializer, Error, Visitor};
    use std::fmt;

    pub fn whole<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        d.deserialize_any(Whole)
    }

    pub fn some_whole<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        whole(d).map(Some)
    }

    pub fn flag<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        d.deserialize_any(Flag)
    }

    struct Whole;

    impl Visitor<'_> for Whole {
        type Value = u32;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a whole number")
        }

        fn visit_u64<E: Error>(self, v: u64) -> Result<u32, E> {
            u32::try_from(v).map_err(|_| E::custom(format!("{v} is too large")))
        }

        fn visit_i64<E: Error>(self, v: i64) -> Result<u32, E> {
            u32::try_from(v)
                .map_err(|_| E::custom(format!("expected a whole number ≥ 0, found {v}")))
        }

        fn visit_f64<E: Error>(self, v: f64) -> Result<u32, E> {
            Err(E::custom(format!("expected a whole number, found {v}")))
        }

        fn visit_str<E: Error>(self, v: &str) -> Result<u32, E> {
            v.trim()
                .parse()
                .map_err(|_| E::custom(format!("expected a whole number, found {v:?}")))
        }
    }

    struct Flag;

    impl Visitor<'_> for Flag {
        type Value = bool;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("true or false")
        }

        fn visit_bool<E: Error>(self, v: bool) -> Result<bool, E> {
            Ok(v)
        }

        fn visit_str<E: Error>(self, v: &str) -> Result<bool, E> {
            let v = v.trim();
            if v.eq_ignore_ascii_case("true") {
                Ok(true)
            } else if v.eq_ignore_ascii_case("false") {
                Ok(false)
            } else {
                Err(E::custom(format!("expected true or false, found {v:?}")))
            }
        }
    }
}

/// A list of names: an array in the file, comma-separated in the environment
/// (`SERVERSYNC__DISPATCH__FILE_ENTITY_TYPES=recording_file,voicemail_file`).
pub mod names {
    use serde::de::{Deserializer, SeqAccess, Visitor};
    use std::fmt;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        d.deserialize_any(Names)
    }

    struct Names;

    impl<'de> Visitor<'de> for Names {
        type Value = Vec<String>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a list of names (comma-separated in the environment)")
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Vec<String>, E> {
            Ok(v.split(',').map(|name| name.trim().to_string()).collect())
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
            let mut names = Vec::new();
            while let Some(name) = seq.next_element::<String>()? {
                names.push(name);
            }
            Ok(names)
        }
    }
}

/// `metrics.listen` and `--metrics-listen`: `IP:PORT` (`[::1]:PORT` for IPv6), or
/// `localhost:PORT`, which means 127.0.0.1. Other host names are refused rather than
/// resolved: where the metrics listen should not depend on DNS.
pub mod listen_addr {
    use serde::{Deserialize, Deserializer};
    use std::net::SocketAddr;

    pub fn parse(text: &str) -> Result<SocketAddr, String> {
        let text = text.trim();
        if let Ok(addr) = text.parse() {
            return Ok(addr);
        }
        if let Some(port) = text.strip_prefix("localhost:") {
            return port
                .parse::<u16>()
                .map(|port| SocketAddr::from(([127, 0, 0, 1], port)))
                .map_err(|_| format!("invalid port in {text:?}: expected 0–65535"));
        }
        Err(format!(
            "invalid listen address {text:?}: expected IP:PORT (e.g. 127.0.0.1:9464) or localhost:PORT"
        ))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Durations as human strings: `250ms`, `30s`, `5m`, `7d`.
pub mod duration_str {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    /// Longer than any setting means (a century): a larger value is a typo, and
    /// would only fail later, as an interval PostgreSQL cannot hold.
    const LONGEST: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

    pub fn parse(text: &str) -> Result<Duration, String> {
        let duration = humantime::parse_duration(text.trim())
            .map_err(|e| format!("invalid duration {text:?}: {e}"))?;
        if duration > LONGEST {
            return Err(format!("invalid duration {text:?}: longer than 100 years"));
        }
        Ok(duration)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }

    pub mod option {
        use super::*;
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            let text = Option::<String>::deserialize(d)?;
            text.map(|t| parse(&t).map_err(serde::de::Error::custom))
                .transpose()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_fall_back_to_the_global_policy() {
        let mut retry = RetrySettings::default();
        retry.overrides.insert(
            "recording_file".into(),
            RetryOverride {
                max_attempts: Some(3),
                ..Default::default()
            },
        );
        assert_eq!(retry.for_entity("recording_file").max_attempts, 3);
        assert_eq!(
            retry.for_entity("recording_file").base_delay,
            retry.base_delay
        );
        assert_eq!(retry.for_entity("call_log").max_attempts, 10);
    }

    #[test]
    fn durations_parse_human_strings() {
        assert_eq!(
            duration_str::parse("250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(duration_str::parse("5m").unwrap(), Duration::from_secs(300));
        assert!(duration_str::parse("soon").is_err());
    }

    #[test]
    fn listen_addresses_take_ips_and_localhost_only() {
        use super::listen_addr::parse;
        assert_eq!(
            parse("localhost:9464"),
            Ok(SocketAddr::from(([127, 0, 0, 1], 9464)))
        );
        assert_eq!(
            parse(" 0.0.0.0:80 "),
            Ok(SocketAddr::from(([0, 0, 0, 0], 80)))
        );
        assert_eq!(parse("[::1]:9464").map(|a| a.ip().is_loopback()), Ok(true));
        for bad in [
            "localhost:99999",
            "localhost",
            "metrics.example:9464",
            "9464",
            "",
        ] {
            let err = parse(bad).expect_err(bad);
            assert!(err.contains(&format!("{:?}", bad.trim())), "{err}");
        }
    }

    #[test]
    fn metrics_listen_on_loopback_by_default() {
        let listen = Settings::default().metrics.listen;
        assert!(listen.ip().is_loopback());
        assert_eq!(listen.port(), 9464);
    }
}
