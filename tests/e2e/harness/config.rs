//! [`FerryConfig`]: Ferry's YAML configuration, built from typed parts instead of written by
//! hand, so that every test says only what it changes.
//!
//! ```ignore
//! let yaml = FerryConfig::new(&data)
//!     .registry("docker.io", [upstream(silent.url()).opt("first_byte_timeout", "1s"), upstream(reg.url())])
//!     .registry_opt("docker.io", "hedge_delay", "200ms")
//!     .hosted(Hosted::new(["internal"]).htpasswd(&htpasswd).delete(true))
//!     .set("cache.tag_ttl", "1h")
//!     .yaml();
//! ```
//!
//! Every config listens on `127.0.0.1:0` and stores under the given root; the first registry
//! added is the `default_registry`. Strings are written double-quoted (JSON escapes are YAML
//! escapes), booleans and numbers bare, sequences of scalars in flow style.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One value in a config.
#[derive(Clone, Debug, PartialEq)]
pub enum Yaml {
    /// Written as is: a number or a boolean.
    Bare(String),
    /// Written double-quoted.
    Str(String),
    Seq(Vec<Yaml>),
    /// Keys in insertion order.
    Map(Vec<(String, Yaml)>),
}

impl From<&str> for Yaml {
    fn from(s: &str) -> Self {
        Yaml::Str(s.to_string())
    }
}

impl From<String> for Yaml {
    fn from(s: String) -> Self {
        Yaml::Str(s)
    }
}

impl From<&String> for Yaml {
    fn from(s: &String) -> Self {
        Yaml::Str(s.clone())
    }
}

impl From<&Path> for Yaml {
    fn from(p: &Path) -> Self {
        Yaml::Str(p.display().to_string())
    }
}

impl From<&PathBuf> for Yaml {
    fn from(p: &PathBuf) -> Self {
        Yaml::from(p.as_path())
    }
}

impl From<PathBuf> for Yaml {
    fn from(p: PathBuf) -> Self {
        Yaml::from(p.as_path())
    }
}

impl From<bool> for Yaml {
    fn from(b: bool) -> Self {
        Yaml::Bare(b.to_string())
    }
}

impl From<u32> for Yaml {
    fn from(n: u32) -> Self {
        Yaml::Bare(n.to_string())
    }
}

impl From<u64> for Yaml {
    fn from(n: u64) -> Self {
        Yaml::Bare(n.to_string())
    }
}

/// As Ferry reads durations: `1s`, `500ms`.
impl From<Duration> for Yaml {
    fn from(d: Duration) -> Self {
        if d.subsec_nanos() == 0 {
            Yaml::Str(format!("{}s", d.as_secs()))
        } else {
            Yaml::Str(format!("{}ms", d.as_millis()))
        }
    }
}

impl<T: Into<Yaml>, const N: usize> From<[T; N]> for Yaml {
    fn from(items: [T; N]) -> Self {
        Yaml::Seq(items.into_iter().map(Into::into).collect())
    }
}

impl<T: Into<Yaml>> From<Vec<T>> for Yaml {
    fn from(items: Vec<T>) -> Self {
        Yaml::Seq(items.into_iter().map(Into::into).collect())
    }
}

impl Yaml {
    /// The entry `key` of a map, inserted (as an empty map) if missing. Panics on a non-map.
    pub(super) fn entry(&mut self, key: &str) -> &mut Yaml {
        let Yaml::Map(entries) = self else { panic!("config: `{key}` set below a value that is not a map") };
        let i = match entries.iter().position(|(k, _)| k == key) {
            Some(i) => i,
            None => {
                entries.push((key.to_string(), Yaml::Map(Vec::new())));
                entries.len() - 1
            }
        };
        &mut entries[i].1
    }

    /// Sets `key` in a map, replacing an existing value.
    pub(super) fn insert(&mut self, key: &str, value: Yaml) {
        *self.entry(key) = value;
    }

    fn is_scalar(&self) -> bool {
        matches!(self, Yaml::Bare(_) | Yaml::Str(_))
    }

    /// A scalar, or a flow sequence of scalars, on one line.
    fn inline(&self) -> Option<String> {
        match self {
            Yaml::Bare(s) => Some(s.clone()),
            Yaml::Str(s) => Some(serde_json::to_string(s).expect("quote a string")),
            Yaml::Seq(items) if items.iter().all(Yaml::is_scalar) => {
                let items: Vec<String> = items.iter().filter_map(Yaml::inline).collect();
                Some(format!("[{}]", items.join(", ")))
            }
            Yaml::Map(entries) if entries.is_empty() => Some("{}".to_string()),
            _ => None,
        }
    }

    /// Writes the entries of a map, one per line, at `indent` spaces.
    fn write_entries(out: &mut String, entries: &[(String, Yaml)], indent: usize) {
        for (i, (key, value)) in entries.iter().enumerate() {
            // The first entry of a sequence item follows its `- `, already written.
            let pad = if i == 0 && out.ends_with("- ") { 0 } else { indent };
            let _ = write!(out, "{:pad$}{}:", "", yaml_key(key));
            value.write_value(out, indent);
        }
    }

    /// Writes a value after its `key:` (a line break first unless it fits on the line).
    fn write_value(&self, out: &mut String, indent: usize) {
        if let Some(text) = self.inline() {
            let _ = writeln!(out, " {text}");
            return;
        }
        out.push('\n');
        match self {
            Yaml::Map(entries) => Yaml::write_entries(out, entries, indent + 2),
            Yaml::Seq(items) => {
                for item in items {
                    let _ = write!(out, "{:indent$}  - ", "");
                    match (item, item.inline()) {
                        (_, Some(text)) => {
                            let _ = writeln!(out, "{text}");
                        }
                        (Yaml::Map(entries), None) => Yaml::write_entries(out, entries, indent + 4),
                        (other, None) => panic!("config: nested sequences are not supported: {other:?}"),
                    }
                }
            }
            Yaml::Bare(_) | Yaml::Str(_) => unreachable!("scalars are inline"),
        }
    }
}

/// A map key, quoted unless it is a plain word (registry names like `docker.io` get quotes).
fn yaml_key(key: &str) -> String {
    if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        key.to_string()
    } else {
        serde_json::to_string(key).expect("quote a key")
    }
}

/// One upstream entry of a mirrored registry: its URL plus per-upstream keys.
#[derive(Clone, Debug)]
pub struct UpstreamSpec {
    entries: Vec<(String, Yaml)>,
}

/// An upstream entry for [`FerryConfig::registry`].
pub fn upstream(url: impl Into<String>) -> UpstreamSpec {
    UpstreamSpec { entries: vec![("url".to_string(), Yaml::Str(url.into()))] }
}

impl UpstreamSpec {
    /// Sets one key of this upstream (e.g. `.opt("first_byte_timeout", "1s")`,
    /// `.opt("capabilities", ["pull"])`).
    pub fn opt(mut self, key: &str, value: impl Into<Yaml>) -> Self {
        self.entries.retain(|(k, _)| k != key);
        self.entries.push((key.to_string(), value.into()));
        self
    }

    /// `username` and `password`.
    pub fn creds(self, user: &str, password: &str) -> Self {
        self.opt("username", user).opt("password", password)
    }
}

/// The `hosted:` section: namespaces served from Ferry's own storage, and who may do what.
#[derive(Clone, Debug)]
pub struct Hosted {
    section: Yaml,
}

impl Hosted {
    /// Hosts `namespaces` (`hosted.namespaces`).
    pub fn new<const N: usize>(namespaces: [&str; N]) -> Self {
        let mut section = Yaml::Map(Vec::new());
        section.insert("namespaces", Yaml::from(namespaces));
        Hosted { section }
    }

    /// `hosted.htpasswd`: the users (see [`super::write_htpasswd`]).
    pub fn htpasswd(self, path: &Path) -> Self {
        self.opt("htpasswd", path)
    }

    /// `hosted.delete`.
    pub fn delete(self, enabled: bool) -> Self {
        self.opt("delete", enabled)
    }

    /// Appends one entry to `hosted.rules`: `users` get `access` to `namespace`.
    pub fn rule(mut self, namespace: &str, users: &[&str], access: &str) -> Self {
        let users: Vec<Yaml> = users.iter().map(|u| Yaml::from(*u)).collect();
        let rule = Yaml::Map(vec![
            ("namespace".to_string(), namespace.into()),
            ("users".to_string(), Yaml::Seq(users)),
            ("access".to_string(), access.into()),
        ]);
        match self.section.entry("rules") {
            Yaml::Seq(rules) => rules.push(rule),
            other => *other = Yaml::Seq(vec![rule]),
        }
        self
    }

    /// Sets any other key of the section (e.g. `.opt("anonymous_pull", true)`).
    pub fn opt(mut self, key: &str, value: impl Into<Yaml>) -> Self {
        self.section.insert(key, value.into());
        self
    }
}

/// A whole Ferry configuration (see the module docs).
#[derive(Clone, Debug)]
pub struct FerryConfig {
    root: Yaml,
    default_registry: Option<String>,
}

impl FerryConfig {
    /// Listens on a free loopback port and stores under `storage_root` (in an `s3` run, in the
    /// shared bucket under a prefix of its own, staging under `storage_root`); nothing mirrored
    /// yet.
    pub fn new(storage_root: impl AsRef<Path>) -> Self {
        let mut root = Yaml::Map(Vec::new());
        root.insert("listen", "127.0.0.1:0".into());
        root.entry("storage").insert("root", storage_root.as_ref().into());
        if super::on_s3() {
            let section = super::shared_s3().section(&super::s3_prefix_for(storage_root.as_ref()));
            root.entry("storage").insert("s3", section);
        }
        FerryConfig { root, default_registry: None }
    }

    /// Mirrors registry `name` from `upstreams`, tried in order. The first registry added is
    /// the default one.
    pub fn registry(mut self, name: &str, upstreams: impl IntoIterator<Item = UpstreamSpec>) -> Self {
        let upstreams: Vec<Yaml> = upstreams.into_iter().map(|u| Yaml::Map(u.entries)).collect();
        self.root.entry("registries").entry(name).insert("upstreams", Yaml::Seq(upstreams));
        self.default_registry.get_or_insert_with(|| name.to_string());
        self
    }

    /// Sets a registry-level key of mirrored registry `name` (e.g. `hedge_delay`).
    pub fn registry_opt(mut self, name: &str, key: &str, value: impl Into<Yaml>) -> Self {
        self.root.entry("registries").entry(name).insert(key, value.into());
        self
    }

    /// The `hosted:` section.
    pub fn hosted(mut self, hosted: Hosted) -> Self {
        self.root.insert("hosted", hosted.section);
        self
    }

    /// Sets the key at dotted `path` (e.g. `"cache.tag_ttl"`, `"storage.max_size"`,
    /// `"shutdown_grace"`), creating the sections on the way.
    pub fn set(mut self, path: &str, value: impl Into<Yaml>) -> Self {
        let (sections, key) = path.rsplit_once('.').map_or((None, path), |(s, k)| (Some(s), k));
        let mut node = &mut self.root;
        for section in sections.into_iter().flat_map(|s| s.split('.')) {
            node = node.entry(section);
        }
        node.insert(key, value.into());
        self
    }

    /// The YAML text.
    pub fn yaml(&self) -> String {
        let mut root = self.root.clone();
        if let Some(name) = &self.default_registry {
            root.insert("default_registry", name.as_str().into());
        }
        let Yaml::Map(entries) = &root else { unreachable!("the root is a map") };
        let mut out = String::new();
        Yaml::write_entries(&mut out, entries, 0);
        out
    }
}
