//! The config file: YAML model ([`model`]), value types ([`values`]), loading with
//! located errors, and semantic validation (`validate`) that resolves each route's
//! effective policy. A config with any error is never applied.

pub mod model;
mod validate;
pub mod values;

use std::fmt;
use std::path::{Path, PathBuf};

pub use model::*;
pub use validate::{EffectiveRoute, DEFAULT_TIMEOUT};

/// One problem in a config file, with where it is and how to fix it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// The file the error is in.
    pub file: String,
    /// 1-based line, 0 when unknown.
    pub line: u64,
    /// 1-based column, 0 when unknown.
    pub column: u64,
    /// Key path like `listeners[0].routes[2].retry.backoff.base`.
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub hint: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(h) = &self.hint {
            write!(f, "\n  hint: {h}")?;
        }
        Ok(())
    }
}

/// Every problem found in a config file.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "error: {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A loaded, validated config and the routes it resolves to.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The file it came from.
    pub path: PathBuf,
    /// The config as written (defaults filled in).
    pub config: Config,
    /// Each route with its policy resolved, in listener order.
    pub routes: Vec<EffectiveRoute>,
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Loaded, ConfigErrors> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: file.clone(),
            line: 0,
            column: 0,
            path: String::new(),
            message: format!("cannot read the config file: {e}"),
            hint: Some(
                "pass the file with -c FILE or set BREAKWATER_CONFIG (default config/breakwater.yaml)"
                    .into(),
            ),
        }])
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    from_yaml(&text, &file, base)
}

/// Parses and validates config text; `file` names it in errors and `base` resolves relative paths.
pub fn from_yaml(text: &str, file: &str, base: &Path) -> Result<Loaded, ConfigErrors> {
    let mut config = parse(text, file)?;
    let routes = validate::validate(&mut config, file, base)?;
    Ok(Loaded {
        path: PathBuf::from(file),
        config,
        routes,
    })
}

fn parse(text: &str, file: &str) -> Result<Config, ConfigErrors> {
    use serde::Deserialize;
    let mut track = serde_path_to_error::Track::new();
    let result = serde_saphyr::with_deserializer_from_str(text, |de| {
        let de = serde_path_to_error::Deserializer::new(de, &mut track);
        Config::deserialize(de)
    });
    result.map_err(|e| {
        // `Spanned` wrappers show up as a `.value` segment; users never wrote it.
        let path = track.path().to_string().replace(".value", "");
        let path = if path == "?" || path == "." {
            String::new()
        } else {
            path
        };
        let (line, column) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        let raw = e.without_snippet().to_string();
        let message = strip_location(&raw);
        // A missing key is reported at its parent; name the key itself.
        let path = match message
            .strip_prefix("missing field `")
            .and_then(|m| m.split('`').next())
        {
            Some(field) if path.is_empty() => field.to_string(),
            Some(field) => format!("{path}.{field}"),
            None => path,
        };
        let hint = hint_for(&message);
        ConfigErrors(vec![ConfigError {
            file: file.to_string(),
            line,
            column,
            path,
            message,
            hint,
        }])
    })
}

/// The parser puts its own "line X column Y" into messages; ours has a separate place for it.
fn strip_location(raw: &str) -> String {
    let mut s = raw.trim().to_string();
    if let Some(rest) = s.strip_prefix("error: ") {
        s = rest.to_string();
    }
    if let Some(idx) = s.find(" at line ") {
        s.truncate(idx);
    }
    if s.starts_with("line ") {
        if let Some(idx) = s.find(": ") {
            s = s[idx + 2..].to_string();
        }
    }
    s
}

fn hint_for(message: &str) -> Option<String> {
    if message.contains("unknown field") {
        Some("remove the key or fix its spelling; the keys allowed here are listed above".into())
    } else if message.contains("missing field") {
        Some("add the key; it has no default".into())
    } else if message.contains("invalid type") {
        Some("check the value's type against the config reference (docs/config.md)".into())
    } else {
        None
    }
}

#[cfg(test)]
mod tests;
