//! `docs/openapi.json` describes exactly the routes `callvault serve` has: the router in
//! src/http/mod.rs (`api_router`) is read as text, every `.route(PATH, METHOD(..)...)` taken
//! apart, and the set of (path, method) compared with the document's both ways. Every `$ref`
//! in the document must resolve, and every operation must list its responses.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

const METHODS: [&str; 5] = ["get", "put", "post", "patch", "delete"];

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel))
        .unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The text of `api_router`'s body.
fn router_source() -> String {
    let src = read("src/http/mod.rs");
    let start = src
        .find("pub fn api_router")
        .expect("api_router in src/http/mod.rs");
    let end = start + src[start..].find(".with_state(").expect("with_state");
    src[start..end].to_string()
}

/// Index of the `)` closing the `(` at `open`.
fn closing(s: &str, open: usize) -> usize {
    let mut depth = 0;
    for (i, c) in s[open..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return open + i;
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced parentheses in the router");
}

/// `(path, method)` of every route: a method is a routing function called as `get(`,
/// `.patch(`, `routing::post(` ... (a handler name such as `delete_call` is not a call).
fn routes_in(src: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    let mut at = 0;
    while let Some(i) = src[at..].find(".route(") {
        let open = at + i + ".route".len();
        let close = closing(src, open);
        let args = &src[open + 1..close];
        let q1 = args.find('"').expect("route path literal");
        let q2 = q1 + 1 + args[q1 + 1..].find('"').expect("closing quote");
        let path = &args[q1 + 1..q2];
        let rest = &args[q2 + 1..];
        let bytes = rest.as_bytes();
        for m in METHODS {
            let pat = format!("{m}(");
            let mut from = 0;
            while let Some(j) = rest[from..].find(&pat) {
                let k = from + j;
                let prev = if k == 0 { b' ' } else { bytes[k - 1] };
                if !(prev.is_ascii_alphanumeric() || prev == b'_') {
                    out.insert((path.to_string(), m.to_string()));
                }
                from = k + pat.len();
            }
        }
        at = close;
    }
    out
}

fn doc() -> Value {
    serde_json::from_str(&read("docs/openapi.json")).expect("docs/openapi.json is JSON")
}

fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (k, _) in item.as_object().expect("path item") {
            if METHODS.contains(&k.as_str()) {
                out.insert((path.clone(), k.clone()));
            }
        }
    }
    out
}

#[test]
fn the_parser_sees_methods_chained_and_nested() {
    let src = r#".route("/a/{id}", get(x::get_a).patch(x::patch_a).delete(x::delete_a))
        .route("/b", axum::routing::post(y::post_b))"#;
    let got: Vec<_> = routes_in(src).into_iter().collect();
    let want: Vec<(String, String)> = [
        ("/a/{id}", "delete"),
        ("/a/{id}", "get"),
        ("/a/{id}", "patch"),
        ("/b", "post"),
    ]
    .iter()
    .map(|(p, m)| (p.to_string(), m.to_string()))
    .collect();
    assert_eq!(got, want);
}

#[test]
fn openapi_document_matches_the_router() {
    let routes = routes_in(&router_source());
    assert!(
        routes.contains(&("/v1/calls/{id}".into(), "delete".into())),
        "the router parse found {routes:?}"
    );
    let doc = doc();
    assert!(doc["openapi"].as_str().unwrap_or("").starts_with("3."));
    let documented = documented(&doc);
    let missing: Vec<_> = routes.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&routes).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "undocumented routes: {missing:?}; documented but not routed: {stale:?}"
    );
    for (path, method) in &documented {
        let op = &doc["paths"][path][method];
        let responses = op["responses"].as_object();
        assert!(
            responses.is_some_and(|r| !r.is_empty()),
            "{method} {path} lists no responses"
        );
        assert!(op["summary"].is_string(), "{method} {path} has no summary");
    }
}

fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("$ref", Value::String(s)) => out.push(s),
                    _ => refs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

#[test]
fn every_reference_resolves() {
    let doc = doc();
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let pointer = r
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("external ref {r}"));
        assert!(doc.pointer(pointer).is_some(), "unresolved {r}");
    }
}
