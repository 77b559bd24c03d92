//! A relay configuration file built key by key: `config.set("retry.max_attempts", 2)`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A TOML value, already rendered.
#[derive(Clone, Debug, PartialEq)]
pub struct TomlValue(String);

impl TomlValue {
    /// A literal written as is, e.g. `raw("{ a = 1 }")`.
    pub fn raw(literal: impl Into<String>) -> TomlValue {
        TomlValue(literal.into())
    }
}

fn quote(text: &str) -> TomlValue {
    // JSON string escapes are valid in TOML basic strings.
    TomlValue(serde_json::to_string(text).expect("string serializes"))
}

impl From<&str> for TomlValue {
    fn from(v: &str) -> Self {
        quote(v)
    }
}
impl From<String> for TomlValue {
    fn from(v: String) -> Self {
        quote(&v)
    }
}
impl From<&String> for TomlValue {
    fn from(v: &String) -> Self {
        quote(v)
    }
}
impl From<&Path> for TomlValue {
    fn from(v: &Path) -> Self {
        quote(&v.to_string_lossy())
    }
}
impl From<&PathBuf> for TomlValue {
    fn from(v: &PathBuf) -> Self {
        quote(&v.to_string_lossy())
    }
}
impl From<bool> for TomlValue {
    fn from(v: bool) -> Self {
        TomlValue(v.to_string())
    }
}
macro_rules! int_value {
    ($($t:ty),*) => {$(
        impl From<$t> for TomlValue {
            fn from(v: $t) -> Self {
                TomlValue(v.to_string())
            }
        }
    )*};
}
int_value!(i32, i64, u16, u32, u64, usize);

impl<const N: usize> From<[&str; N]> for TomlValue {
    fn from(v: [&str; N]) -> Self {
        let items: Vec<String> = v.iter().map(|s| quote(s).0).collect();
        TomlValue(format!("[{}]", items.join(", ")))
    }
}

/// `section(.sub)*.key = value` pairs rendered as TOML tables.
#[derive(Clone, Debug, Default)]
pub struct ConfigToml {
    sections: BTreeMap<String, BTreeMap<String, TomlValue>>,
}

impl ConfigToml {
    /// Set `section.key` (the last dot separates the key from its table, so
    /// `retry.overrides.recording_file.max_attempts` lands in
    /// `[retry.overrides.recording_file]`).
    pub fn set(&mut self, key: &str, value: impl Into<TomlValue>) -> &mut ConfigToml {
        let (section, name) = key
            .rsplit_once('.')
            .unwrap_or_else(|| panic!("key {key:?} has no section"));
        self.sections
            .entry(section.to_string())
            .or_default()
            .insert(name.to_string(), value.into());
        self
    }

    pub fn remove(&mut self, key: &str) -> &mut ConfigToml {
        if let Some((section, name)) = key.rsplit_once('.') {
            if let Some(table) = self.sections.get_mut(section) {
                table.remove(name);
            }
        }
        self
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for (section, values) in &self.sections {
            if values.is_empty() {
                continue;
            }
            out.push_str(&format!("[{section}]\n"));
            for (key, value) in values {
                out.push_str(&format!("{key} = {}\n", value.0));
            }
            out.push('\n');
        }
        out
    }
}

#[test]
fn renders_nested_tables_and_escapes_strings() {
    let mut c = ConfigToml::default();
    c.set("retry.max_attempts", 2)
        .set("retry.overrides.recording_file.base_delay", "1s")
        .set("ingest.auth_token", "a\"b")
        .set("dispatch.json_entity_types", ["call_log"]);
    let text = c.render();
    assert!(text.contains("[retry]\nmax_attempts = 2\n"), "{text}");
    assert!(
        text.contains("[retry.overrides.recording_file]\nbase_delay = \"1s\"\n"),
        "{text}"
    );
    assert!(text.contains("auth_token = \"a\\\"b\""), "{text}");
    assert!(
        text.contains("json_entity_types = [\"call_log\"]"),
        "{text}"
    );
}
