//! Seeded requests to every operation of the JSON API, generated from the
//! published schema (`docs/schema.json`): each field left out, given a
//! value of its type (paths into a sandbox holding a real store, disk and
//! junk, names that exist and names that are not names, numbers at their
//! edges) or a value of another type. Whatever comes in, a call returns an
//! answer or an error that is not `internal` and never panics; a directory
//! beside the sandbox stays as it was, and relative paths land in the
//! sandbox (its working directory). The generator is checked to reach past
//! the requests' parsing (answers, and errors of the work itself) for
//! nearly every operation. `KNIB_FUZZ_SEED` runs another seed,
//! `FUZZ_SHOW=1` prints every error and a table of outcomes.
//!
//! `agent.validate` (it boots a domain) and the vault (`s3://`) are left
//! to their own tests; `connect` is only ever the default or libvirt's
//! test driver, so no call reaches out over the network.

mod common;
#[path = "common/gen.rs"]
mod gen;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use common::disk::{make_disk, qemu_io, tree};
use gen::Rng;
use knib_core::api::call;
use knib_core::catalog::{BackupOptions, DiskSpec, Store};
use knib_core::{Control, ErrorKind};
use serde_json::{json, Map, Value};

/// Requests generated per operation.
const PER_OP: usize = 150;

struct Sandbox {
    strings: Vec<String>,
    /// How many of `strings`, from the first, are paths.
    paths: usize,
}

impl Sandbox {
    fn new(root: &Path) -> Sandbox {
        let store = root.join("store");
        let disk = root.join("disk.qcow2");
        make_disk(&disk, 4 << 20, &[]);
        qemu_io(&disk, "write -P 0x5a 0 1M");
        let s = Store::create(&store).unwrap();
        let disks = vec![DiskSpec { name: "vda".into(), path: disk.clone() }];
        let b1 = s.backup("vm1", &disks, &BackupOptions::default(), &Control::new()).unwrap();
        qemu_io(&disk, "write -P 0x5b 1M 64k");
        let b2 = s.backup("vm1", &disks, &BackupOptions::default(), &Control::new()).unwrap();
        let junk = root.join("junk.bin");
        std::fs::write(&junk, b"QFI\xfb not really a qcow2 image").unwrap();
        std::fs::create_dir(root.join("empty-dir")).unwrap();
        let file1 = s.volume_file(&b1, "vda").unwrap();
        let file2 = s.volume_file(&b2, "vda").unwrap();
        let p = |x: &Path| x.display().to_string();
        let strings = vec![
            p(&store),
            p(&disk),
            p(&junk),
            p(&root.join("empty-dir")),
            p(&root.join("missing")),
            p(&root.join("new-file.qcow2")),
            p(&root.join("empty-dir/out.raw")),
            p(&file1),
            p(&file2),
            format!("{}/../{}", p(&root.join("empty-dir")), "store"),
            "relative/path".into(),
            p(&root.join("store/vms/vm1")),
            p(&root.join("store/vms/vm1").join(&b2.id)),
            p(&root.join("store/vms/vm1").join(&b2.id).join("manifest.json")),
            b1.id.clone(),
            b2.id.clone(),
            "vm1".into(),
            "vda".into(),
            String::new(),
            "..".into(),
            "a/b".into(),
            "-rf".into(),
            "x".repeat(300),
            "nul\0byte".into(),
            "ünïcödé".into(),
            "20200101-000000000-dead".into(),
            "zstd".into(),
            "zlib".into(),
            "raw".into(),
            "qcow2".into(),
            "bitmap".into(),
            "snapshot".into(),
            "keep".into(),
            "rollback".into(),
            "discard".into(),
            "complete".into(),
        ];
        let paths = strings.iter().position(|x| *x == b1.id).unwrap();
        Sandbox { strings, paths }
    }
}

/// Resolve `$ref` against the schema's `$defs`.
fn resolve<'a>(defs: &'a Map<String, Value>, s: &'a Value) -> &'a Value {
    match s.get("$ref").and_then(Value::as_str) {
        Some(r) => resolve(defs, &defs[r.trim_start_matches("#/$defs/")]),
        None => s,
    }
}

fn types(s: &Value) -> Vec<String> {
    match s.get("type") {
        Some(Value::String(t)) => vec![t.clone()],
        Some(Value::Array(ts)) => ts.iter().filter_map(|t| t.as_str().map(str::to_string)).collect(),
        _ => Vec::new(),
    }
}

struct Gen<'a> {
    rng: Rng,
    defs: &'a Map<String, Value>,
    sandbox: &'a Sandbox,
}

impl Gen<'_> {
    fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.rng.below(xs.len() as u64) as usize].clone()
    }

    /// Any JSON value, of any type.
    fn any(&mut self, depth: u32) -> Value {
        match self.rng.below(if depth > 1 { 5 } else { 7 }) {
            0 => Value::Null,
            1 => json!(self.rng.below(2) == 0),
            2 => self.number(),
            3 | 4 => Value::String(self.string()),
            5 => Value::Array((0..self.rng.below(3)).map(|_| self.any(depth + 1)).collect()),
            _ => json!({ "path": self.string(), "x": self.any(depth + 1) }),
        }
    }

    fn number(&mut self) -> Value {
        match self.rng.below(9) {
            0 => json!(0),
            1 => json!(1),
            2 => json!(-1),
            3 => json!(u64::MAX),
            4 => json!(i64::MIN),
            5 => json!(1.5),
            6 => json!(1e300),
            7 => json!(9_007_199_254_740_993u64),
            _ => json!(self.rng.below(100_000)),
        }
    }

    fn string(&mut self) -> String {
        let strings = self.sandbox.strings.clone();
        self.pick(&strings)
    }

    /// A string for field `field`: mostly a path where one is wanted, a
    /// name elsewhere, now and then any.
    fn string_for(&mut self, field: &str) -> String {
        let pathy = [
            "store", "to", "files", "dir", "file", "disk", "parent", "child", "children", "kernel", "initrd", "root",
            "remove",
        ]
        .iter()
        .any(|w| field.contains(w))
            || field.contains("path");
        let n = self.sandbox.paths;
        // The names that exist, half the time.
        let real = match field {
            "store" => Some(0),
            "backup" => Some(n + self.rng.below(2) as usize),
            "vm" => Some(n + 2),
            "volume" => Some(n + 3),
            _ => None,
        };
        if let (Some(i), 0) = (real, self.rng.below(2)) {
            return self.sandbox.strings[i].clone();
        }
        match (self.rng.below(5), pathy) {
            (0, _) => self.string(),
            (_, true) => self.sandbox.strings[self.rng.below(n as u64) as usize].clone(),
            (_, false) => {
                let names = self.sandbox.strings[n..].to_vec();
                self.pick(&names)
            }
        }
    }

    /// A value for schema `s`: mostly of its type, sometimes not.
    fn value(&mut self, s: &Value, field: &str, depth: u32) -> Value {
        if depth > 4 {
            return self.any(depth);
        }
        let s = resolve(self.defs, s);
        if field == "connect" {
            return self.pick(&[Value::Null, json!("test:///default"), json!("qemu:///system")]);
        }
        for alt in ["anyOf", "oneOf"] {
            if let Some(Value::Array(alts)) = s.get(alt) {
                let a = alts[self.rng.below(alts.len() as u64) as usize].clone();
                return self.value(&a, field, depth + 1);
            }
        }
        if let Some(Value::Array(e)) = s.get("enum") {
            return e[self.rng.below(e.len() as u64) as usize].clone();
        }
        if let Some(c) = s.get("const") {
            return c.clone();
        }
        let ts = types(s);
        let t = if ts.is_empty() { "any".to_string() } else { self.pick(&ts) };
        match t.as_str() {
            "null" => Value::Null,
            "boolean" => json!(self.rng.below(2) == 0),
            "integer" | "number" => {
                if self.rng.below(2) == 0 {
                    json!(self.rng.below(8))
                } else {
                    self.number()
                }
            }
            "string" => Value::String(self.string_for(field)),
            "array" => {
                let item = s.get("items").cloned().unwrap_or(Value::Null);
                Value::Array((0..self.rng.below(3)).map(|_| self.value(&item, field, depth + 1)).collect())
            }
            "object" => self.object(s, depth + 1),
            _ => self.any(depth),
        }
    }

    /// An object of schema `s`: each property present or not (required
    /// ones mostly present), now and then one it does not know.
    fn object(&mut self, s: &Value, depth: u32) -> Value {
        let mut o = Map::new();
        let required: Vec<String> = s
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        if let Some(Value::Object(props)) = s.get("properties") {
            for (k, p) in props {
                let keep = if required.contains(k) { self.rng.below(12) != 0 } else { self.rng.below(2) == 0 };
                if keep {
                    let v = self.value(p, k, depth);
                    o.insert(k.clone(), v);
                }
            }
        }
        if self.rng.below(15) == 0 {
            o.insert("unknown_field".into(), json!(1));
        }
        Value::Object(o)
    }
}

#[test]
fn generated_requests_to_every_operation_never_panic_nor_fail_as_internal() {
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/schema.json")).unwrap(),
    )
    .unwrap();
    let defs = schema["$defs"].as_object().unwrap();
    let variants = defs["Request"]["oneOf"].as_array().unwrap();
    let top = tempfile::tempdir().unwrap();
    let root = top.path().join("sandbox");
    std::fs::create_dir(&root).unwrap();
    let outside = top.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("canary"), b"untouched").unwrap();
    let sandbox = Sandbox::new(&root);
    // Relative paths land in the sandbox too (this binary's one test).
    let cwd = root.join("cwd");
    std::fs::create_dir(&cwd).unwrap();
    std::env::set_current_dir(&cwd).unwrap();
    let before_outside = tree(&outside);
    // KNIB_FUZZ_SEED: another seed, for a longer hunt by hand.
    let seed = std::env::var("KNIB_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0xf022);
    let mut g = Gen { rng: Rng::new(seed), defs, sandbox: &sandbox };
    let mut failures = Vec::new();
    let mut calls = 0;
    let mut outcomes: std::collections::BTreeMap<(String, String), usize> = Default::default();
    for v in variants {
        let op = v["properties"]["op"]["const"].as_str().unwrap().to_string();
        if op == "agent.validate" {
            continue;
        }
        for _ in 0..PER_OP {
            let mut req = g.object(v, 0);
            req.as_object_mut().unwrap().remove("op");
            // One in five: one field of another type.
            if g.rng.below(5) == 0 {
                let keys: Vec<String> =
                    v["properties"].as_object().unwrap().keys().filter(|k| *k != "op").cloned().collect();
                if !keys.is_empty() {
                    let k = g.pick(&keys);
                    let x = g.any(0);
                    req[k.as_str()] = x;
                }
            }
            // No vault: its own tests reach the S3 server.
            let text = req.to_string();
            if text.contains("s3://") {
                continue;
            }
            // A budget, so nothing waits long.
            if req.get("timeout_secs").is_some_and(|t| t.as_u64().is_some_and(|t| t == 0 || t > 5)) {
                req["timeout_secs"] = json!(5);
            }
            let text = req.to_string();
            calls += 1;
            let got = catch_unwind(AssertUnwindSafe(|| call(&op, &text, &Control::new())));
            match got {
                Err(p) => {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    failures.push(format!("{op} {text}: panicked: {msg}"));
                }
                Ok(Err(e)) if e.kind == ErrorKind::Internal => failures.push(format!("{op} {text}: {e}")),
                Ok(Err(e)) => {
                    let parse = e.message.starts_with("request of")
                        || e.message.contains("unknown field")
                        || e.message.contains("invalid type");
                    *outcomes
                        .entry((op.clone(), if parse { "parse".to_string() } else { format!("{:?}", e.kind) }))
                        .or_insert(0) += 1;
                    if std::env::var("FUZZ_SHOW").is_ok() {
                        eprintln!("{op}: {e}");
                    }
                }
                Ok(Ok(_)) => *outcomes.entry((op.clone(), "ok".to_string())).or_insert(0) += 1,
            }
        }
    }
    if std::env::var("FUZZ_SHOW").is_ok() {
        eprintln!("{outcomes:#?}");
    }
    // The generator reaches past the requests' parsing: answers, and
    // errors of the work itself, for most operations.
    let answered: usize = outcomes.iter().filter(|((_, k), _)| k == "ok").map(|(_, n)| n).sum();
    let past_parse: std::collections::BTreeSet<&String> =
        outcomes.iter().filter(|((_, k), _)| k != "parse").map(|((op, _), _)| op).collect();
    eprintln!("{calls} calls, {answered} answered, {} operations past parsing", past_parse.len());
    assert!(answered >= 300, "{answered} answers of {calls} calls");
    assert!(past_parse.len() + 3 >= variants.len(), "{past_parse:?}");
    assert_eq!(tree(&outside), before_outside, "a file outside the sandbox changed");
    assert!(calls > 500, "{calls} calls");
    assert!(failures.is_empty(), "seed {seed}: {} of {calls} calls:\n{}", failures.len(), failures.join("\n"));
}
