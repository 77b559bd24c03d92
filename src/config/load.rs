//! How a `Settings` comes to be: the TOML file, then `SERVERSYNC__…` environment
//! variables and `DATABASE_URL`, then command-line flags, then secrets read from their
//! files, then one validation pass. Apart from the types because this is what an
//! operator meets when a value is wrong: every check names the key at fault, and the
//! `config` crate's own errors are reworded to do the same, so a mistake stops the
//! daemon at start-up instead of surfacing later as failed deliveries.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use secrecy::{ExposeSecret, SecretString};

use super::{Overrides, RetryParams, Settings, DEFAULT_CONFIG_PATH};

impl Settings {
    /// Load from `path` (or the default path if it exists), the environment and the
    /// overrides, then validate. Errors name the offending key.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> anyhow::Result<Settings> {
        // the file read: the one named, or the default one where there is something
        // at its path; one there that cannot be reached (a directory without search
        // permission, a link loop) is an error, not a reason to run on defaults
        let file = match path {
            Some(p) => Some(p.to_path_buf()),
            None => Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|p| {
                !matches!(p.symlink_metadata(), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
            }),
        };
        Settings::load_from(file.as_deref(), overrides)
            .map_err(|e| with_origin(e, file.as_deref(), overrides))
    }

    fn load_from(file: Option<&Path>, overrides: &Overrides) -> anyhow::Result<Settings> {
        let mut builder = config::Config::builder();
        if let Some(p) = file {
            match std::fs::metadata(p) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    bail!("config file {} does not exist", p.display())
                }
                Err(e) => bail!("cannot read config file {}: {e}", p.display()),
                Ok(meta) if meta.is_dir() => bail!(
                    "config file {} is a directory, not a TOML file",
                    p.display()
                ),
                Ok(_) => {}
            }
            builder = builder.add_source(config::File::from_str(
                &read_config_file(p)?,
                config::FileFormat::Toml,
            ));
        }
        refuse_non_unicode_environment()?;
        // Environment values stay the strings they were written as: the config
        // crate's `try_parsing` would turn a token `007` into `7` and `1e3` into
        // `1000`. Numbers, switches and lists are read from strings by their fields'
        // deserializers (`strict`, `names`).
        builder = builder.add_source(
            config::Environment::with_prefix("SERVERSYNC")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(false),
        );
        // the flags, over both: a flag's value is the one in effect, whatever the file
        // or the environment says for its key (even a value of the wrong type)
        builder = apply_flags(builder, overrides).map_err(describe_config_error)?;
        let raw = builder.build().map_err(describe_config_error)?;
        let mut settings: Settings = raw.try_deserialize().map_err(describe_config_error)?;

        // The environment overrides the file (SPEC §6), for a secret given in the
        // other form too: `…_FILE` in the environment replaces a value in the file.
        let database = &mut settings.database;
        prefer_environment_form(
            &mut database.url,
            &mut database.url_file,
            "SERVERSYNC__DATABASE__URL",
        );
        let ingest = &mut settings.ingest;
        prefer_environment_form(
            &mut ingest.auth_token,
            &mut ingest.auth_token_file,
            "SERVERSYNC__INGEST__AUTH_TOKEN",
        );
        prefer_environment_form(
            &mut ingest.signing_secret,
            &mut ingest.signing_secret_file,
            "SERVERSYNC__INGEST__SIGNING_SECRET",
        );
        // The conventional DATABASE_URL too, unless the more specific
        // SERVERSYNC__DATABASE__URL (or its _FILE) is set.
        let specific =
            env_is_set("SERVERSYNC__DATABASE__URL") || env_is_set("SERVERSYNC__DATABASE__URL_FILE");
        if !specific {
            if let Ok(url) = std::env::var("DATABASE_URL") {
                if !url.is_empty() {
                    settings.database.url = Some(SecretString::from(url));
                    settings.database.url_file = None;
                }
            }
        }
        if let Some(url) = &overrides.database_url {
            // over `DATABASE_URL` too
            settings.database.url = Some(SecretString::from(url.clone()));
            settings.database.url_file = None;
        }
        settings.resolve_secret_files()?;
        settings.validate()?;
        Ok(settings)
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
        if let Some(path) = &self.ingest.ca_file {
            self.ingest.ca_certificates = read_ca_file(path)?;
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
            // a URL that does not parse may still hold credentials (`http://u:p@[::1`)
            let shown = if self.ingest.base_url.contains('@') {
                "<unparseable URL>".to_string()
            } else {
                format!("{:?}", self.ingest.base_url)
            };
            format!("invalid value for ingest.base_url: {shown}")
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
        if let Some(both) = self
            .dispatch
            .json_entity_types
            .iter()
            .find(|t| self.dispatch.file_entity_types.contains(t))
        {
            // a file type goes to the upload endpoint whatever the JSON list says
            bail!(
                "invalid value for dispatch.json_entity_types: {both:?} is in \
                 dispatch.file_entity_types too (a type goes to one endpoint)"
            );
        }
        check_range("dispatch.batch_size", self.dispatch.batch_size, 1, 10_000)?;
        check_range(
            "dispatch.max_batch_bytes",
            self.dispatch.max_batch_bytes,
            1024,
            1 << 30,
        )?;
        check_range(
            "metrics.backlog_exact_rows",
            self.metrics.backlog_exact_rows,
            1,
            1_000_000_000,
        )?;
        check_range(
            "dispatch.batches_per_settle",
            self.dispatch.batches_per_settle,
            1,
            100,
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
        // zero would make a busy loop of their tasks, or fail every connection
        check_nonzero("database.acquire_timeout", self.database.acquire_timeout)?;
        check_nonzero("metrics.refresh_interval", self.metrics.refresh_interval)?;
        check_nonzero("retention.prune_interval", self.retention.prune_interval)?;
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
        if self.storage.recordings_root.as_os_str().is_empty() {
            // every file row would look for its file under the working directory
            bail!("invalid value for storage.recordings_root: it is empty");
        }
        for (entity_type, source) in &self.ordering.keys {
            // a top-level field of the payload, named by letters, digits, `_` and `-`:
            // the stores' insert triggers read it as a JSON path on SQLite and as a
            // key on PostgreSQL, which agree on such names only (`a.b` would be a
            // nested field on one and a dotted key on the other; a quote breaks the
            // path and with it every producer's insert)
            let field_ok = |f: &str| {
                !f.is_empty()
                    && f.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
            };
            if source != "entity_id" && !source.strip_prefix("payload.").is_some_and(field_ok) {
                bail!(
                    "invalid value for ordering.keys.{entity_type}: {source:?} \
                     (expected \"entity_id\" or \"payload.<field>\", a top-level field \
                     named by letters, digits, _ and -)"
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

/// The command-line flags of SPEC §6, as the `config` crate's overrides.
fn apply_flags(
    mut builder: config::ConfigBuilder<config::builder::DefaultState>,
    o: &Overrides,
) -> Result<config::ConfigBuilder<config::builder::DefaultState>, config::ConfigError> {
    if let Some(url) = &o.database_url {
        builder = builder.set_override("database.url", url.as_str())?;
    }
    if let Some(url) = &o.ingest_url {
        builder = builder.set_override("ingest.base_url", url.as_str())?;
    }
    if let Some(n) = o.batch_size {
        builder = builder.set_override("dispatch.batch_size", u64::from(n))?;
    }
    if let Some(n) = o.concurrency {
        builder = builder.set_override("dispatch.concurrency", u64::from(n))?;
    }
    if let Some(addr) = o.metrics_listen {
        builder = builder.set_override("metrics.listen", addr.to_string())?;
    }
    Ok(builder)
}

/// The most bytes read from the config file, a secret file, or `ingest.ca_file`.
const CONFIG_FILE_LIMIT: u64 = 1 << 20;
const SECRET_FILE_LIMIT: u64 = 64 << 10;
const CA_FILE_LIMIT: u64 = 4 << 20;

/// How long a file that is a pipe may take to be written to its end.
const PIPE_PATIENCE: Duration = Duration::from_secs(10);

/// The bytes of the file at `path`, at most `limit` of them (`/dev/zero` given by
/// mistake must not fill the memory). Opened without blocking, so that a FIFO
/// nobody writes to reads as empty at once instead of hanging the start; a pipe that
/// is being written (`--config <(…)`, `/dev/stdin`) is read to its end, waited for
/// up to `PIPE_PATIENCE`.
fn read_bounded(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let mut reader = file.take(limit + 1);
    let mut bytes = Vec::new();
    let deadline = std::time::Instant::now() + PIPE_PATIENCE;
    loop {
        match reader.read_to_end(&mut bytes) {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() >= deadline {
                    return Err(std::io::Error::other(format!(
                        "a pipe with nothing more written to it for {PIPE_PATIENCE:?}"
                    )));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
    if bytes.len() as u64 > limit {
        return Err(std::io::Error::other(format!("larger than {limit} bytes")));
    }
    Ok(bytes)
}

/// `read_bounded`, as UTF-8 text.
fn read_text(path: &Path, limit: u64) -> std::io::Result<String> {
    String::from_utf8(read_bounded(path, limit)?).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        )
    })
}

/// The config file's text, read here rather than by the `config` crate: its errors
/// quote the line they stopped at, which can hold a secret (`auth_token = "…`), so a
/// syntax error is told by its position and the parser's message alone; and a file
/// that cannot be read is named.
fn read_config_file(path: &Path) -> anyhow::Result<String> {
    let text = read_text(path, CONFIG_FILE_LIMIT)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    if let Err(e) = toml::de::DeTable::parse(&text) {
        let at = e.span().map_or(String::new(), |span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let line_start = before.rsplit('\n').next().unwrap_or("");
            let column = line_start.trim_start_matches('\u{feff}').chars().count() + 1;
            format!(" at line {line}, column {column}")
        });
        let message = e.message().trim_end();
        // a key given twice is named: the span is the key (or the table's name) alone,
        // never its value
        let key = e
            .span()
            .and_then(|span| text.get(span))
            .filter(|key| message == "duplicate key" && is_bare_name(key))
            .map_or(String::new(), |key| format!(" {key}"));
        bail!(
            "invalid configuration: config file {} is not valid TOML{at}: {message}{key}",
            path.display(),
        );
    }
    Ok(text)
}

/// A TOML key as written, quoted or not, and short: what may be named in an error.
fn is_bare_name(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 64
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.'\" ".contains(c))
}

/// A `SERVERSYNC__…` (the prefix in any case, as the `config` crate reads it) or
/// `DATABASE_URL` value that is not UTF-8 is refused naming the variable only: the
/// `config` crate's error quotes the value, a secret as often as not, and
/// `std::env::var` would take `DATABASE_URL` as unset.
fn refuse_non_unicode_environment() -> anyhow::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    const PREFIX: &[u8] = b"SERVERSYNC__";
    for (name, value) in std::env::vars_os() {
        let ours = name
            .as_bytes()
            .get(..PREFIX.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(PREFIX))
            || name == "DATABASE_URL";
        if ours && value.to_str().is_none() {
            bail!(
                "invalid configuration: the environment variable {} is not valid UTF-8",
                name.to_string_lossy()
            );
        }
    }
    Ok(())
}

fn env_is_set(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty())
}

/// A secret is given as its value or as a file holding it (`…_file`). Set in the
/// environment in one form, it replaces whatever the config file says in the other:
/// the environment overrides the file, whichever form either uses. (Both forms in
/// one source stay an error, `only_value_or_file`.)
fn prefer_environment_form(
    value: &mut Option<SecretString>,
    file: &mut Option<PathBuf>,
    var: &str,
) {
    match (env_is_set(var), env_is_set(&format!("{var}_FILE"))) {
        (true, false) => *file = None,
        (false, true) => *value = None,
        _ => {}
    }
}

fn read_secret(path: &Path, key: &str) -> anyhow::Result<SecretString> {
    let text = read_text(path, SECRET_FILE_LIMIT)
        .with_context(|| format!("cannot read {key} ({})", path.display()))?;
    let value = text.trim();
    if value.is_empty() {
        bail!("invalid value for {key}: {} is empty", path.display());
    }
    if value.contains(['\n', '\r']) {
        // a URL parser drops line breaks, joining the lines into another value
        bail!(
            "invalid value for {key}: {} holds more than one line (the file must hold \
             the value alone)",
            path.display()
        );
    }
    Ok(SecretString::from(value.to_string()))
}

/// The CA certificates of `ingest.ca_file`: at least one, each one a certificate a
/// TLS client can trust (checked by building a client with them), so that a wrong
/// file stops the daemon here instead of failing every request as `connect`.
fn read_ca_file(path: &Path) -> anyhow::Result<Vec<reqwest::Certificate>> {
    let invalid = || format!("invalid value for ingest.ca_file ({})", path.display());
    let pem = read_bounded(path, CA_FILE_LIMIT)
        .with_context(|| format!("cannot read ingest.ca_file ({})", path.display()))?;
    let certificates = reqwest::Certificate::from_pem_bundle(&pem).with_context(invalid)?;
    if certificates.is_empty() {
        bail!(
            "invalid value for ingest.ca_file ({}): no PEM certificate in it",
            path.display()
        );
    }
    let mut client = reqwest::Client::builder().tls_built_in_root_certs(false);
    for certificate in &certificates {
        client = client.add_root_certificate(certificate.clone());
    }
    if let Err(e) = client.build() {
        // reqwest words it as a peer's certificate; here it is the file's
        let cause = format!("{:#}", anyhow::Error::new(e));
        let cause = cause.rsplit("certificate: ").next().unwrap_or(&cause);
        bail!(
            "invalid value for ingest.ca_file ({}): a certificate in it cannot be read ({cause})",
            path.display()
        );
    }
    Ok(certificates)
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
        // brackets and quotes: most likely a JSON array in an environment variable,
        // which the config loader splits on its commas
        let json_like = name.contains(['[', ']', '"', '\'']);
        if name.trim().is_empty() || json_like {
            let hint = if json_like {
                " (in the environment, write the list as comma-separated names: a,b)"
            } else {
                ""
            };
            bail!("invalid value for {key}: {name:?} is not an entity type name{hint}");
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
        let inherited = if prefix == "retry" {
            ""
        } else {
            " (an override's unset keys come from [retry])"
        };
        bail!(
            "invalid value for {prefix}.base_delay: {} is greater than {prefix}.max_delay, \
             {}{inherited}",
            humantime::format_duration(p.base_delay),
            humantime::format_duration(p.max_delay)
        );
    }
    Ok(())
}

/// An error that names a key says where that key's value came from, so that an
/// operator looks in the right place: the flag, the environment variable, or the
/// file (in that order of precedence).
fn with_origin(err: anyhow::Error, file: Option<&Path>, overrides: &Overrides) -> anyhow::Error {
    let text = format!("{err:#}");
    match key_named(&text).and_then(|key| origin(&key, file, overrides)) {
        Some(origin) => anyhow::anyhow!("{text} ({origin})"),
        None => err,
    }
}

/// The configuration key an error message names: "… key `dispatch.x`" or "invalid
/// value for dispatch.x: …".
fn key_named(text: &str) -> Option<String> {
    if let Some((_, rest)) = text.split_once("key `") {
        return rest.split_once('`').map(|(key, _)| key.to_owned());
    }
    let (_, rest) = text.split_once("invalid value for ")?;
    let key: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        .collect();
    key.contains('.').then_some(key)
}

/// Where `key` (or, for a section, a key under it) was set.
fn origin(key: &str, file: Option<&Path>, overrides: &Overrides) -> Option<String> {
    let flag = match key {
        "database.url" => overrides.database_url.is_some().then_some("--database-url"),
        "ingest.base_url" => overrides.ingest_url.is_some().then_some("--ingest-url"),
        "dispatch.batch_size" => overrides.batch_size.is_some().then_some("--batch-size"),
        "dispatch.concurrency" => overrides.concurrency.is_some().then_some("--concurrency"),
        "metrics.listen" => overrides
            .metrics_listen
            .is_some()
            .then_some("--metrics-listen"),
        _ => None,
    };
    if let Some(flag) = flag {
        return Some(format!("from {flag}"));
    }
    let key = key.to_ascii_lowercase();
    let under = format!("{key}.");
    // set, even empty (the `config` crate takes an empty value as given), with the
    // prefix in any case (so does the crate)
    let var = std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .filter(|name| {
            let name = name.to_ascii_lowercase();
            name.strip_prefix("serversync__").is_some_and(|path| {
                let path = path.replace("__", ".");
                path == key || path == format!("{key}_file") || path.starts_with(&under)
            })
        })
        .min();
    let var = var.or_else(|| {
        (key == "database.url" && env_is_set("DATABASE_URL")).then(|| "DATABASE_URL".to_owned())
    });
    // the file, if it does mention the key (a check between two keys, or a
    // default's, may name one the file does not set)
    let last = key.rsplit('.').next().unwrap_or(&key).to_owned();
    let in_file = file.filter(|f| {
        std::fs::read_to_string(f).is_ok_and(|t| t.to_ascii_lowercase().contains(&last))
    });
    match (var, in_file) {
        (Some(var), _) => Some(format!("set by the environment variable {var}")),
        (None, Some(file)) => Some(format!("in {}", file.display())),
        (None, None) => None,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        Settings::default().validate().unwrap();
    }

    #[test]
    fn an_empty_recordings_root_is_refused() {
        let mut settings = Settings::default();
        settings.storage.recordings_root = PathBuf::new();
        let err = settings.validate().expect_err("an empty root").to_string();
        assert_eq!(
            err,
            "invalid value for storage.recordings_root: it is empty"
        );
    }

    /// A key source the two stores' triggers would read differently (or that would
    /// break SQLite's inserts) is refused, naming the key.
    #[test]
    fn ordering_key_sources_are_fields_both_stores_read_alike() {
        let with = |source: &str| {
            let mut settings = Settings::default();
            settings
                .ordering
                .keys
                .insert("widget".into(), source.into());
            settings.validate().map_err(|e| e.to_string())
        };
        for good in ["entity_id", "payload.callLogId", "payload.call_id-2"] {
            assert_eq!(with(good), Ok(()), "{good}");
        }
        for bad in [
            "payload.",
            "payload.call.id",
            "payload.\"x",
            "payload.a[0]",
            "id",
        ] {
            let err = with(bad).expect_err(bad);
            assert!(
                err.starts_with("invalid value for ordering.keys.widget:"),
                "{err}"
            );
        }
    }

    /// `config/serversync.example.toml` says it lists every key with its default.
    #[test]
    fn the_example_config_holds_the_defaults() {
        let text = include_str!("../../config/serversync.example.toml");
        let parsed: Settings = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .and_then(config::Config::try_deserialize)
            .unwrap();
        assert_eq!(
            format!("{parsed:#?}"),
            format!("{:#?}", Settings::default())
        );
    }
}
