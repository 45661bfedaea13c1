//! The S3 server of the vault tests: a real Ceph RGW started by
//! `scripts/ceph.sh start`, which writes its endpoint, credentials and test
//! bucket to `$KNIB_CEPH_DIR/s3.env` (default `/var/tmp/knib-ceph/s3.env`).
//! The settings are taken from the environment when `AWS_ENDPOINT_URL` and
//! `KNIB_S3_BUCKET` are set there, else from that file. With neither, the
//! tests fail saying how to start the server, unless `KNIB_NO_S3=1` (then
//! they are skipped, saying so).
//!
//! Every test works under a prefix of its own (`s3://BUCKET/t-NAME-PID-N`),
//! removed by [`Prefix`]'s drop.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::{ObjectStore, PutPayload};

/// The settings file `scripts/ceph.sh` writes.
pub fn env_file() -> PathBuf {
    let dir = std::env::var("KNIB_CEPH_DIR").unwrap_or_else(|_| "/var/tmp/knib-ceph".into());
    PathBuf::from(dir).join("s3.env")
}

/// The S3 settings (KEY -> value), or `None` when the tests are skipped.
pub fn settings() -> Option<&'static BTreeMap<String, String>> {
    static S: OnceLock<Option<BTreeMap<String, String>>> = OnceLock::new();
    S.get_or_init(|| {
        let mut m = BTreeMap::new();
        if std::env::var("AWS_ENDPOINT_URL").is_ok() && std::env::var("KNIB_S3_BUCKET").is_ok() {
            for (k, v) in std::env::vars() {
                if k.starts_with("AWS_") || k.starts_with("KNIB_S3_") {
                    m.insert(k, v);
                }
            }
            return Some(m);
        }
        match std::fs::read_to_string(env_file()) {
            Ok(text) => {
                for line in text.lines() {
                    if let Some((k, v)) = line.split_once('=') {
                        m.insert(k.trim().to_string(), v.trim().to_string());
                    }
                }
                Some(m)
            }
            Err(_) if std::env::var("KNIB_NO_S3").as_deref() == Ok("1") => None,
            Err(e) => panic!(
                "no S3 server for the vault tests ({}: {e}): start one with `bash scripts/ceph.sh start` \
                 (or set KNIB_NO_S3=1 to skip these tests)",
                env_file().display()
            ),
        }
    })
    .as_ref()
}

/// Put the S3 settings in this process's environment (where the vault
/// reads them); false when the tests are skipped.
pub fn setup() -> bool {
    let Some(s) = settings() else {
        eprintln!("KNIB_NO_S3=1 and no S3 server: vault test skipped");
        return false;
    };
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        for (k, v) in s {
            std::env::set_var(k, v);
        }
    });
    true
}

/// The test bucket.
pub fn bucket() -> String {
    settings().and_then(|s| s.get("KNIB_S3_BUCKET").cloned()).unwrap_or_else(|| "knib-test".into())
}

/// The secret key the tests use (it must never be printed).
pub fn secret() -> String {
    settings().and_then(|s| s.get("AWS_SECRET_ACCESS_KEY").cloned()).unwrap_or_default()
}

/// The access key id.
pub fn access_key() -> String {
    settings().and_then(|s| s.get("AWS_ACCESS_KEY_ID").cloned()).unwrap_or_default()
}

/// A raw S3 client of the test bucket (to look at and damage objects).
pub fn raw() -> (tokio::runtime::Runtime, AmazonS3) {
    let s = settings().expect("S3 settings");
    let endpoint = &s["AWS_ENDPOINT_URL"];
    let store = AmazonS3Builder::new()
        .with_bucket_name(bucket())
        .with_region(s.get("AWS_REGION").cloned().unwrap_or_else(|| "us-east-1".into()))
        .with_endpoint(endpoint)
        .with_allow_http(endpoint.starts_with("http://"))
        .with_access_key_id(&s["AWS_ACCESS_KEY_ID"])
        .with_secret_access_key(&s["AWS_SECRET_ACCESS_KEY"])
        .build()
        .expect("an S3 client");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    (rt, store)
}

/// A prefix of the test bucket for one test, emptied when dropped.
pub struct Prefix {
    /// `prefix` (no bucket, no slashes around).
    pub prefix: String,
}

impl Prefix {
    /// A new prefix named after `name`.
    pub fn new(name: &str) -> Prefix {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let prefix = format!("t-{name}-{}-{nanos}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
        Prefix { prefix }
    }

    /// `s3://BUCKET/PREFIX`.
    pub fn location(&self) -> String {
        format!("s3://{}/{}", bucket(), self.prefix)
    }

    /// The keys under the prefix (relative to it), with their sizes.
    pub fn keys(&self) -> BTreeMap<String, u64> {
        use futures::TryStreamExt;
        let (rt, s3) = raw();
        let p = Key::from(self.prefix.as_str());
        let list: Vec<_> = rt.block_on(async { s3.list(Some(&p)).try_collect::<Vec<_>>().await }).unwrap();
        list.into_iter().map(|o| (o.location.as_ref()[self.prefix.len() + 1..].to_string(), o.size)).collect()
    }

    /// The bytes of `rel`.
    pub fn get(&self, rel: &str) -> Vec<u8> {
        let (rt, s3) = raw();
        let k = Key::from(format!("{}/{rel}", self.prefix));
        rt.block_on(async { s3.get(&k).await.unwrap().bytes().await.unwrap().to_vec() })
    }

    /// Replace `rel` with `data`.
    pub fn put(&self, rel: &str, data: Vec<u8>) {
        let (rt, s3) = raw();
        let k = Key::from(format!("{}/{rel}", self.prefix));
        rt.block_on(async { s3.put(&k, PutPayload::from(data)).await.unwrap() });
    }
}

impl Prefix {
    /// Put an empty "folder" marker object `rel/`, as an S3 console's
    /// "Create folder" does (see [`Prefix::raw`]).
    pub fn put_folder_marker(&self, rel: &str) {
        self.raw("PUT", &format!("{rel}/"));
    }

    /// Send `method` (PUT with no bytes, or DELETE) for the exact key
    /// `PREFIX/rel`, which the object store client may not be able to name
    /// (a trailing slash, an empty segment): sent by curl, signed with
    /// SigV4.
    pub fn raw(&self, method: &str, rel: &str) {
        let s = settings().expect("S3 settings");
        let url = format!("{}/{}/{}/{rel}", s["AWS_ENDPOINT_URL"].trim_end_matches('/'), bucket(), self.prefix);
        let region = s.get("AWS_REGION").cloned().unwrap_or_else(|| "us-east-1".into());
        let out = std::process::Command::new("curl")
            // RGW wants the payload's hash signed: that of no bytes.
            .args(["-sS", "-f", "--path-as-is", "-X", method, "--data-binary", "", "-H"])
            .arg("x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
            .arg("--aws-sigv4")
            .arg(format!("aws:amz:{region}:s3"))
            .arg("--user")
            .arg(format!("{}:{}", access_key(), secret()))
            .arg(&url)
            .output()
            .expect("curl runs");
        assert!(out.status.success(), "{method} {url}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Remove `rel`.
    pub fn delete(&self, rel: &str) {
        let (rt, s3) = raw();
        let k = Key::from(format!("{}/{rel}", self.prefix));
        rt.block_on(async { s3.delete(&k).await.unwrap() });
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        if settings().is_none() {
            return;
        }
        use futures::TryStreamExt;
        let (rt, s3) = raw();
        // Not `keys()`: a listing that fails (a key the client cannot
        // name, left by a failed test) must not panic while unwinding.
        let p = Key::from(self.prefix.as_str());
        let Ok(list) = rt.block_on(async { s3.list(Some(&p)).try_collect::<Vec<_>>().await }) else { return };
        for o in list {
            let _ = rt.block_on(async { s3.delete(&o.location).await });
        }
    }
}
