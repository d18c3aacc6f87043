//! Reading manifests: YAML files and documents as JSON values, and small accessors.

#[allow(clippy::wildcard_imports)]
use super::*;

pub(super) fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

pub(super) fn rel<'a>(root: &Path, p: &'a Path) -> &'a Path {
    p.strip_prefix(root).unwrap_or(p)
}

pub(super) fn subdirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

pub(super) fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if !dir.exists() {
        return Ok(out);
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = file_name(&path);
        if path.is_file() && (name.ends_with(".yaml") || name.ends_with(".yml")) {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Every YAML document of `text` (empty documents skipped), as JSON values.
pub(super) fn parse_yaml_docs(text: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for (i, doc) in yaml_serde::Deserializer::from_str(text).enumerate() {
        let value = yaml_serde::Value::deserialize(doc)
            .with_context(|| format!("YAML document {}", i + 1))?;
        if value.is_null() {
            continue;
        }
        let json = serde_json::to_value(&value)
            .with_context(|| format!("YAML document {} is not plain data", i + 1))?;
        docs.push(json);
    }
    Ok(docs)
}

pub(super) fn parse_single_yaml(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut docs = parse_yaml_docs(&text).with_context(|| format!("parsing {}", path.display()))?;
    match docs.len() {
        1 => Ok(docs.remove(0)),
        n => bail!("{}: expected one YAML document, found {n}", path.display()),
    }
}

/// The Kubernetes objects of a manifest file.
pub(super) fn parse_objects(path: &Path) -> Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let docs = parse_yaml_docs(&text).with_context(|| format!("parsing {}", path.display()))?;
    for (i, doc) in docs.iter().enumerate() {
        let what = format!("{} (document {})", path.display(), i + 1);
        let kind = str_at(doc, &["kind"]).ok_or_else(|| anyhow!("{what}: no kind"))?;
        if str_at(doc, &["apiVersion"]).is_none() {
            bail!("{what}: no apiVersion");
        }
        if str_at(doc, &["metadata", "name"]).is_none() {
            bail!("{what}: no metadata.name");
        }
        if kind == "List" || kind.ends_with("List") {
            bail!("{what}: kind {kind} is not supported; write one document per object");
        }
    }
    Ok(docs)
}

pub(super) fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

pub(super) fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(v, path).and_then(Value::as_str)
}

pub(super) fn arr_at<'a>(v: &'a Value, path: &[&str]) -> &'a [Value] {
    at(v, path)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

pub(super) fn string_map(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

pub(super) fn kind_of(v: &Value) -> &str {
    str_at(v, &["kind"]).unwrap_or("")
}

pub(super) fn name_of(v: &Value) -> &str {
    str_at(v, &["metadata", "name"]).unwrap_or("")
}

pub(super) fn namespace_of(v: &Value) -> &str {
    str_at(v, &["metadata", "namespace"]).unwrap_or("default")
}

pub(super) fn id_of(v: &Value) -> String {
    match str_at(v, &["metadata", "namespace"]) {
        Some(ns) => format!("{}/{} in {ns}", kind_of(v), name_of(v)),
        None => format!("{}/{}", kind_of(v), name_of(v)),
    }
}

pub(super) fn count_kinds(objects: &[Value]) -> String {
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for o in objects {
        *kinds.entry(kind_of(o)).or_default() += 1;
    }
    kinds
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `selector` is non-empty and every pair of it is in `labels`.
pub(super) fn selects(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}
