//! The Java request and answer classes held against the schema: their
//! fields read from the source (record components, private final fields),
//! named as Gson writes them, and compared with each operation's request
//! and answer.

use super::*;

/// The JSON fields of each class of a Java file: class name -> (JSON
/// name, Java type), the JSON name as Gson's LOWER_CASE_WITH_UNDERSCORES
/// policy writes it. A record's fields are its components; a class's are
/// its `private final` instance fields (what Gson reads and writes). A
/// `public` instance field is reported as a problem: requests and answers
/// are immutable.
fn java_classes(file: &str) -> BTreeMap<String, Vec<(String, String)>> {
    let text = read(&format!("java/src/main/java/io/knib/{file}.java"));
    static CLASS: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"(?m)^\s*public (?:static )?(?:final )?(?:class (\w+)|record (\w+)\(([^)]*)\))").expect("regex")
    });
    static FIELD: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"(?m)^\s*private final ([\w<>., ]+?) (\w+);").expect("regex"));
    let (class, field) = (&*CLASS, &*FIELD);
    let starts: Vec<(usize, String, Option<String>)> = class
        .captures_iter(&text)
        .map(|c| {
            let at = c.get(0).expect("match").start();
            match (c.get(1), c.get(2), c.get(3)) {
                (Some(name), _, _) => (at, name.as_str().to_string(), None),
                (None, Some(name), Some(components)) => {
                    (at, name.as_str().to_string(), Some(components.as_str().to_string()))
                }
                _ => unreachable!("the regex names a class or a record"),
            }
        })
        .collect();
    let mut out = BTreeMap::new();
    for (i, (at, name, components)) in starts.iter().enumerate() {
        let fields = match components {
            Some(list) => record_components(list).into_iter().map(|(ty, n)| (snake(&n), ty)).collect(),
            None => {
                let end = starts.get(i + 1).map(|s| s.0).unwrap_or(text.len());
                field.captures_iter(&text[*at..end]).map(|c| (snake(&c[2]), c[1].to_string())).collect()
            }
        };
        out.insert(name.clone(), fields);
    }
    out
}

/// The (type, name) of each component of a record header's list
/// (`String domain, List<Volume> volumes`), split at the commas outside
/// `<>`.
fn record_components(list: &str) -> Vec<(String, String)> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in list.char_indices() {
        match c {
            '<' => depth += 1,
            '>' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&list[start..]);
    parts
        .into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (ty, name) = p.rsplit_once(char::is_whitespace).unwrap_or_else(|| panic!("record component {p:?}"));
            (ty.trim().to_string(), name.to_string())
        })
        .collect()
}

fn snake(camel: &str) -> String {
    let mut s = String::new();
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            s.push('_');
            s.push(c.to_ascii_lowercase());
        } else {
            s.push(c);
        }
    }
    s
}

/// The class a Java field's type names (`List<Volume>` -> `Volume`), as
/// (file, class).
fn class_of(file: &str, ty: &str) -> (String, String) {
    let inner = ty.strip_prefix("List<").and_then(|t| t.strip_suffix('>')).unwrap_or(ty);
    match inner.split_once('.') {
        Some((f, c)) => (f.to_string(), c.to_string()),
        None => (file.to_string(), inner.to_string()),
    }
}

/// Problems of Java class `class` (in `file`) against object schema `s`:
/// for a request every field must be in the schema and every required
/// field in the class; for an answer the fields must be the schema's.
fn compare(root: &Value, file: &str, class: &str, s: &Value, request: bool, problems: &mut Vec<String>) {
    let classes = java_classes(file);
    let Some(java) = classes.get(class) else {
        problems.push(format!("{file}.java has no class {class}"));
        return;
    };
    let Some(schema_fields) = fields(root, s) else {
        problems.push(format!("{file}.{class}: the schema has no object here"));
        return;
    };
    let names: BTreeSet<&str> = schema_fields.iter().map(|(n, _)| n.as_str()).collect();
    let java_names: BTreeSet<&str> = java.iter().map(|(n, _)| n.as_str()).collect();
    for n in java_names.difference(&names) {
        problems.push(format!("{file}.{class}: field `{n}` is not in the schema"));
    }
    for (n, required) in &schema_fields {
        if !java_names.contains(n.as_str()) && (*required || !request) {
            problems.push(format!("{file}.{class}: lacks the schema's field `{n}`"));
        }
    }
    for (n, ty) in java {
        let (f, c) = class_of(file, ty);
        let known = java_classes(&f);
        if !known.contains_key(&c) {
            continue;
        }
        let Some(prop) = resolve(root, s).get("properties").and_then(|p| p.get(n)) else { continue };
        let prop = resolve(root, prop);
        let item = prop.get("items").unwrap_or(prop);
        compare(root, &f, &c, item, request, problems);
    }
}

#[test]
fn the_java_classes_are_the_schema() {
    let s = schema();
    let ops = operations(&s);
    let knib = read("java/src/main/java/io/knib/Knib.java");
    // Each facade method: `public F.Answer name(F.Request request) throws
    // KnibException { return run("op", request, F.Answer.class); }`.
    let method = Regex::new(
        r#"public (\w+)\.(\w+) \w+\((\w+)\.(\w+) request\) throws KnibException \{\s*return run\("([\w.]+)", request, (\w+)\.(\w+)\.class\);"#,
    )
    .expect("regex");
    let runs = Regex::new(r#"return run\("#).expect("regex").find_iter(&knib).count();
    let mut problems = Vec::new();
    let mut seen = 0;
    for c in method.captures_iter(&knib) {
        let (req_file, req_class, op, file, answer) = (&c[3], &c[4], &c[5], &c[6], &c[7]);
        if (&c[1], &c[2]) != (file, answer) {
            problems
                .push(format!("Knib.java: the method running {op} returns {}.{}, not {file}.{answer}", &c[1], &c[2]));
        }
        let Some((_, req, ans)) = ops.get(op) else {
            problems.push(format!("Knib.java runs {op}, which is not an operation of the schema"));
            continue;
        };
        seen += 1;
        compare(&s, req_file, req_class, req, true, &mut problems);
        compare(&s, file, answer, ans, false, &mut problems);
    }
    assert!(seen >= 14, "Knib.java: found only {seen} operations");
    assert_eq!(seen, runs, "Knib.java: a `return run(...)` is not in the form this test reads");
    // The operations answering an array: `public List<F.Element> name(F.Request
    // request) throws KnibException { return runList("op", request,
    // F.Element.class); }`, each element held against the answer's items.
    let list_method = Regex::new(
        r#"public List<(\w+)\.(\w+)> \w+\((\w+)\.(\w+) request\) throws KnibException \{\s*return runList\("([\w.]+)", request, (\w+)\.(\w+)\.class\);"#,
    )
    .expect("regex");
    let list_runs = Regex::new(r#"return runList\("#).expect("regex").find_iter(&knib).count();
    let mut list_seen = 0;
    for c in list_method.captures_iter(&knib) {
        let (req_file, req_class, op, file, element) = (&c[3], &c[4], &c[5], &c[6], &c[7]);
        if (&c[1], &c[2]) != (file, element) {
            let returned = format!("List<{}.{}>", &c[1], &c[2]);
            problems.push(format!("Knib.java: the method running {op} returns {returned}, not of {file}.{element}"));
        }
        let Some((_, req, ans)) = ops.get(op) else {
            problems.push(format!("Knib.java runs {op}, which is not an operation of the schema"));
            continue;
        };
        list_seen += 1;
        compare(&s, req_file, req_class, req, true, &mut problems);
        match resolve(&s, ans).get("items") {
            Some(items) => compare(&s, file, element, items, false, &mut problems),
            None => problems.push(format!("Knib.java: {op} answers no array, yet its method returns a List")),
        }
    }
    assert_eq!(list_seen, list_runs, "Knib.java: a `return runList(...)` is not in the form this test reads");
    // No class has a public instance field: requests and answers are immutable.
    let public_field = Regex::new(r"(?m)^\s*public (?:final )?[\w<>., ]+ (\w+)(?: = [^;]*)?;").expect("regex");
    let dir = root().join("java/src/main/java/io/knib");
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("a directory entry").path();
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for c in public_field.captures_iter(&text) {
            let name = path.file_name().expect("a file name").to_string_lossy();
            problems.push(format!("{name}: public field `{}` (requests and answers are immutable)", &c[1]));
        }
    }
    // java/README.md's table names each wrapper's operation.
    let readme = read("java/README.md");
    let op_cell = Regex::new(r"\| `((?:agent|files)\.[\w.]+)` \|").expect("regex");
    for c in op_cell.captures_iter(&readme) {
        if !ops.contains_key(&c[1]) {
            problems.push(format!("java/README.md names operation {}, which the schema does not have", &c[1]));
        }
    }
    assert!(problems.is_empty(), "the Java classes drifted from the schema:\n{}", problems.join("\n"));
}
