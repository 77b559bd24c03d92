//! Typed settings: one `Settings`, defaults in `Default` impls, loaded from a TOML
//! file, then `SERVERSYNC__SECTION__KEY` environment variables (and `DATABASE_URL`),
//! then command-line flags; validated once at start-up.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

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
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: None,
            url_file: None,
            max_connections: 10,
            acquire_timeout: Duration::from_secs(5),
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
            danger_accept_invalid_certs: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchSettings {
    #[serde(deserialize_with = "strict::whole")]
    pub batch_size: u32,
    /// Batches in flight at once in one instance.
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
    pub file_entity_types: Vec<String>,
    /// When non-empty, the only JSON entity types that are routable; any other type
    /// (that is not a file type) is dead-lettered as `unknown_entity_type`.
    pub json_entity_types: Vec<String>,
    /// File uploads in flight at once within one batch.
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
            concurrency: 12,
            claim_concurrency: 2,
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

impl Settings {
    /// Load from `path` (or the default path if it exists), the environment and the
    /// overrides, then validate. Errors name the offending key.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> anyhow::Result<Settings> {
        let mut builder = config::Config::builder();
        match path {
            Some(p) => {
                if !p.exists() {
                    bail!("config file {} does not exist", p.display());
                }
                builder =
                    builder.add_source(config::File::from(p).format(config::FileFormat::Toml));
            }
            None => {
                let p = Path::new(DEFAULT_CONFIG_PATH);
                if p.exists() {
                    builder =
                        builder.add_source(config::File::from(p).format(config::FileFormat::Toml));
                }
            }
        }
        builder = builder.add_source(
            config::Environment::with_prefix("SERVERSYNC")
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("dispatch.file_entity_types")
                .with_list_parse_key("dispatch.json_entity_types")
                .try_parsing(true),
        );
        let raw = builder.build().map_err(describe_config_error)?;
        let mut settings: Settings = raw.try_deserialize().map_err(describe_config_error)?;

        // The environment overrides the file (SPEC §6): the conventional DATABASE_URL
        // too, unless the more specific SERVERSYNC__DATABASE__URL is set.
        let specific = std::env::var_os("SERVERSYNC__DATABASE__URL").is_some_and(|v| !v.is_empty());
        if !specific {
            if let Ok(url) = std::env::var("DATABASE_URL") {
                if !url.is_empty() {
                    settings.database.url = Some(SecretString::from(url));
                }
            }
        }
        settings.apply(overrides);
        settings.resolve_secret_files()?;
        settings.validate()?;
        Ok(settings)
    }

    fn apply(&mut self, o: &Overrides) {
        if let Some(url) = &o.database_url {
            self.database.url = Some(SecretString::from(url.clone()));
        }
        if let Some(url) = &o.ingest_url {
            self.ingest.base_url = url.clone();
        }
        if let Some(n) = o.batch_size {
            self.dispatch.batch_size = n;
        }
        if let Some(n) = o.concurrency {
            self.dispatch.concurrency = n;
        }
        if let Some(addr) = o.metrics_listen {
            self.metrics.listen = addr;
        }
    }

    fn resolve_secret_files(&mut self) -> anyhow::Result<()> {
        if self.database.url.is_none() {
            if let Some(path) = &self.database.url_file {
                self.database.url = Some(read_secret(path, "database.url_file")?);
            }
        }
        let ingest = &mut self.ingest;
        only_value_or_file(
            &mut ingest.auth_token,
            ingest.auth_token_file.as_deref(),
            "ingest.auth_token",
        )?;
        only_value_or_file(
            &mut ingest.signing_secret,
            ingest.signing_secret_file.as_deref(),
            "ingest.signing_secret",
        )?;
        if let Some(secret) = &self.ingest.signing_secret {
            check_signing_secret(secret.expose_secret())?;
        }
        if let Some(token) = &self.ingest.auth_token {
            // caught here, or every request would fail to build and be charged as a
            // connect error until the rows are dead
            let token = token.expose_secret();
            if token.is_empty() || !token.bytes().all(|b| (0x21..0x7f).contains(&b)) {
                bail!(
                    "invalid value for ingest.auth_token: a bearer token must be non-empty \
                     visible ASCII (no spaces, line breaks or other control characters)"
                );
            }
        }
        Ok(())
    }

    /// Check values that deserialize but make no sense; the error names the key.
    pub fn validate(&self) -> anyhow::Result<()> {
        let url = reqwest::Url::parse(&self.ingest.base_url).with_context(|| {
            format!(
                "invalid value for ingest.base_url: {:?}",
                self.ingest.base_url
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            bail!("invalid value for ingest.base_url: scheme must be http or https");
        }
        if !url.username().is_empty() || url.password().is_some() {
            bail!("invalid value for ingest.base_url: put credentials in ingest.auth_token, not the URL");
        }
        check_type_names(
            "dispatch.file_entity_types",
            &self.dispatch.file_entity_types,
        )?;
        check_type_names(
            "dispatch.json_entity_types",
            &self.dispatch.json_entity_types,
        )?;
        check_range("dispatch.batch_size", self.dispatch.batch_size, 1, 10_000)?;
        check_range(
            "metrics.backlog_exact_rows",
            self.metrics.backlog_exact_rows,
            1,
            1_000_000_000,
        )?;
        check_range("dispatch.concurrency", self.dispatch.concurrency, 1, 256)?;
        check_range(
            "dispatch.claim_concurrency",
            self.dispatch.claim_concurrency,
            1,
            256,
        )?;
        check_range(
            "dispatch.file_concurrency",
            self.dispatch.file_concurrency,
            1,
            64,
        )?;
        check_range(
            "dispatch.outage_threshold",
            self.dispatch.outage_threshold,
            1,
            1000,
        )?;
        check_range(
            "database.max_connections",
            self.database.max_connections,
            1,
            1000,
        )?;
        check_range(
            "retention.prune_batch",
            self.retention.prune_batch,
            1,
            1_000_000,
        )?;
        check_nonzero("dispatch.poll_interval", self.dispatch.poll_interval)?;
        check_nonzero("dispatch.probe_interval", self.dispatch.probe_interval)?;
        check_nonzero("ingest.timeout", self.ingest.timeout)?;
        check_nonzero("ingest.connect_timeout", self.ingest.connect_timeout)?;
        if let Some(t) = self.ingest.upload_timeout {
            check_nonzero("ingest.upload_timeout", t)?;
        }
        if self.dispatch.lease_duration < Duration::from_secs(1) {
            bail!("invalid value for dispatch.lease_duration: must be at least 1s");
        }
        check_retry("retry", &self.retry.for_entity(""))?;
        for entity_type in self.retry.overrides.keys() {
            check_retry(
                &format!("retry.overrides.{entity_type}"),
                &self.retry.for_entity(entity_type),
            )?;
        }
        for (entity_type, source) in &self.ordering.keys {
            if source != "entity_id" && source.strip_prefix("payload.").is_none_or(str::is_empty) {
                bail!(
                    "invalid value for ordering.keys.{entity_type}: {source:?} \
                     (expected \"entity_id\" or \"payload.<field>\")"
                );
            }
        }
        if let Some(url) = &self.database.url {
            crate::store::check_url(url.expose_secret())
                .context("invalid value for database.url")?;
        }
        Ok(())
    }

    /// The database URL, or a clear error saying how to give one.
    pub fn database_url(&self) -> anyhow::Result<&SecretString> {
        self.database.url.as_ref().context(
            "no database configured: set database.url in the config file, \
             SERVERSYNC__DATABASE__URL or DATABASE_URL, or pass --database-url",
        )
    }
}

fn read_secret(path: &Path, key: &str) -> anyhow::Result<SecretString> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {key} ({})", path.display()))?;
    Ok(SecretString::from(text.trim().to_string()))
}

/// An ingest secret given as `key` or as `key_file`, read from the file when that is
/// the one set. Both set is an error: which one was meant is anybody's guess.
fn only_value_or_file(
    value: &mut Option<SecretString>,
    file: Option<&Path>,
    key: &str,
) -> anyhow::Result<()> {
    match (value.is_some(), file) {
        (true, Some(_)) => bail!("{key} and {key}_file are both set: set one of them"),
        (false, Some(path)) => *value = Some(read_secret(path, &format!("{key}_file"))?),
        _ => {}
    }
    Ok(())
}

/// A Standard Webhooks secret is `whsec_` and base64; one that says `whsec_` but is
/// not base64 would otherwise be used as its raw bytes, and every signature would fail
/// at the Frontend. Any other non-empty secret is used as it is.
fn check_signing_secret(secret: &str) -> anyhow::Result<()> {
    use base64::Engine;
    if secret.is_empty() {
        bail!("invalid value for ingest.signing_secret: it is empty");
    }
    if let Some(b64) = secret.strip_prefix("whsec_") {
        let decoded = base64::engine::general_purpose::STANDARD.decode(b64);
        if decoded.map_or(true, |key| key.is_empty()) {
            bail!(
                "invalid value for ingest.signing_secret: a whsec_ secret must be followed by \
                 base64 (standard alphabet, with padding)"
            );
        }
    }
    Ok(())
}

/// Entity type names in a routing list: a JSON array written into an environment
/// variable (`["a","b"]`) is split on commas into `["a"` and `"b"]`, which would route
/// every row wrongly without a word; and an empty name routes nothing.
fn check_type_names(key: &str, names: &[String]) -> anyhow::Result<()> {
    for name in names {
        if name.trim().is_empty() || name.contains(['[', ']', '"', '\'']) {
            bail!(
                "invalid value for {key}: {name:?} is not an entity type name \
                 (in the environment, write the list as comma-separated names: a,b)"
            );
        }
    }
    Ok(())
}

fn check_range(key: &str, value: u32, min: u32, max: u32) -> anyhow::Result<()> {
    if value < min || value > max {
        bail!("invalid value for {key}: {value} (expected {min}..={max})");
    }
    Ok(())
}

fn check_nonzero(key: &str, value: Duration) -> anyhow::Result<()> {
    if value.is_zero() {
        bail!("invalid value for {key}: must be greater than zero");
    }
    Ok(())
}

fn check_retry(prefix: &str, p: &RetryParams) -> anyhow::Result<()> {
    check_range(&format!("{prefix}.max_attempts"), p.max_attempts, 1, 1000)?;
    if p.base_delay > p.max_delay {
        bail!("invalid value for {prefix}.base_delay: greater than {prefix}.max_delay");
    }
    Ok(())
}

/// The `config` crate reports unknown fields as "unknown field `x`, expected … for key
/// `section`"; turn that into "unknown configuration key `section.x`".
fn describe_config_error(err: config::ConfigError) -> anyhow::Error {
    let text = err.to_string();
    if let Some(rest) = text.strip_prefix("unknown field `") {
        if let Some((field, tail)) = rest.split_once('`') {
            let section = tail
                .rsplit_once("for key `")
                .and_then(|(_, s)| s.split_once('`'))
                .map(|(s, _)| s.to_string());
            let key = match section {
                Some(s) if !s.is_empty() => format!("{s}.{field}"),
                _ => field.to_string(),
            };
            return anyhow::anyhow!("unknown configuration key `{key}`");
        }
    }
    // "expected struct DatabaseSettings": a section given as a plain value
    let text = match text.split_once("expected struct ") {
        Some((head, tail)) => {
            let rest = tail.split_once(' ').map_or("", |(_, r)| r);
            format!("{head}expected a table {rest}")
        }
        None => text,
    };
    anyhow::anyhow!("invalid configuration: {text}")
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
            match v.trim() {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(E::custom(format!("expected true or false, found {v:?}"))),
            }
        }
    }
}

/// Durations as human strings: `250ms`, `30s`, `5m`, `7d`.
pub mod duration_str {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn parse(text: &str) -> Result<Duration, String> {
        humantime::parse_duration(text.trim())
            .map_err(|e| format!("invalid duration {text:?}: {e}"))
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
    fn defaults_validate() {
        Settings::default().validate().unwrap();
    }

    #[test]
    fn metrics_listen_on_loopback_by_default() {
        let listen = Settings::default().metrics.listen;
        assert!(listen.ip().is_loopback());
        assert_eq!(listen.port(), 9464);
    }
}
