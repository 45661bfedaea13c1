//! Where a vault is and how to reach it: the location `s3://bucket/prefix`,
//! and the endpoint, region and credentials from the usual AWS environment
//! variables, then the shared config files for what they leave out; and
//! how long a transfer may stall (`KNIB_VAULT_STALL_TIMEOUT`, module `net`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::{BackoffConfig, RetryConfig};

use crate::error::{KnibError, Result};

/// `(bucket, prefix)` of `s3://bucket[/prefix]`; the prefix's parts are
/// plain names (no `.`, `..` or empty part), the bucket an S3 bucket name.
pub(super) fn parse_location(location: &str) -> Result<(String, String)> {
    let bad =
        |why: &str| KnibError::invalid(format!("vault location {location:?}: {why} (expected s3://BUCKET/PREFIX)"));
    let rest = location.strip_prefix("s3://").ok_or_else(|| bad("it does not start with s3://"))?;
    let rest = rest.trim_end_matches('/');
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        && bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !bucket_ok {
        return Err(bad(&format!("{bucket:?} is not a bucket name (3 to 63 lower-case letters, digits, '-' and '.')")));
    }
    for part in prefix.split('/').filter(|_| !prefix.is_empty()) {
        crate::names::validate("vault prefix part", part).map_err(|e| bad(&e.message))?;
    }
    Ok((bucket.to_string(), prefix.to_string()))
}

/// How a failed request is retried: by the S3 client, and by a direct
/// backup for the parts it sends itself (`spool`).
pub(super) fn retry() -> RetryConfig {
    RetryConfig { backoff: BackoffConfig::default(), max_retries: 5, retry_timeout: Duration::from_secs(120) }
}

/// What the environment and the config files say.
pub(super) struct Settings {
    endpoint: Option<String>,
    region: Option<String>,
    access_key: Option<String>,
    secret_key: Option<String>,
    token: Option<String>,
    /// How long a transfer may go without a byte moving (module `net`).
    stall: Duration,
}

/// The variable that sets [`Settings::stall`], in seconds.
const STALL_VAR: &str = "KNIB_VAULT_STALL_TIMEOUT";

/// The stall timeout `KNIB_VAULT_STALL_TIMEOUT` says (seconds, more than
/// 0, at most a day), or the default.
fn stall_timeout() -> Result<Duration> {
    let Some(v) = env(STALL_VAR) else { return Ok(super::net::DEFAULT_STALL) };
    match v.trim().parse::<f64>() {
        Ok(s) if s > 0.0 && s <= 86_400.0 => Ok(Duration::from_secs_f64(s)),
        _ => Err(KnibError::invalid(format!(
            "{STALL_VAR}={v:?}: not a number of seconds between 0 and 86400 (how long a vault transfer may go without a byte moving)"
        ))),
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The sections of an INI file (`[name]`, `key = value`); a missing or
/// unreadable file is empty.
fn ini(path: &PathBuf) -> HashMap<String, HashMap<String, String>> {
    let mut out: HashMap<String, HashMap<String, String>> = HashMap::new();
    let Ok(text) = std::fs::read_to_string(path) else { return out };
    let mut section = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.trim().to_string();
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            out.entry(section.clone()).or_default().insert(k.trim().to_lowercase(), v.trim().to_string());
        }
    }
    out
}

impl Settings {
    /// The environment first (`AWS_ENDPOINT_URL` or `AWS_ENDPOINT`,
    /// `AWS_REGION` or `AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), then profile
    /// `AWS_PROFILE` (or `default`) of the credentials file and the config
    /// file (`[profile NAME]`, or `[default]`).
    pub(super) fn load() -> Result<Settings> {
        let mut s = Settings {
            endpoint: env("AWS_ENDPOINT_URL").or_else(|| env("AWS_ENDPOINT")),
            region: env("AWS_REGION").or_else(|| env("AWS_DEFAULT_REGION")),
            access_key: env("AWS_ACCESS_KEY_ID"),
            secret_key: env("AWS_SECRET_ACCESS_KEY"),
            token: env("AWS_SESSION_TOKEN"),
            stall: stall_timeout()?,
        };
        let home = env("HOME").map(PathBuf::from);
        let file = |var: &str, name: &str| {
            env(var).map(PathBuf::from).or_else(|| home.as_ref().map(|h| h.join(".aws").join(name)))
        };
        let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".to_string());
        let from_env_keys = s.access_key.is_some();
        if let Some(path) = file("AWS_SHARED_CREDENTIALS_FILE", "credentials") {
            if let Some(sec) = ini(&path).remove(&profile) {
                if !from_env_keys {
                    s.access_key = sec.get("aws_access_key_id").cloned();
                    s.secret_key = sec.get("aws_secret_access_key").cloned();
                    s.token = sec.get("aws_session_token").cloned();
                }
            }
        }
        if let Some(path) = file("AWS_CONFIG_FILE", "config") {
            let mut all = ini(&path);
            let name = if profile == "default" { "default".to_string() } else { format!("profile {profile}") };
            if let Some(sec) = all.remove(&name) {
                s.region = s.region.or_else(|| sec.get("region").cloned());
                s.endpoint = s.endpoint.or_else(|| sec.get("endpoint_url").cloned());
                if s.access_key.is_none() {
                    s.access_key = sec.get("aws_access_key_id").cloned();
                    s.secret_key = sec.get("aws_secret_access_key").cloned();
                    s.token = sec.get("aws_session_token").cloned();
                }
            }
        }
        Ok(s)
    }

    /// The strings to blank out of messages.
    pub(super) fn secrets(&self) -> Vec<String> {
        [&self.access_key, &self.secret_key, &self.token].into_iter().flatten().cloned().collect()
    }

    /// The region requests are signed for: the one configured, else
    /// `us-east-1`.
    pub(super) fn region(&self) -> String {
        self.region.clone().unwrap_or_else(|| "us-east-1".to_string())
    }

    /// How long a transfer may go without a byte moving (module `net`).
    pub(super) fn stall(&self) -> Duration {
        self.stall
    }

    /// The client for `bucket`: path-style requests (what a local server
    /// and Ceph RGW expect), retries with backoff on transient failures,
    /// sent through `net`'s connector (no total timeout per request: a
    /// transfer fails when it stalls).
    pub(super) fn build(&self, bucket: &str) -> object_store::Result<AmazonS3> {
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(self.region())
            .with_retry(retry())
            .with_http_connector(super::net::Connector { stall: self.stall });
        if let Some(e) = &self.endpoint {
            b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
        }
        if let Some(k) = &self.access_key {
            b = b.with_access_key_id(k);
        }
        if let Some(k) = &self.secret_key {
            b = b.with_secret_access_key(k);
        }
        if let Some(t) = &self.token {
            b = b.with_token(t);
        }
        b.build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_are_parsed_and_checked() {
        assert_eq!(parse_location("s3://knib-vault").unwrap(), ("knib-vault".into(), String::new()));
        assert_eq!(parse_location("s3://b12/a/b/").unwrap(), ("b12".into(), "a/b".into()));
        for bad in ["s3:/x", "/srv", "s3://B", "s3://ab", "s3://bucket/../x", "s3://bucket/a//b", "s3://bucket/.a"] {
            let e = parse_location(bad).unwrap_err();
            assert_eq!(e.kind, crate::ErrorKind::InvalidInput, "{bad}: {e}");
        }
    }

    #[test]
    fn ini_files_are_read_by_section() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("credentials");
        std::fs::write(&p, "# c\n[default]\naws_access_key_id = A\n[profile x]\nregion=eu\n").unwrap();
        let m = ini(&p);
        assert_eq!(m["default"]["aws_access_key_id"], "A");
        assert_eq!(m["profile x"]["region"], "eu");
    }
}
