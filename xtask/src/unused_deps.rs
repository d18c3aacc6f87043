//! `cargo xtask unused-deps`: every dependency a workspace member declares must be used by its
//! code. (cargo-machete and cargo-udeps are not in the offline registry this builds from.)
//!
//! `cargo metadata --all-features` gives each member's declared dependencies and, through the
//! resolve graph, the name its code knows each by: the `package = ".."` rename, else the
//! library's name, `-` read as `_`. The member's Rust files (outside `target/` and nested
//! packages), comments removed, are then searched for that name as the first segment of a path
//! (`name::..`, `::name::..`, `use name;`, `extern crate name`; derives and attribute macros
//! are paths too: `#[derive(name::X)]`, `#[name::main]`), or as a string in an attribute
//! (`#[serde(with = "name")]`, `#[serde(with = "name::m")]`). Build dependencies are looked for in the build
//! script, the others everywhere else.
//!
//! A dependency only generated code uses (written to `OUT_DIR` by a build script) is listed
//! with the reason in the member's manifest:
//!
//! ```toml
//! [package.metadata.unused-deps]
//! ignored = ["tonic-prost"]
//! ```
//!
//! An ignored dependency that the search does find is reported too, so the list stays short.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// A dependency's section of the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Normal,
    Dev,
    Build,
}

impl Kind {
    fn section(self) -> &'static str {
        match self {
            Kind::Normal => "dependencies",
            Kind::Dev => "dev-dependencies",
            Kind::Build => "build-dependencies",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Dep {
    /// The key in the manifest (the rename, if any).
    key: String,
    /// The name the code uses.
    extern_name: String,
    kind: Kind,
}

#[derive(Debug)]
struct Member {
    name: String,
    dir: PathBuf,
    build_scripts: Vec<PathBuf>,
    deps: Vec<Dep>,
    ignored: Vec<String>,
}

/// Runs the check on this workspace; `Err` names every unused dependency.
pub fn unused_deps() -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask's manifest directory has no parent")?
        .join("Cargo.toml");
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--all-features"])
        .arg("--manifest-path")
        .arg(&manifest)
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let metadata: Value =
        serde_json::from_slice(&out.stdout).context("parsing cargo metadata's output")?;
    let mut problems = Vec::new();
    let mut checked = 0;
    for member in members(&metadata)? {
        let mut sources = Vec::new();
        rust_files(&member.dir, true, &mut sources)
            .with_context(|| format!("listing {}", member.dir.display()))?;
        let mut code = Vec::new();
        for path in sources {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let build = member.build_scripts.contains(&path);
            code.push((build, strip_comments(&text)));
        }
        checked += member.deps.len();
        problems.extend(verdicts(&member, &code));
    }
    if !problems.is_empty() {
        bail!(
            "{} problem(s) with declared dependencies:\n  {}",
            problems.len(),
            problems.join("\n  ")
        );
    }
    println!("unused-deps: all {checked} declared dependencies are used");
    Ok(())
}

/// The workspace members and their declared dependencies, from `cargo metadata`'s JSON.
fn members(metadata: &Value) -> Result<Vec<Member>> {
    let str_of = |v: &Value, key: &str| -> Result<String> {
        v.get(key)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .with_context(|| format!("cargo metadata: no {key:?} in {v}"))
    };
    let array = |v: &'_ Value, key: &str| -> Vec<Value> {
        v.get(key)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let packages = array(metadata, "packages");
    let name_of_id: BTreeMap<String, String> = packages
        .iter()
        .filter_map(|p| Some((str_of(p, "id").ok()?, str_of(p, "name").ok()?)))
        .collect();
    let nodes = metadata
        .pointer("/resolve/nodes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut members = Vec::new();
    for id in array(metadata, "workspace_members") {
        let id = id
            .as_str()
            .context("cargo metadata: a workspace member id")?;
        let package = packages
            .iter()
            .find(|p| p.get("id").and_then(Value::as_str) == Some(id))
            .with_context(|| format!("cargo metadata: no package {id}"))?;
        // What the member's code calls each package it depends on (renames and library names
        // applied, `-` already `_`).
        let mut extern_names: BTreeMap<String, String> = BTreeMap::new();
        if let Some(node) = nodes
            .iter()
            .find(|n| n.get("id").and_then(Value::as_str) == Some(id))
        {
            for d in array(node, "deps") {
                if let (Ok(name), Some(pkg)) = (
                    str_of(&d, "name"),
                    d.get("pkg")
                        .and_then(Value::as_str)
                        .and_then(|p| name_of_id.get(p)),
                ) {
                    extern_names.insert(pkg.clone(), name);
                }
            }
        }
        let mut deps = Vec::new();
        for d in array(package, "dependencies") {
            let name = str_of(&d, "name")?;
            let rename = d.get("rename").and_then(Value::as_str);
            let kind = match d.get("kind").and_then(Value::as_str) {
                Some("dev") => Kind::Dev,
                Some("build") => Kind::Build,
                _ => Kind::Normal,
            };
            let extern_name = match rename {
                Some(r) => r.replace('-', "_"),
                None => extern_names
                    .get(&name)
                    .cloned()
                    .unwrap_or_else(|| name.replace('-', "_")),
            };
            deps.push(Dep {
                key: rename.unwrap_or(&name).to_owned(),
                extern_name,
                kind,
            });
        }
        let manifest = PathBuf::from(str_of(package, "manifest_path")?);
        let build_scripts = array(package, "targets")
            .iter()
            .filter(|t| {
                t.get("kind")
                    .and_then(Value::as_array)
                    .is_some_and(|k| k.iter().any(|k| k == "custom-build"))
            })
            .filter_map(|t| str_of(t, "src_path").ok().map(PathBuf::from))
            .collect();
        let ignored = package
            .pointer("/metadata/unused-deps/ignored")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        members.push(Member {
            name: str_of(package, "name")?,
            dir: manifest
                .parent()
                .context("a manifest path without a directory")?
                .to_path_buf(),
            build_scripts,
            deps,
            ignored,
        });
    }
    Ok(members)
}

/// The `.rs` files under `dir`, skipping `target/`, hidden directories and nested packages.
fn rust_files(dir: &Path, top: bool, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if !top && dir.join("Cargo.toml").exists() {
        return Ok(());
    }
    let mut entries = std::fs::read_dir(dir)?.collect::<std::io::Result<Vec<_>>>()?;
    entries.sort_by_key(|e| e.path());
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if entry.file_type()?.is_dir() {
            if name != "target" && !name.starts_with('.') {
                rust_files(&path, false, out)?;
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// What is wrong with `member`'s dependencies, given its files as (is build script, file
/// without comments) pairs.
fn verdicts(member: &Member, code: &[(bool, Stripped)]) -> Vec<String> {
    let mut problems = Vec::new();
    for dep in &member.deps {
        let used = code
            .iter()
            .filter(|(build, _)| *build == (dep.kind == Kind::Build))
            .any(|(_, text)| mentions(text, &dep.extern_name));
        let ignored = member.ignored.contains(&dep.key);
        if !used && !ignored {
            problems.push(format!(
                "{}: {} in [{}] is never used",
                member.name,
                dep.key,
                dep.kind.section()
            ));
        } else if used && ignored {
            problems.push(format!(
                "{}: {} is used, so [package.metadata.unused-deps] need not ignore it",
                member.name, dep.key
            ));
        }
    }
    for key in &member.ignored {
        if !member.deps.iter().any(|d| &d.key == key) {
            problems.push(format!(
                "{}: [package.metadata.unused-deps] ignores {key}, which it does not declare",
                member.name
            ));
        }
    }
    problems
}

/// A source file without its comments, twice: `code` also has its string literals blanked,
/// `text` keeps them. Both keep every newline, so their lines match.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stripped {
    code: String,
    text: String,
}

/// Whether a source file refers to the crate known as `name`.
fn mentions(src: &Stripped, name: &str) -> bool {
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    let code = src.code.as_str();
    // `name::` starting a path: not a later segment (`x::name::`, `self::name::`).
    let path = format!("{name}::");
    let as_path = code.match_indices(&path).any(|(i, _)| {
        let before = &code[..i];
        match before.strip_suffix("::") {
            Some(rest) => !rest.trim_end().ends_with(|c: char| ident(c) || c == '>'),
            None => !before.ends_with(ident),
        }
    });
    // `use name;`, `use name as x;`, `extern crate name;`.
    let as_item = code.match_indices(name).any(|(i, _)| {
        let before = &code[..i];
        let word = before.trim_end();
        let keyword = |k: &str| word.strip_suffix(k).is_some_and(|b| !b.ends_with(ident));
        let after = &code[i + name.len()..];
        let rest = after.trim_start();
        word.len() < before.len()
            && (keyword("use") || keyword("crate"))
            && (rest.starts_with(';')
                || (rest.len() < after.len()
                    && rest
                        .strip_prefix("as")
                        .is_some_and(|r| r.starts_with(char::is_whitespace))))
    });
    // A string naming it in an attribute: `#[serde(with = "name")]`, `#[serde(with = "name::m")]`.
    let (alone, prefix) = (format!("\"{name}\""), format!("\"{name}::"));
    let as_string = src.text.lines().any(|l| {
        let l = l.trim_start();
        (l.starts_with("#[") || l.starts_with("#![")) && (l.contains(&alone) || l.contains(&prefix))
    });
    as_path || as_item || as_string
}

/// `src` without its comments (line, block, nested, doc). String and character literals are
/// recognised, so `//` in a string is not taken for a comment, nor `"` in `'"'` for a string.
fn strip_comments(src: &str) -> Stripped {
    let s: Vec<char> = src.chars().collect();
    let mut out = Stripped {
        code: String::with_capacity(src.len()),
        text: String::with_capacity(src.len()),
    };
    // Code goes to both; a literal's contents to `text`, and as blanks to `code`.
    let code = |out: &mut Stripped, c: char| {
        out.code.push(c);
        out.text.push(c);
    };
    let literal = |out: &mut Stripped, c: char| {
        out.code.push(if c == '\n' { '\n' } else { ' ' });
        out.text.push(c);
    };
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        let next = s.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < s.len() && s[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < s.len() {
                if s[i] == '/' && s.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if s[i] == '*' && s.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if s[i] == '\n' {
                        code(&mut out, '\n');
                    }
                    i += 1;
                }
            }
            code(&mut out, ' ');
        } else if c == '"' {
            // A string (or byte or C string: its prefix went out as code); `\` escapes.
            code(&mut out, c);
            i += 1;
            while i < s.len() && s[i] != '"' {
                if s[i] == '\\' && i + 1 < s.len() {
                    literal(&mut out, s[i]);
                    i += 1;
                }
                literal(&mut out, s[i]);
                i += 1;
            }
            if i < s.len() {
                code(&mut out, '"');
                i += 1;
            }
        } else if c == 'r'
            && (i == 0
                || !ident(s[i - 1])
                || (matches!(s[i - 1], 'b' | 'c') && (i < 2 || !ident(s[i - 2]))))
            && {
                let hashes = s[i + 1..].iter().take_while(|&&c| c == '#').count();
                s.get(i + 1 + hashes) == Some(&'"')
            }
        {
            // A raw string: no escapes; it ends at `"` and as many `#` as it began with.
            let hashes = s[i + 1..].iter().take_while(|&&c| c == '#').count();
            for &c in &s[i..i + 2 + hashes] {
                code(&mut out, c);
            }
            i += 2 + hashes;
            let closes = |i: usize| {
                s[i] == '"'
                    && s.get(i + 1..i + 1 + hashes)
                        .is_some_and(|h| h.iter().all(|&c| c == '#'))
            };
            while i < s.len() && !closes(i) {
                literal(&mut out, s[i]);
                i += 1;
            }
            for &c in s.get(i..i + 1 + hashes).unwrap_or_default() {
                code(&mut out, c);
            }
            i += 1 + hashes;
        } else if c == '\'' {
            // A character literal (`'"'`, `'\''`, `'\u{..}'`) or a lifetime or label (`'a`).
            let end = if next == Some('\\') {
                s.get(i + 3..)
                    .and_then(|t| t.iter().position(|&c| c == '\''))
                    .map(|p| i + 3 + p + 1)
            } else if s.get(i + 2) == Some(&'\'') {
                Some(i + 3)
            } else {
                None
            };
            for &c in &s[i..end.unwrap_or(i + 1).min(s.len())] {
                code(&mut out, c);
            }
            i = end.unwrap_or(i + 1);
        } else {
            code(&mut out, c);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_go_and_literals_are_set_apart() {
        let src = "use a::b; // c::d\n/* e::f /* nested g::h */ still */ let s = \"// x::y\";\n\
                   let q = '\"'; let e = '\\''; let r = br#\"a\" z::w\"#; 'l: loop {} /// doc::x\nk::l";
        let stripped = strip_comments(src);
        assert_eq!(
            stripped.text,
            "use a::b; \n  let s = \"// x::y\";\n\
             let q = '\"'; let e = '\\''; let r = br#\"a\" z::w\"#; 'l: loop {} \nk::l"
        );
        assert_eq!(
            stripped.code,
            "use a::b; \n  let s = \"       \";\n\
             let q = '\"'; let e = '\\''; let r = br#\"       \"#; 'l: loop {} \nk::l"
        );
        for (name, used) in [
            ("a", true),
            ("b", false),
            ("c", false),
            ("e", false),
            ("g", false),
            ("x", false),
            ("z", false),
            ("doc", false),
            ("k", true),
        ] {
            assert_eq!(mentions(&stripped, name), used, "{name}");
        }
    }

    #[test]
    fn a_crate_is_used_by_paths_items_derives_and_attributes() {
        let used = |code: &str, name: &str| mentions(&strip_comments(code), name);
        for (code, name) in [
            ("use serde::Serialize;", "serde"),
            ("#[derive(Debug, serde::Deserialize)]", "serde"),
            ("#[tokio::main]\nasync fn main() {}", "tokio"),
            ("let x = ::bytes::Bytes::new();", "bytes"),
            ("let v: Vec<rand::X> = vec![];", "rand"),
            ("fn f() { hex::encode(b) }", "hex"),
            ("use tracing;", "tracing"),
            ("pub use tracing as log;", "tracing"),
            ("extern crate tracing;", "tracing"),
            ("#[serde(with = \"humantime_serde\")]", "humantime_serde"),
            (
                "#[serde(serialize_with = \"hex::serde::serialize\")]",
                "hex",
            ),
        ] {
            assert!(used(code, name), "{name} in {code}");
        }
        for code in [
            "use crate::tracing::x;",
            "self::tracing::x()",
            "Vec::<u8>::tracing::x",
            "my_tracing::x()",
            "tracing_subscriber::fmt()",
            "let tracing = 1; use_tracing;",
            "use tracing_x;",
            "let s = \"tracing\";",
            "let s = \"tracing::x\";",
            "tracing!()",
            "// tracing::info!()",
        ] {
            assert!(!used(code, "tracing"), "{code}");
        }
    }

    #[test]
    fn renames_library_names_kinds_and_the_ignore_list() {
        let metadata = serde_json::json!({
            "workspace_members": ["m 0.1"],
            "packages": [
                {
                    "id": "m 0.1", "name": "m", "manifest_path": "/w/m/Cargo.toml",
                    "targets": [
                        {"kind": ["lib"], "src_path": "/w/m/src/lib.rs"},
                        {"kind": ["custom-build"], "src_path": "/w/m/build.rs"}
                    ],
                    "dependencies": [
                        {"name": "aws-lc-rs", "rename": null, "kind": null},
                        {"name": "serde_yaml_ng", "rename": "yaml", "kind": null},
                        {"name": "foo-sys", "rename": null, "kind": null},
                        {"name": "gen-helper", "rename": null, "kind": "build"},
                        {"name": "prost-build", "rename": null, "kind": "build"},
                        {"name": "proptest", "rename": null, "kind": "dev"},
                        {"name": "tonic-prost", "rename": null, "kind": null}
                    ],
                    "metadata": {"unused-deps": {"ignored": ["tonic-prost"]}}
                },
                {"id": "aws-lc-rs 1", "name": "aws-lc-rs"},
                {"id": "foo-sys 1", "name": "foo-sys"}
            ],
            "resolve": {"nodes": [
                {"id": "m 0.1", "deps": [
                    {"name": "aws_lc_rs", "pkg": "aws-lc-rs 1"},
                    {"name": "foo", "pkg": "foo-sys 1"}
                ]}
            ]}
        });
        let members = members(&metadata).unwrap();
        let [m] = &members[..] else {
            panic!("{members:?}")
        };
        assert_eq!(m.dir, Path::new("/w/m"));
        assert_eq!(m.build_scripts, [PathBuf::from("/w/m/build.rs")]);
        let names: Vec<_> = m.deps.iter().map(|d| d.extern_name.as_str()).collect();
        assert_eq!(
            names,
            [
                "aws_lc_rs",
                "yaml",
                "foo",
                "gen_helper",
                "prost_build",
                "proptest",
                "tonic_prost"
            ]
        );
        let code = |build: bool, text: &str| (build, strip_comments(text));
        let sources = [
            code(
                false,
                "use aws_lc_rs::digest; fn f() { yaml::from_str(\"\"); foo::x(); }",
            ),
            code(
                false,
                "#[cfg(test)] mod t { use proptest::prelude::*; use gen_helper::x; }",
            ),
            code(true, "fn main() { prost_build::compile(); }"),
        ];
        assert_eq!(
            verdicts(m, &sources),
            ["m: gen-helper in [build-dependencies] is never used"],
            "a build dependency counts in the build script only"
        );
        let mut stale = Member {
            ignored: vec!["foo-sys".into(), "nothing".into()],
            ..members.into_iter().next().unwrap()
        };
        stale.deps.retain(|d| d.kind != Kind::Build);
        assert_eq!(
            verdicts(&stale, &sources),
            [
                "m: foo-sys is used, so [package.metadata.unused-deps] need not ignore it",
                "m: tonic-prost in [dependencies] is never used",
                "m: [package.metadata.unused-deps] ignores nothing, which it does not declare",
            ]
        );
    }
}
