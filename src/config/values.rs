//! Scalar value types of the config file: durations, rates, sizes, percentages and
//! switchable blocks. Each validates while it is parsed, so a bad value is reported with
//! the line, column and key path the YAML parser knows at that point.

use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A duration written with a unit: `250ms`, `2s`, `1m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    /// Whole seconds.
    pub const fn secs(s: u64) -> Self {
        Dur(Duration::from_secs(s))
    }
    /// Milliseconds.
    pub const fn millis(ms: u64) -> Self {
        Dur(Duration::from_millis(ms))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_nanos() == 0 && d.as_secs() % 60 == 0 && d.as_secs() >= 60 {
            write!(f, "{}m", d.as_secs() / 60)
        } else if d.subsec_nanos() == 0 {
            write!(f, "{}s", d.as_secs())
        } else if d.subsec_nanos() % 1_000_000 == 0 {
            write!(f, "{}ms", d.as_millis())
        } else {
            write!(f, "{}us", d.as_micros())
        }
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Parses `250ms`, `2s`, `1m`, `1h30m`; a bare number is refused because its unit would be a guess.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration; write it with a unit, like 250ms, 2s or 1m".into());
    }
    if t.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(format!(
            "duration {t:?} has no unit; write it like {t}ms or {t}s"
        ));
    }
    humantime::parse_duration(t)
        .map_err(|e| format!("invalid duration {t:?} ({e}); write it like 250ms, 2s or 1m"))
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration with a unit, like 250ms, 2s or 1m")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                parse_duration(v).map(Dur).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "duration {v} has no unit; write it like {v}ms or {v}s"
                )))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "duration {v} has no unit; write it like {v}ms or {v}s"
                )))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "duration {v} has no unit; write it like {v}s"
                )))
            }
        }
        d.deserialize_any(V)
    }
}

/// A token refill rate: `100/s`, `600/m`, `1000/h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Tokens added per `per`.
    pub tokens: u32,
    /// The period over which `tokens` are added.
    pub per: Duration,
}

impl Rate {
    /// Tokens per second, as a float (for burst defaults and headers).
    pub fn per_second(&self) -> f64 {
        self.tokens as f64 / self.per.as_secs_f64()
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "{}/{}", self.tokens, unit)
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Parses `N/s`, `N/m` or `N/h` with N a whole number of at least 1.
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let hint = "write a rate like 100/s, 600/m or 1000/h";
    let (n, unit) = s
        .trim()
        .split_once('/')
        .ok_or_else(|| format!("invalid rate {s:?}; {hint}"))?;
    let tokens: u32 = n
        .trim()
        .parse()
        .map_err(|_| format!("invalid rate {s:?}: {n:?} is not a whole number; {hint}"))?;
    if tokens == 0 {
        return Err(format!("rate {s:?} lets nothing through; use at least 1"));
    }
    let per = match unit.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        other => return Err(format!("invalid rate unit {other:?} in {s:?}; {hint}")),
    };
    Ok(Rate { tokens, per })
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Rate;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a rate like 100/s, 600/m or 1000/h")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Rate, E> {
                parse_rate(v).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Rate, E> {
                Err(E::custom(format!(
                    "rate {v} has no period; write it like {v}/s"
                )))
            }
        }
        d.deserialize_any(V)
    }
}

/// A size in bytes, written as a number or with a unit: `65536`, `64KiB`, `1MiB`, `10KB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

/// Parses a byte count with an optional binary (`KiB`, `MiB`, `GiB`) or decimal (`KB`, `MB`, `GB`) unit.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}; write it like 65536, 64KiB or 1MiB"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "Ki" => 1 << 10,
        "MiB" | "Mi" => 1 << 20,
        "GiB" | "Gi" => 1 << 30,
        "KB" | "kB" | "K" | "k" => 1_000,
        "MB" | "M" => 1_000_000,
        "GB" | "G" => 1_000_000_000,
        other => {
            return Err(format!(
                "invalid size unit {other:?} in {s:?}; use KiB, MiB, GiB (or KB, MB, GB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size like 65536, 64KiB or 1MiB")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                parse_size(v).map(Size).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
        }
        d.deserialize_any(V)
    }
}

/// A share written as a percentage: `50%` (a number from 0 to 100 is read as percent too).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Percent(pub f64);

impl Percent {
    /// The share as a fraction between 0 and 1.
    pub fn fraction(&self) -> f64 {
        self.0 / 100.0
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0)
    }
}

impl Serialize for Percent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

fn check_percent(v: f64) -> Result<Percent, String> {
    if !(v > 0.0 && v <= 100.0) {
        return Err(format!(
            "percentage {v} is out of range; use a value above 0% and at most 100%"
        ));
    }
    Ok(Percent(v))
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Percent;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a percentage like 50%")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Percent, E> {
                let n = v.trim().strip_suffix('%').ok_or_else(|| {
                    E::custom(format!("invalid percentage {v:?}; write it like 50%"))
                })?;
                let f: f64 = n.trim().parse().map_err(|_| {
                    E::custom(format!("invalid percentage {v:?}; write it like 50%"))
                })?;
                check_percent(f).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Percent, E> {
                check_percent(v as f64).map_err(E::custom)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Percent, E> {
                if v < 1.0 {
                    // 0.5 is far more likely meant as 50% than as half a percent.
                    return Err(E::custom(format!(
                        "ambiguous percentage {v}; write it with a % sign, like {}% or {v}%",
                        v * 100.0
                    )));
                }
                check_percent(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A block that is either configured or switched off with `false` (or `off`).
#[derive(Debug, Clone, PartialEq)]
pub enum Toggle<T> {
    /// `false` / `off`: the block is switched off, even if the policy has it.
    Off,
    /// The block's settings.
    On(T),
}

impl<T> Toggle<T> {
    /// The settings when the block is on.
    pub fn on(&self) -> Option<&T> {
        match self {
            Toggle::Off => None,
            Toggle::On(t) => Some(t),
        }
    }
}

impl<T: Serialize> Serialize for Toggle<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Toggle::Off => s.serialize_bool(false),
            Toggle::On(t) => t.serialize(s),
        }
    }
}

fn is_off_word(v: &str) -> bool {
    matches!(
        v.trim(),
        "false" | "off" | "False" | "Off" | "OFF" | "FALSE"
    )
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Toggle<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Toggle<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a block of settings, or false to switch it off")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                if v {
                    Err(E::custom(
                        "`true` is not a block of settings; give the settings, or `false` to switch it off",
                    ))
                } else {
                    Ok(Toggle::Off)
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                if is_off_word(v) {
                    Ok(Toggle::Off)
                } else {
                    Err(E::custom(format!(
                        "{v:?} is not a block of settings; give the settings, or `false` to switch it off"
                    )))
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Toggle::On)
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// The route timeout: a duration, or `false`/`off` for none (long-lived streams).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TimeoutSetting {
    /// No whole-request deadline.
    Off,
    /// The whole-request deadline.
    After(Dur),
}

impl Serialize for TimeoutSetting {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TimeoutSetting::Off => s.serialize_bool(false),
            TimeoutSetting::After(d) => d.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for TimeoutSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = TimeoutSetting;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration like 2s, or false for no timeout")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<TimeoutSetting, E> {
                if v {
                    Err(E::custom(
                        "`true` is not a timeout; write a duration like 15s, or false",
                    ))
                } else {
                    Ok(TimeoutSetting::Off)
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TimeoutSetting, E> {
                if is_off_word(v) {
                    return Ok(TimeoutSetting::Off);
                }
                let d = parse_duration(v).map_err(E::custom)?;
                if d.is_zero() {
                    return Err(E::custom(
                        "a timeout of 0 would fail every request; use false to switch it off",
                    ));
                }
                Ok(TimeoutSetting::After(Dur(d)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<TimeoutSetting, E> {
                Err(E::custom(format!(
                    "timeout {v} has no unit; write it like {v}ms or {v}s"
                )))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("25").unwrap_err().contains("no unit"));
        assert!(parse_duration("fast").is_err());
        assert_eq!(Dur::millis(250).to_string(), "250ms");
        assert_eq!(Dur::secs(120).to_string(), "2m");
    }

    #[test]
    fn rates() {
        let r = parse_rate("100/s").unwrap();
        assert_eq!((r.tokens, r.per), (100, Duration::from_secs(1)));
        assert_eq!(parse_rate("600/m").unwrap().per, Duration::from_secs(60));
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("100").is_err());
        assert!(parse_rate("100/d").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("10KB").unwrap(), 10_000);
        assert_eq!(parse_size("123").unwrap(), 123);
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }
}
