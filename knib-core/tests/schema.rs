//! The one API's schema and everything written from it: fails when the
//! checked-in `docs/schema.json` differs from the one `knib_core::api`
//! generates, when the operation table of the README or the operation
//! reference of `include/knib.h` (its preamble, from
//! `knib-ffi/cbindgen.toml`: every operation's request fields, answer type
//! and worked example, and every object type) is not what the schema
//! gives, when a worked example of `knib-ffi/examples.json` is not a valid
//! request of its operation or names an answer field the schema does not
//! have, or when the Java facade's request and answer classes have fields
//! the schema does not (or lack its required ones, or have public fields).
//!
//! `KNIB_WRITE_SCHEMA=1 cargo test -p knib-core --test schema` rewrites the
//! generated parts (the schema file and the tables between their markers in
//! README.md, knib-ffi/cbindgen.toml and include/knib.h) instead of
//! checking them; review and commit the result.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use knib_core::api::{schema, OPS};
use regex::Regex;
use serde_json::Value;

const README_BEGIN: &str = "<!-- operations: generated from docs/schema.json by knib-core/tests/schema.rs -->";
const README_END: &str = "<!-- operations: end -->";
const HEADER_BEGIN: &str = " *   (generated from docs/schema.json by knib-core/tests/schema.rs)";
const HEADER_END: &str = " *   (end of the generated table)";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace holds knib-core").to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn writing() -> bool {
    std::env::var_os("KNIB_WRITE_SCHEMA").is_some()
}

fn write(rel: &str, text: &str) {
    std::fs::write(root().join(rel), text).unwrap_or_else(|e| panic!("{rel}: {e}"));
}

fn schema_text() -> String {
    serde_json::to_string_pretty(&schema()).expect("the schema serializes") + "\n"
}

/// The schema `s` stands for, `$ref`s followed and `Option`s (`anyOf` with
/// null) unwrapped.
fn resolve<'a>(root: &'a Value, mut s: &'a Value) -> &'a Value {
    loop {
        if let Some(r) = s.get("$ref").and_then(Value::as_str) {
            let name = r.strip_prefix("#/$defs/").unwrap_or_else(|| panic!("unexpected $ref {r}"));
            s = &root["$defs"][name];
        } else if let Some(any) = s.get("anyOf").and_then(Value::as_array) {
            match any.iter().find(|a| a.get("type") != Some(&Value::from("null"))) {
                Some(a) => s = a,
                None => return s,
            }
        } else {
            return s;
        }
    }
}

/// The schema of an object's fields: (name, required), or None when `s`
/// is not an object.
fn fields(root: &Value, s: &Value) -> Option<Vec<(String, bool)>> {
    let s = resolve(root, s);
    let props = s.get("properties")?.as_object()?;
    let required: BTreeSet<&str> =
        s.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
    Some(props.keys().filter(|k| *k != "op").map(|k| (k.clone(), required.contains(k.as_str()))).collect())
}

/// Each operation's (description, request schema, answer schema).
fn operations(s: &Value) -> BTreeMap<String, (String, Value, Value)> {
    let request = resolve(s, &s["request"]);
    let mut out = BTreeMap::new();
    for v in request["oneOf"].as_array().expect("the request is a oneOf") {
        let op = v["properties"]["op"]["const"].as_str().expect("each variant has its op").to_string();
        let what = v["description"].as_str().unwrap_or_default().to_string();
        let answer = s["answers"][&op].clone();
        out.insert(op, (what, v.clone(), answer));
    }
    out
}

fn request_cell(s: &Value, req: &Value) -> String {
    let f = fields(s, req).expect("a request is an object");
    if f.is_empty() {
        return "(none)".into();
    }
    f.iter().map(|(n, r)| format!("{n}{}", if *r { "" } else { "?" })).collect::<Vec<_>>().join(", ")
}

fn answer_cell(s: &Value, ans: &Value) -> String {
    let a = resolve(s, ans);
    if let Some(items) = a.get("items") {
        return format!("[{}]", answer_cell(s, items));
    }
    match fields(s, a) {
        Some(f) => f.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", "),
        None => "?".into(),
    }
}

/// The README's table.
fn readme_table(s: &Value) -> String {
    let mut t =
        String::from("| op | what it does | request fields (`?`: optional) | answer fields |\n|---|---|---|---|\n");
    for (op, (what, req, ans)) in operations(s) {
        t += &format!("| `{op}` | {what} | {} | {} |\n", request_cell(s, &req), answer_cell(s, &ans));
    }
    t
}

/// `first` and the words of `text`, in comment lines of at most `width`
/// characters, the later ones aligned under the first word.
fn wrap(first: &str, text: &str, width: usize) -> Vec<String> {
    let cont = format!(" *{}", " ".repeat(first.len() - 2));
    let mut lines = Vec::new();
    let mut line = first.to_string();
    for w in text.split_whitespace() {
        // (`cont` is as long as `first`: longer means a word is on the line.)
        if line.len() > first.len() && line.len() + 1 + w.len() > width {
            lines.push(std::mem::replace(&mut line, cont.clone()));
        }
        line.push(' ');
        line += w;
    }
    lines.push(line);
    lines
}

/// A description of the schema, on one line.
fn describe(s: &Value) -> String {
    s.get("description").and_then(Value::as_str).unwrap_or_default().split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The name of the `$defs` object type `s` refers to, if it does.
fn object_ref<'a>(root: &Value, s: &'a Value) -> Option<&'a str> {
    let name = s.get("$ref")?.as_str()?.strip_prefix("#/$defs/")?;
    root["$defs"][name].get("properties").map(|_| name)
}

/// How the header names the type of schema `s`: `string`, `[Disk]`,
/// `"zstd" | "zlib"`, `integer or null`; every object type it names is
/// added to `objects`.
fn type_name(root: &Value, s: &Value, objects: &mut BTreeSet<String>) -> String {
    if let Some(name) = object_ref(root, s) {
        objects.insert(name.to_string());
        return name.to_string();
    }
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        let name = r.strip_prefix("#/$defs/").unwrap_or_else(|| panic!("unexpected $ref {r}"));
        return type_name(root, &root["$defs"][name], objects);
    }
    if let Some(values) = s.get("enum").and_then(Value::as_array) {
        return values.iter().map(Value::to_string).collect::<Vec<_>>().join(" | ");
    }
    if let Some(any) = s.get("anyOf").or_else(|| s.get("oneOf")).and_then(Value::as_array) {
        let nullable = any.iter().any(|a| a.get("type") == Some(&Value::from("null")));
        let parts: Vec<String> = any
            .iter()
            .filter(|a| a.get("type") != Some(&Value::from("null")))
            .map(|a| type_name(root, a, objects))
            .collect();
        return parts.join(" | ") + if nullable { " or null" } else { "" };
    }
    if let Some(c) = s.get("const") {
        return c.to_string();
    }
    let types: Vec<&str> = match &s["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec!["any"],
    };
    let nullable = types.contains(&"null");
    let ty = types.iter().find(|t| **t != "null").copied().unwrap_or("null");
    let name = match ty {
        "array" => format!("[{}]", s.get("items").map(|i| type_name(root, i, objects)).unwrap_or_else(|| "any".into())),
        "object" => match s.get("additionalProperties") {
            Some(v) if v.is_object() => format!("{{string: {}}}", type_name(root, v, objects)),
            _ => "object".into(),
        },
        t => t.to_string(),
    };
    if nullable && ty != "null" {
        name + " or null"
    } else {
        name
    }
}

/// The header lines of the fields of object schema `s`, one entry each:
/// `name?  type, default d: description` (`?`: optional).
fn field_lines(root: &Value, s: &Value, indent: &str, objects: &mut BTreeSet<String>) -> Vec<String> {
    let s = resolve(root, s);
    let Some(props) = s.get("properties").and_then(Value::as_object) else { return vec![] };
    let fields = fields(root, s).unwrap_or_default();
    let column = fields.iter().map(|(n, _)| n.len() + 1).max().unwrap_or(0);
    let mut lines = Vec::new();
    for (name, required) in fields {
        let prop = &props[&name];
        let mut text = type_name(root, prop, objects);
        if let Some(d) = prop.get("default").filter(|d| !d.is_null()) {
            text += &format!(", default {d}");
        }
        let what = describe(prop);
        if !what.is_empty() {
            text += &format!(": {what}");
        }
        let head = format!(" *{indent}{:column$}", format!("{name}{}", if required { "" } else { "?" }));
        lines.extend(wrap(&head, &text, 78));
    }
    lines
}

/// `v` as header lines: on one line when it fits in `width`, else one
/// member per line.
fn json_lines(v: &Value, indent: usize, width: usize) -> Vec<String> {
    fn one_line(v: &Value) -> String {
        match v {
            Value::Object(m) => {
                let inner: Vec<String> =
                    m.iter().map(|(k, v)| format!("{}: {}", Value::from(k.as_str()), one_line(v))).collect();
                format!("{{{}}}", inner.join(", "))
            }
            Value::Array(a) => format!("[{}]", a.iter().map(one_line).collect::<Vec<_>>().join(", ")),
            v => v.to_string(),
        }
    }
    fn lines(prefix: &str, v: &Value, suffix: &str, indent: usize, width: usize, out: &mut Vec<String>) {
        let pad = " ".repeat(indent);
        let flat = format!("{pad}{prefix}{}{suffix}", one_line(v));
        let (open, close, members): (&str, &str, Vec<(String, &Value)>) = match v {
            Value::Object(m) if !m.is_empty() => {
                ("{", "}", m.iter().map(|(k, v)| (format!("{}: ", Value::from(k.as_str())), v)).collect())
            }
            Value::Array(a) if !a.is_empty() => ("[", "]", a.iter().map(|v| (String::new(), v)).collect()),
            _ => {
                out.push(flat);
                return;
            }
        };
        if flat.len() <= width {
            out.push(flat);
            return;
        }
        out.push(format!("{pad}{prefix}{open}"));
        let n = members.len();
        for (i, (p, m)) in members.into_iter().enumerate() {
            lines(&p, m, if i + 1 < n { "," } else { "" }, indent + 2, width, out);
        }
        out.push(format!("{pad}{close}{suffix}"));
    }
    let mut out = Vec::new();
    lines("", v, "", indent, width, &mut out);
    out.into_iter().map(|l| format!(" *{l}")).collect()
}

/// Each operation's worked example: (request, abridged answer), from
/// `knib-ffi/examples.json`.
fn examples() -> BTreeMap<String, (Value, Value)> {
    let text = read("knib-ffi/examples.json");
    let all: BTreeMap<String, Value> =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("knib-ffi/examples.json does not parse: {e}"));
    all.into_iter().map(|(op, e)| (op, (e["request"].clone(), e["answer"].clone()))).collect()
}

/// Problems of `v`, an abridged answer, against schema `s`: every field it
/// has is one the schema has (fields may be left out, lists cut short).
fn check_example(root: &Value, s: &Value, v: &Value, at: &str, problems: &mut Vec<String>) {
    let s = resolve(root, s);
    match v {
        Value::Array(items) => {
            let Some(item) = s.get("items") else {
                problems.push(format!("{at}: an array where the schema has none"));
                return;
            };
            for (i, x) in items.iter().enumerate() {
                check_example(root, item, x, &format!("{at}[{i}]"), problems);
            }
        }
        Value::Object(m) => {
            if let Some(props) = s.get("properties").and_then(Value::as_object) {
                for (k, x) in m {
                    match props.get(k) {
                        Some(p) => check_example(root, p, x, &format!("{at}.{k}"), problems),
                        None => problems.push(format!("{at}: field `{k}` is not in the schema")),
                    }
                }
            } else if let Some(each) = s.get("additionalProperties").filter(|a| a.is_object()) {
                for (k, x) in m {
                    check_example(root, each, x, &format!("{at}.{k}"), problems);
                }
            } else if s.get("type") != Some(&Value::from("object")) {
                problems.push(format!("{at}: an object where the schema has none"));
            }
        }
        _ => {}
    }
}

/// The header's documentation of the operations (lines of its preamble
/// comment): each operation's request fields, answer type and worked
/// example, then every object type they name, all from the schema; the
/// examples come from `knib-ffi/examples.json` and are checked here (each
/// request parses as its operation's, each answer has only the schema's
/// fields).
fn header_table(s: &Value) -> String {
    let examples = examples();
    let ops = operations(s);
    let mut problems = Vec::new();
    for op in examples.keys().filter(|op| !ops.contains_key(*op)) {
        problems.push(format!("knib-ffi/examples.json: {op} is not an operation"));
    }
    let mut objects = BTreeSet::new();
    let mut lines = vec![HEADER_BEGIN.to_string()];
    for (op, (what, req, ans)) in &ops {
        lines.push(" *".into());
        lines.extend(wrap(&format!(" *   {op}:"), what, 78));
        let fields = field_lines(s, req, "       ", &mut objects);
        if fields.is_empty() {
            lines.push(" *     request: no fields".into());
        } else {
            lines.push(" *     request:".into());
            lines.extend(fields);
        }
        lines.extend(wrap(" *     answer:", &type_name(s, ans, &mut objects), 78));
        let Some((ex_req, ex_ans)) = examples.get(op) else {
            problems.push(format!("knib-ffi/examples.json has no example of {op}"));
            continue;
        };
        if let Err(e) = knib_core::api::Request::parse(op, &ex_req.to_string()) {
            problems.push(format!("knib-ffi/examples.json: the request of {op} does not parse: {e}"));
        }
        check_example(s, ans, ex_ans, &format!("knib-ffi/examples.json: the answer of {op}"), &mut problems);
        lines.push(" *     example request:".into());
        lines.extend(json_lines(ex_req, 7, 76));
        lines.push(" *     example answer (abridged):".into());
        lines.extend(json_lines(ex_ans, 7, 76));
    }
    lines.push(" *".into());
    lines.push(" *   OBJECT TYPES (`?`: optional field)".into());
    let mut done = BTreeSet::new();
    while let Some(name) = objects.iter().find(|o| !done.contains(*o)).cloned() {
        done.insert(name.clone());
        let def = &s["$defs"][&name];
        lines.push(" *".into());
        let what = describe(def);
        lines.extend(wrap(&format!(" *   {name}:"), if what.is_empty() { "(an object)" } else { &what }, 78));
        lines.extend(field_lines(s, def, "       ", &mut objects));
    }
    lines.push(HEADER_END.to_string());
    let text = lines.join("\n") + "\n";
    for bad in ["*/", "/*", "\\", "\"\"\""] {
        if text[HEADER_BEGIN.len()..].contains(bad) {
            problems
                .push(format!("the generated header text holds {bad:?}, which the C comment or cbindgen.toml cannot"));
        }
    }
    assert!(problems.is_empty(), "the header's documentation cannot be generated:\n{}", problems.join("\n"));
    text
}

/// `text` with the part between the lines `begin` and `end` (kept) replaced
/// by `inner`.
fn replace_between(text: &str, begin: &str, end: &str, inner: &str, what: &str) -> String {
    let a = text.find(begin).unwrap_or_else(|| panic!("{what}: no line {begin:?}"));
    let b = text[a..].find(end).unwrap_or_else(|| panic!("{what}: no line {end:?} after {begin:?}")) + a;
    format!("{}{inner}{}", &text[..a], &text[b + end.len()..])
}

fn between<'a>(text: &'a str, begin: &str, end: &str, what: &str) -> &'a str {
    let a = text.find(begin).unwrap_or_else(|| panic!("{what}: no line {begin:?}"));
    let b = text[a..].find(end).unwrap_or_else(|| panic!("{what}: no line {end:?} after {begin:?}")) + a;
    &text[a..b + end.len()]
}

#[test]
fn the_checked_in_schema_is_the_generated_one() {
    let fresh = schema_text();
    if writing() {
        write("docs/schema.json", &fresh);
        return;
    }
    let old = read("docs/schema.json");
    assert!(
        old == fresh,
        "docs/schema.json differs from the schema knib_core::api generates: an operation, a request or an answer changed; run KNIB_WRITE_SCHEMA=1 cargo test -p knib-core --test schema and commit the result"
    );
}

#[test]
fn the_schema_lists_every_operation_once() {
    let s = schema();
    let ops = operations(&s);
    let listed: BTreeSet<&str> = OPS.iter().copied().collect();
    assert_eq!(listed.len(), OPS.len(), "an operation is declared twice");
    assert_eq!(ops.keys().map(String::as_str).collect::<BTreeSet<_>>(), listed);
    for (op, (what, req, ans)) in &ops {
        assert!(!what.is_empty(), "{op} has no description");
        assert_eq!(resolve(&s, req)["additionalProperties"], Value::Bool(false), "{op} accepts unknown fields");
        assert!(!ans.is_null(), "{op} has no answer schema");
        assert!(fields(&s, req).expect("object").iter().all(|(n, _)| n != "schema"), "{op} has a `schema` field");
    }
}

#[test]
fn the_readme_table_is_the_schema() {
    let s = schema();
    let inner = format!("\n\n{}\n", readme_table(&s));
    let readme = read("README.md");
    if writing() {
        write(
            "README.md",
            &replace_between(
                &readme,
                README_BEGIN,
                README_END,
                &format!("{README_BEGIN}{inner}{README_END}"),
                "README.md",
            ),
        );
        return;
    }
    let got = between(&readme, README_BEGIN, README_END, "README.md");
    let want = format!("{README_BEGIN}{inner}{README_END}");
    assert!(
        got == want,
        "README.md's operation table drifted from the schema:\n--- README.md\n{got}\n--- generated\n{want}\nrun KNIB_WRITE_SCHEMA=1 cargo test -p knib-core --test schema"
    );
}

#[test]
fn the_header_table_is_the_schema() {
    let s = schema();
    let table = header_table(&s);
    for rel in ["knib-ffi/cbindgen.toml", "include/knib.h"] {
        let text = read(rel);
        if writing() {
            write(rel, &replace_between(&text, HEADER_BEGIN, &format!("{HEADER_END}\n"), &table, rel));
            continue;
        }
        let got = between(&text, HEADER_BEGIN, HEADER_END, rel).to_string() + "\n";
        assert!(
            got == table,
            "{rel}'s operation table drifted from the schema:\n--- {rel}\n{got}\n--- generated\n{table}\nrun KNIB_WRITE_SCHEMA=1 cargo test -p knib-core --test schema (it writes both files)"
        );
    }
}

#[path = "schema/java.rs"]
mod java;
