//! One way to write a duration everywhere (configuration, job API,
//! pipelines, the CLI): humantime's, `"90s"`, `"30m"`, `"1h 30m"`,
//! `"500ms"`, `"7days"`. The older forms (a bare number of seconds, in
//! `*_secs` keys, in `stop_grace = 3.0`, or as `"90"`) are still read, with
//! a deprecation warning naming what to write instead.

use std::time::Duration;

/// A humantime duration; a bare number of seconds is read too (deprecated:
/// `what` names it in the warning).
pub fn parse(text: &str, what: &str) -> Result<Duration, String> {
    let t = text.trim();
    if let Ok(secs) = t.parse::<f64>() {
        let d = from_secs(secs)?;
        deprecated(what, &format!("{t:?}"), d);
        return Ok(d);
    }
    humantime::parse_duration(t)
        .map_err(|e| format!("{t:?} is not a duration ({e}; write e.g. \"90s\", \"30m\", \"2h\")"))
}

/// How berth writes a duration back (`"1h 30m"`).
pub fn format(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn from_secs(secs: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{secs} seconds: {e}"))
}

fn deprecated(what: &str, old: &str, d: Duration) {
    tracing::warn!(
        "{what}: a duration as a number of seconds ({old}) is deprecated; write \"{}\"",
        format(d)
    );
}

/// serde for a `Duration` field: a humantime string, or (deprecated) a
/// number of seconds; written as a humantime string. Numbers are read
/// without a word: the configuration's loader names deprecated keys, the
/// job API its deprecated fields.
pub mod text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(*d))
    }

    /// A duration as written: a number of seconds (old) or text.
    #[derive(Deserialize)]
    #[serde(untagged)]
    pub enum Raw {
        Secs(u64),
        Float(f64),
        Text(String),
    }

    impl Raw {
        pub fn duration(self, what: &str) -> Result<Duration, String> {
            match self {
                // The old form; whoever reads it names the key in a
                // warning ([`super::deprecated_keys`], the job API).
                Raw::Secs(s) => Ok(Duration::from_secs(s)),
                Raw::Float(s) => super::from_secs(s),
                Raw::Text(t) => super::parse(&t, what),
            }
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Raw::deserialize(d)?
            .duration("a duration field")
            .map_err(serde::de::Error::custom)
    }

    /// The same for an optional field.
    pub mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            Option::<super::Raw>::deserialize(d)?
                .map(|r| r.duration("a duration field"))
                .transpose()
                .map_err(serde::de::Error::custom)
        }
    }
}

/// Keys of a berth.toml that still use an old form, each with what to write
/// instead (warned about once at load, by key).
pub fn deprecated_keys(doc: &toml::Table) -> Vec<String> {
    let mut out = Vec::new();
    for (section, table) in doc.iter().filter_map(|(k, v)| Some((k, v.as_table()?))) {
        for (key, value) in table {
            let secs = match value {
                toml::Value::Integer(i) => *i as f64,
                toml::Value::Float(f) => *f,
                _ => continue,
            };
            let Ok(d) = from_secs(secs) else { continue };
            let new = key.strip_suffix("_secs");
            if new.is_some() || DURATION_KEYS.contains(&key.as_str()) {
                out.push(format!(
                    "[{section}] {key} = {value} is deprecated: write {} = \"{}\"",
                    new.unwrap_or(key),
                    format(d)
                ));
            }
        }
    }
    out
}

/// Duration keys that never had a `_secs` suffix.
const DURATION_KEYS: &[&str] = &["stop_grace", "health_interval", "ready_timeout"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_format_and_the_old_ones() {
        assert_eq!(parse("90s", "t").unwrap(), Duration::from_secs(90));
        assert_eq!(parse("1h 30m", "t").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("2d", "t").unwrap(), Duration::from_secs(172_800));
        assert_eq!(parse("500ms", "t").unwrap(), Duration::from_millis(500));
        // Old: a bare number of seconds.
        assert_eq!(parse("90", "t").unwrap(), Duration::from_secs(90));
        assert_eq!(parse("0.5", "t").unwrap(), Duration::from_millis(500));
        for bad in ["", "ten", "10 parsecs", "-5", "5x"] {
            assert!(parse(bad, "t").is_err(), "{bad:?}");
        }
        assert_eq!(format(Duration::from_secs(5400)), "1h 30m");
    }

    #[test]
    fn fields_read_text_and_numbers_and_write_text() {
        #[derive(serde::Deserialize, serde::Serialize)]
        struct C {
            #[serde(with = "text")]
            d: Duration,
            #[serde(with = "text::option", default)]
            o: Option<Duration>,
        }
        for (src, want) in [("d = \"10m\"", 600), ("d = 600", 600), ("d = 2.5", 2)] {
            let c: C = toml::from_str(src).unwrap();
            assert_eq!(c.d.as_secs(), want, "{src}");
            assert_eq!(c.o, None);
        }
        let c: C = toml::from_str("d = \"1s\"\no = \"1h\"").unwrap();
        assert_eq!(c.o, Some(Duration::from_secs(3600)));
        assert_eq!(toml::to_string(&c).unwrap(), "d = \"1s\"\no = \"1h\"\n");
        assert!(toml::from_str::<C>("d = \"soon\"").is_err());
        assert!(toml::from_str::<C>("d = -1").is_err());
    }

    #[test]
    fn old_keys_are_named_with_their_new_form() {
        let doc: toml::Table = toml::from_str(
            "[serve]\ndrain_secs = 10\nlisten = \"0.0.0.0:2376\"\ndrain = \"5s\"\n\
             [sandbox]\nstop_grace = 3.0\nuid_ranges = 8\n",
        )
        .unwrap();
        assert_eq!(
            deprecated_keys(&doc),
            vec![
                "[sandbox] stop_grace = 3.0 is deprecated: write stop_grace = \"3s\"",
                "[serve] drain_secs = 10 is deprecated: write drain = \"10s\"",
            ]
        );
    }
}
