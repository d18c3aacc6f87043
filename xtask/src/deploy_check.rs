//! `cargo xtask deploy-check`: validates `deploy/` offline against the code it deploys.
//!
//! 1. Renders every overlay under `deploy/k8s/overlays/` with a small kustomize renderer (the
//!    subset the manifests use: `resources`, `namespace`, `labels` pairs, `images`, and
//!    `patches` given inline as JSON6902 operations with a `target` of kind and name). Any other
//!    kustomization field is refused, so the rendering can never silently differ from
//!    `kubectl kustomize`; when `kubectl` is on the PATH its rendering is compared too. The
//!    results go to `$CARGO_TARGET_DIR/deploy-check/<overlay>.yaml`.
//! 2. Validates the rendered files, the Job examples and the example Secrets with the PyPI
//!    package `kubernetes-validate` (strict, one pinned Kubernetes version), installed into a
//!    venv beside them on first use.
//! 3. Checks every container that runs `ingest`, `uploader` or `uploader drain` against the
//!    binaries' own clap definitions (every flag and `SPILLWAY_*` variable parsed by the real
//!    parser), and the manifests against each other: ports, probes, Services, the headless
//!    Service ingest resolves, grace periods against `--shutdown-grace` / `--drain-timeout`,
//!    spool volume against `--spool-max-bytes`, memory limits against the formulas in
//!    `deploy/README.md`, and the pod security settings.
//! 4. Checks that every `spillway_*` metric named in `deploy/prometheus/alerts.yaml` is one the
//!    daemons register, and the rule file's structure.
//! 5. Checks `deploy/Dockerfile` (multi-stage, both binaries, non-root `USER`, `STOPSIGNAL
//!    SIGTERM`, the exposed ports) and `.dockerignore`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command as Process;

use anyhow::{Context, Result, anyhow, bail};
use clap::CommandFactory;
use serde::Deserialize as _;
use serde_json::{Map, Value};

/// The `kubernetes-validate` release installed into the venv.
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
/// UID and GID of the image's `nonroot` user, which every pod must run as.
const NONROOT: i64 = 65532;
/// The highest sample rate a device may use (`spillway_proto::validate`).
const MAX_SAMPLE_RATE: u128 = 48_000;
const MIB: u128 = 1024 * 1024;

/// Arguments of `cargo xtask deploy-check`.
#[derive(Debug, clap::Args)]
pub struct DeployCheckArgs {
    /// Kubernetes version whose API schemas the manifests must satisfy (one that
    /// kubernetes-validate ships).
    #[arg(long, default_value = "1.33.0")]
    pub kubernetes_version: String,
    /// Skip the schema validation (no Python venv, nothing fetched from PyPI).
    #[arg(long)]
    pub skip_schemas: bool,
    /// Skip the comparison with `kubectl kustomize` even when kubectl is installed.
    #[arg(long)]
    pub skip_kubectl: bool,
    /// Repository root holding deploy/ (default: this workspace).
    #[arg(long)]
    pub root: Option<PathBuf>,
}

/// Runs every check; `Err` lists every failure. Synchronous: it only reads files and runs
/// child processes.
pub fn deploy_check(args: DeployCheckArgs) -> Result<()> {
    let root = match &args.root {
        Some(r) => r.clone(),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| anyhow!("xtask's manifest directory has no parent"))?,
    };
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let out = target.join("deploy-check");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    let mut report = Report::default();
    let deploy = root.join("deploy");
    let image = check_dockerfile(&root, &mut report)?;

    // Example Secrets: what the manifests may reference without defining.
    let mut examples = Vec::new();
    let mut example_files = Vec::new();
    for dir in subdirs(&deploy.join("k8s/overlays"))? {
        for file in yaml_files(&dir)? {
            if file.to_string_lossy().ends_with(".example.yaml") {
                examples.extend(parse_objects(&file)?);
                example_files.push(file);
            }
        }
    }

    let mut rendered_files = Vec::new();
    let mut summaries = Vec::new();
    let mut kubectl_notes = Vec::new();
    for dir in subdirs(&deploy.join("k8s/overlays"))? {
        let name = file_name(&dir);
        let objects = render_kustomization(&dir)
            .with_context(|| format!("rendering overlay {}", dir.display()))?;
        let text = to_yaml_docs(&objects)?;
        let file = out.join(format!("{name}.yaml"));
        std::fs::write(&file, &text).with_context(|| format!("writing {}", file.display()))?;
        summaries.push(format!(
            "{name}: {} objects ({}) -> {}",
            objects.len(),
            count_kinds(&objects),
            file.display()
        ));
        rendered_files.push(file);
        if !args.skip_kubectl {
            kubectl_notes.push(compare_with_kubectl(&dir, &objects, &mut report));
        }
        let scope = format!("overlay {name}");
        check_objects(&scope, &objects, &examples, &image, &mut report);
    }

    let mut job_files = Vec::new();
    for file in yaml_files(&deploy.join("k8s/jobs"))? {
        let objects = parse_objects(&file)?;
        let scope = format!("{}", rel(&root, &file).display());
        check_objects(&scope, &objects, &examples, &image, &mut report);
        job_files.push(file);
    }

    let metrics = exposed_metrics()?;
    let alerts_file = deploy.join("prometheus/alerts.yaml");
    let alerts = check_alerts(
        &alerts_file,
        &rel(&root, &alerts_file).display().to_string(),
        &metrics,
        &mut report,
    )?;

    let schema_note = if args.skip_schemas {
        "skipped (--skip-schemas)".to_owned()
    } else {
        let files: Vec<PathBuf> = rendered_files
            .iter()
            .chain(&job_files)
            .chain(&example_files)
            .cloned()
            .collect();
        validate_schemas(&out, &args.kubernetes_version, &files, &mut report)?
    };

    println!("deploy-check");
    for s in &summaries {
        println!("  rendered {s}");
    }
    println!(
        "  jobs: {}",
        job_files
            .iter()
            .map(|f| rel(&root, f).display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  alerts: {} rules in {} groups, {} metric names checked against the {} series the daemons export",
        alerts.rules, alerts.groups, alerts.names, alerts.exported
    );
    println!("  kubernetes-validate: {schema_note}");
    for note in &kubectl_notes {
        println!("  kubectl kustomize: {note}");
    }
    for n in &report.notes {
        println!("  sizing: {n}");
    }
    for w in &report.warnings {
        println!("  warning: {w}");
    }
    if report.failures.is_empty() {
        println!("  {} checks passed", report.checks);
        Ok(())
    } else {
        for f in &report.failures {
            println!("  FAILED: {f}");
        }
        bail!(
            "deploy-check: {} of {} checks failed",
            report.failures.len(),
            report.checks
        )
    }
}

/// What the checks found.
#[derive(Debug, Default)]
struct Report {
    checks: usize,
    failures: Vec<String>,
    warnings: Vec<String>,
    /// Sizing figures worth showing.
    notes: Vec<String>,
}

impl Report {
    /// Counts a check; records `msg` when it failed.
    fn expect(&mut self, ok: bool, msg: impl FnOnce() -> String) {
        self.checks += 1;
        if !ok {
            self.failures.push(msg());
        }
    }

    fn fail(&mut self, msg: String) {
        self.checks += 1;
        self.failures.push(msg);
    }
}

// ---------------------------------------------------------------------------------------------
// Files

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn rel<'a>(root: &Path, p: &'a Path) -> &'a Path {
    p.strip_prefix(root).unwrap_or(p)
}

fn subdirs(dir: &Path) -> Result<Vec<PathBuf>> {
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

fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
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
fn parse_yaml_docs(text: &str) -> Result<Vec<Value>> {
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

fn parse_single_yaml(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut docs = parse_yaml_docs(&text).with_context(|| format!("parsing {}", path.display()))?;
    match docs.len() {
        1 => Ok(docs.remove(0)),
        n => bail!("{}: expected one YAML document, found {n}", path.display()),
    }
}

/// The Kubernetes objects of a manifest file.
fn parse_objects(path: &Path) -> Result<Vec<Value>> {
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

// ---------------------------------------------------------------------------------------------
// JSON helpers

fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(v, path).and_then(Value::as_str)
}

fn arr_at<'a>(v: &'a Value, path: &[&str]) -> &'a [Value] {
    at(v, path)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn string_map(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

fn kind_of(v: &Value) -> &str {
    str_at(v, &["kind"]).unwrap_or("")
}

fn name_of(v: &Value) -> &str {
    str_at(v, &["metadata", "name"]).unwrap_or("")
}

fn namespace_of(v: &Value) -> &str {
    str_at(v, &["metadata", "namespace"]).unwrap_or("default")
}

fn id_of(v: &Value) -> String {
    match str_at(v, &["metadata", "namespace"]) {
        Some(ns) => format!("{}/{} in {ns}", kind_of(v), name_of(v)),
        None => format!("{}/{}", kind_of(v), name_of(v)),
    }
}

fn count_kinds(objects: &[Value]) -> String {
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
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

// ---------------------------------------------------------------------------------------------
// The kustomize subset

const KUSTOMIZATION_FILES: [&str; 3] = ["kustomization.yaml", "kustomization.yml", "Kustomization"];
const KUSTOMIZATION_KEYS: [&str; 7] = [
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "labels",
    "images",
    "patches",
];

/// Kinds the namespace transformer sets `metadata.namespace` on.
const NAMESPACED: [&str; 21] = [
    "ConfigMap",
    "CronJob",
    "DaemonSet",
    "Deployment",
    "Endpoints",
    "EndpointSlice",
    "HorizontalPodAutoscaler",
    "Ingress",
    "Job",
    "LimitRange",
    "NetworkPolicy",
    "PersistentVolumeClaim",
    "Pod",
    "PodDisruptionBudget",
    "ReplicaSet",
    "ResourceQuota",
    "Role",
    "Secret",
    "Service",
    "ServiceAccount",
    "StatefulSet",
];
/// Kinds it leaves alone.
const CLUSTER_SCOPED: [&str; 9] = [
    "ClusterRole",
    "CSIDriver",
    "IngressClass",
    "Namespace",
    "Node",
    "PersistentVolume",
    "PriorityClass",
    "RuntimeClass",
    "StorageClass",
];

/// kustomize's output order ("legacy"): these kinds first, in this order, everything else
/// after them, by group, version and kind, then namespace and name.
const ORDER_FIRST: [&str; 22] = [
    "Namespace",
    "ResourceQuota",
    "StorageClass",
    "CustomResourceDefinition",
    "ServiceAccount",
    "PodSecurityPolicy",
    "Role",
    "ClusterRole",
    "RoleBinding",
    "ClusterRoleBinding",
    "ConfigMap",
    "Secret",
    "Endpoints",
    "Service",
    "LimitRange",
    "PriorityClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "Deployment",
    "StatefulSet",
    "CronJob",
    "PodDisruptionBudget",
];

/// Renders the kustomization in `dir` (and every kustomization it includes).
pub(crate) fn render_kustomization(dir: &Path) -> Result<Vec<Value>> {
    let mut stack = Vec::new();
    let mut objects = render_dir(dir, &mut stack)?;
    objects.sort_by_key(|o| {
        let kind = kind_of(o);
        let rank = ORDER_FIRST
            .iter()
            .position(|k| *k == kind)
            .map_or(0, |i| i as i64 - ORDER_FIRST.len() as i64);
        let api = str_at(o, &["apiVersion"]).unwrap_or("");
        let (group, version) = api.split_once('/').unwrap_or(("~G", api));
        (
            rank,
            format!("{group}_{version}_{kind}"),
            str_at(o, &["metadata", "namespace"])
                .unwrap_or("")
                .to_owned(),
            name_of(o).to_owned(),
        )
    });
    Ok(objects)
}

fn render_dir(dir: &Path, stack: &mut Vec<PathBuf>) -> Result<Vec<Value>> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("no directory {}", dir.display()))?;
    if stack.contains(&dir) {
        bail!("{}: kustomizations include each other", dir.display());
    }
    stack.push(dir.clone());
    let found: Vec<PathBuf> = KUSTOMIZATION_FILES
        .iter()
        .map(|n| dir.join(n))
        .filter(|p| p.is_file())
        .collect();
    let file = match found.as_slice() {
        [one] => one.clone(),
        [] => bail!("{}: no kustomization.yaml", dir.display()),
        _ => bail!("{}: more than one kustomization file", dir.display()),
    };
    let at_file = |msg: String| anyhow!("{}: {msg}", file.display());
    let k = parse_single_yaml(&file)?;
    let k = k
        .as_object()
        .ok_or_else(|| at_file("not a mapping".into()))?;
    for key in k.keys() {
        if !KUSTOMIZATION_KEYS.contains(&key.as_str()) {
            return Err(at_file(format!(
                "`{key}` is not implemented by deploy-check's renderer, which knows only {}; \
                 use those, or teach xtask/src/deploy_check.rs the field first",
                KUSTOMIZATION_KEYS[2..].join(", ")
            )));
        }
    }
    if let Some(v) = k.get("apiVersion")
        && v.as_str() != Some("kustomize.config.k8s.io/v1beta1")
    {
        return Err(at_file(format!(
            "apiVersion {v} is not kustomize.config.k8s.io/v1beta1"
        )));
    }
    if let Some(v) = k.get("kind")
        && v.as_str() != Some("Kustomization")
    {
        return Err(at_file(format!("kind {v} is not Kustomization")));
    }

    let mut objects = Vec::new();
    for r in k.get("resources").map_or(Ok(&[][..]), |v| {
        v.as_array()
            .map(Vec::as_slice)
            .ok_or_else(|| at_file("resources is not a list".into()))
    })? {
        let r = r
            .as_str()
            .ok_or_else(|| at_file(format!("resource {r} is not a path")))?;
        if r.contains("://") || r.starts_with("github.com/") {
            return Err(at_file(format!("remote resource {r} is not supported")));
        }
        let path = dir.join(r);
        if path.is_dir() {
            objects.extend(render_dir(&path, stack)?);
        } else {
            let canonical = path
                .canonicalize()
                .map_err(|e| at_file(format!("resource {r}: {e}")))?;
            if !canonical.starts_with(&dir) {
                return Err(at_file(format!(
                    "resource file {r} is outside the kustomization's directory \
                     (kustomize's load restrictor refuses it; include its directory instead)"
                )));
            }
            objects.extend(parse_objects(&canonical)?);
        }
    }
    let mut ids = BTreeSet::new();
    for o in &objects {
        let id = (
            str_at(o, &["apiVersion"]).unwrap_or("").to_owned(),
            id_of(o),
        );
        if !ids.insert(id) {
            return Err(at_file(format!("{} is defined twice", id_of(o))));
        }
    }
    // kustomize's order: patches, then namespace, labels, images.
    if let Some(p) = k.get("patches") {
        apply_patches(&mut objects, p).map_err(|e| at_file(format!("{e:#}")))?;
    }
    if let Some(ns) = k.get("namespace") {
        let ns = ns
            .as_str()
            .ok_or_else(|| at_file("namespace is not a string".into()))?;
        apply_namespace(&mut objects, ns).map_err(|e| at_file(format!("{e:#}")))?;
    }
    if let Some(l) = k.get("labels") {
        apply_labels(&mut objects, l).map_err(|e| at_file(format!("{e:#}")))?;
    }
    if let Some(i) = k.get("images") {
        apply_images(&mut objects, i).map_err(|e| at_file(format!("{e:#}")))?;
    }
    stack.pop();
    Ok(objects)
}

fn only_keys(what: &str, m: &Map<String, Value>, allowed: &[&str]) -> Result<()> {
    for key in m.keys() {
        if !allowed.contains(&key.as_str()) {
            bail!(
                "{what}.{key} is not implemented by deploy-check's renderer (it takes {})",
                allowed.join(", ")
            );
        }
    }
    Ok(())
}

fn apply_patches(objects: &mut [Value], patches: &Value) -> Result<()> {
    let list = patches
        .as_array()
        .ok_or_else(|| anyhow!("patches is not a list"))?;
    for (i, p) in list.iter().enumerate() {
        let what = format!("patches[{i}]");
        let p = p
            .as_object()
            .ok_or_else(|| anyhow!("{what} is not a mapping"))?;
        only_keys(&what, p, &["patch", "target"])?;
        let target = p
            .get("target")
            .and_then(Value::as_object)
            .ok_or_else(|| anyhow!("{what} has no target"))?;
        only_keys(&format!("{what}.target"), target, &["kind", "name"])?;
        let kind = target
            .get("kind")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("{what}.target has no kind"))?;
        let name = target
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("{what}.target has no name"))?;
        // kustomize reads both as anchored regular expressions: plain words match the same.
        if !kind.chars().all(|c| c.is_ascii_alphanumeric())
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            bail!(
                "{what}.target {kind}/{name}: only plain kinds and names (a-z, 0-9, -) are supported"
            );
        }
        let text = p.get("patch").and_then(Value::as_str).ok_or_else(|| {
            anyhow!("{what} has no inline `patch` (patch files are not supported)")
        })?;
        let ops: yaml_serde::Value =
            yaml_serde::from_str(text).with_context(|| format!("{what}: parsing the patch"))?;
        let ops = serde_json::to_value(&ops)?;
        if !ops.is_array() {
            bail!(
                "{what} is not a list of JSON6902 operations (strategic-merge patches are not implemented)"
            );
        }
        let patch: json_patch::Patch = serde_json::from_value(ops)
            .with_context(|| format!("{what}: not valid JSON6902 operations"))?;
        let mut matched = 0;
        for o in objects.iter_mut() {
            if kind_of(o) == kind && name_of(o) == name {
                json_patch::patch(o, &patch)
                    .map_err(|e| anyhow!("{what} on {kind}/{name}: {e}"))?;
                matched += 1;
            }
        }
        if matched == 0 {
            bail!(
                "{what}: target {kind}/{name} matches nothing (kustomize would skip it silently)"
            );
        }
    }
    Ok(())
}

fn apply_namespace(objects: &mut [Value], ns: &str) -> Result<()> {
    for o in objects.iter_mut() {
        let kind = kind_of(o).to_owned();
        if kind == "Namespace" {
            if name_of(o) != ns {
                bail!(
                    "Namespace/{} differs from `namespace: {ns}` (kustomize's handling of that is not implemented)",
                    name_of(o)
                );
            }
        } else if CLUSTER_SCOPED.contains(&kind.as_str()) {
        } else if NAMESPACED.contains(&kind.as_str()) {
            if let Some(meta) = o.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.insert("namespace".into(), Value::String(ns.to_owned()));
            }
        } else {
            bail!(
                "{}: how kustomize's namespace transformer treats kind {kind} is not implemented",
                id_of(o)
            );
        }
    }
    Ok(())
}

fn apply_labels(objects: &mut [Value], labels: &Value) -> Result<()> {
    let list = labels
        .as_array()
        .ok_or_else(|| anyhow!("labels is not a list"))?;
    for (i, entry) in list.iter().enumerate() {
        let what = format!("labels[{i}]");
        let entry = entry
            .as_object()
            .ok_or_else(|| anyhow!("{what} is not a mapping"))?;
        only_keys(
            &what,
            entry,
            &["pairs", "includeSelectors", "includeTemplates"],
        )?;
        for flag in ["includeSelectors", "includeTemplates"] {
            if entry.get(flag).is_some_and(|v| v != &Value::Bool(false)) {
                bail!(
                    "{what}.{flag}: only false is implemented (selectors and templates stay as written)"
                );
            }
        }
        let pairs = entry
            .get("pairs")
            .and_then(Value::as_object)
            .ok_or_else(|| anyhow!("{what} has no pairs"))?;
        for (k, v) in pairs {
            if !v.is_string() {
                bail!("{what}.pairs.{k}: label values must be strings (quote it)");
            }
        }
        for o in objects.iter_mut() {
            let Some(meta) = o.get_mut("metadata").and_then(Value::as_object_mut) else {
                continue;
            };
            let labels = meta
                .entry("labels")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Some(labels) = labels.as_object_mut() {
                for (k, v) in pairs {
                    labels.insert(k.clone(), v.clone());
                }
            }
        }
    }
    Ok(())
}

/// An image reference split into name, tag and digest.
fn split_image(image: &str) -> (&str, Option<&str>, Option<&str>) {
    let (rest, digest) = match image.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (image, None),
    };
    let last = rest.rfind('/').map_or(0, |i| i + 1);
    match rest[last..].rfind(':') {
        Some(c) => (&rest[..last + c], Some(&rest[last + c + 1..]), digest),
        None => (rest, None, digest),
    }
}

fn apply_images(objects: &mut [Value], images: &Value) -> Result<()> {
    let list = images
        .as_array()
        .ok_or_else(|| anyhow!("images is not a list"))?;
    for (i, entry) in list.iter().enumerate() {
        let what = format!("images[{i}]");
        let entry = entry
            .as_object()
            .ok_or_else(|| anyhow!("{what} is not a mapping"))?;
        only_keys(&what, entry, &["name", "newName", "newTag", "digest"])?;
        let field = |k: &str| -> Result<Option<String>> {
            match entry.get(k) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(v) => bail!("{what}.{k} is {v}, not a string (quote it)"),
            }
        };
        let name = field("name")?.ok_or_else(|| anyhow!("{what} has no name"))?;
        let (new_name, new_tag, digest) = (field("newName")?, field("newTag")?, field("digest")?);
        let retag = |image: &str| -> Option<String> {
            let (n, tag, dig) = split_image(image);
            if n != name {
                return None;
            }
            let n = new_name.as_deref().unwrap_or(n);
            Some(match (&digest, &new_tag) {
                (Some(d), _) => format!("{n}@{d}"),
                (None, Some(t)) => format!("{n}:{t}"),
                (None, None) => {
                    let mut s = n.to_owned();
                    if let Some(t) = tag {
                        s = format!("{s}:{t}");
                    }
                    if let Some(d) = dig {
                        s = format!("{s}@{d}");
                    }
                    s
                }
            })
        };
        for o in objects.iter_mut() {
            retag_containers(o, &retag);
        }
    }
    Ok(())
}

/// Applies `retag` to the image of every entry of every `containers` or `initContainers`
/// list anywhere in `v`.
fn retag_containers(v: &mut Value, retag: &dyn Fn(&str) -> Option<String>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m.iter_mut() {
                if k == "containers" || k == "initContainers" {
                    for c in child.as_array_mut().into_iter().flatten() {
                        if let Some(Value::String(image)) = c.get_mut("image")
                            && let Some(new) = retag(image)
                        {
                            *image = new;
                        }
                    }
                }
                retag_containers(child, retag);
            }
        }
        Value::Array(a) => {
            for x in a {
                retag_containers(x, retag);
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// YAML output. Strings are written plain only when every YAML reader (1.1 ones such as
// PyYAML and older Go libraries included) reads them back as the same string; otherwise they
// are double-quoted, JSON style.

fn to_yaml_docs(docs: &[Value]) -> Result<String> {
    let mut out = String::new();
    for d in docs {
        out.push_str("---\n");
        match d {
            Value::Object(m) if !m.is_empty() => emit_map(m, 0, false, &mut out),
            Value::Array(a) if !a.is_empty() => emit_seq(a, 0, false, &mut out),
            other => {
                out.push_str(&scalar(other));
                out.push('\n');
            }
        }
    }
    // The writer is ours: prove it wrote what was meant.
    let back = parse_yaml_docs(&out).context("re-reading the rendered YAML")?;
    if back != docs {
        bail!("internal error: the rendered YAML does not read back as the rendered objects");
    }
    Ok(out)
}

fn pad(out: &mut String, indent: usize) {
    out.extend(std::iter::repeat_n(' ', indent));
}

fn emit_map(m: &Map<String, Value>, indent: usize, inline_first: bool, out: &mut String) {
    for (i, (k, v)) in m.iter().enumerate() {
        if !(inline_first && i == 0) {
            pad(out, indent);
        }
        out.push_str(&yaml_string(k));
        out.push(':');
        match v {
            Value::Object(c) if !c.is_empty() => {
                out.push('\n');
                emit_map(c, indent + 2, false, out);
            }
            Value::Array(a) if !a.is_empty() => {
                out.push('\n');
                emit_seq(a, indent, false, out);
            }
            _ => {
                out.push(' ');
                out.push_str(&scalar(v));
                out.push('\n');
            }
        }
    }
}

fn emit_seq(a: &[Value], indent: usize, inline_first: bool, out: &mut String) {
    for (i, item) in a.iter().enumerate() {
        if !(inline_first && i == 0) {
            pad(out, indent);
        }
        out.push_str("- ");
        match item {
            Value::Object(c) if !c.is_empty() => emit_map(c, indent + 2, true, out),
            Value::Array(x) if !x.is_empty() => emit_seq(x, indent + 2, true, out),
            _ => {
                out.push_str(&scalar(item));
                out.push('\n');
            }
        }
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => yaml_string(s),
        Value::Object(_) => "{}".into(),
        Value::Array(_) => "[]".into(),
    }
}

fn yaml_string(s: &str) -> String {
    const SPECIAL: [&str; 9] = ["y", "n", "yes", "no", "on", "off", "true", "false", "null"];
    let plain = s
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '/' || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        && !SPECIAL.contains(&s.to_ascii_lowercase().as_str());
    if plain {
        s.to_owned()
    } else {
        Value::String(s.to_owned()).to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// kubectl kustomize, when installed

fn compare_with_kubectl(dir: &Path, ours: &[Value], report: &mut Report) -> String {
    let name = file_name(dir);
    let output = match Process::new("kubectl").arg("kustomize").arg(dir).output() {
        Ok(o) => o,
        Err(_) => return format!("{name}: kubectl not found, comparison skipped"),
    };
    if !output.status.success() {
        report.fail(format!(
            "overlay {name}: `kubectl kustomize` refused it: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
        return format!("{name}: kubectl kustomize failed");
    }
    let theirs = match parse_yaml_docs(&String::from_utf8_lossy(&output.stdout)) {
        Ok(t) => t,
        Err(e) => {
            report.fail(format!(
                "overlay {name}: kubectl's output does not parse: {e:#}"
            ));
            return format!("{name}: unreadable output");
        }
    };
    let key = |o: &Value| {
        (
            str_at(o, &["apiVersion"]).unwrap_or("").to_owned(),
            id_of(o),
        )
    };
    let ours_by: BTreeMap<_, _> = ours.iter().map(|o| (key(o), o)).collect();
    let theirs_by: BTreeMap<_, _> = theirs.iter().map(|o| (key(o), o)).collect();
    let mut differences = Vec::new();
    for (k, o) in &ours_by {
        match theirs_by.get(k) {
            None => differences.push(format!("{} only in deploy-check's rendering", k.1)),
            Some(t) if t != o => differences.push(format!(
                "{} differs at {}",
                k.1,
                first_difference(o, t, String::new())
            )),
            Some(_) => {}
        }
    }
    for k in theirs_by.keys() {
        if !ours_by.contains_key(k) {
            differences.push(format!("{} only in kubectl's rendering", k.1));
        }
    }
    let same_order = ours.iter().map(key).eq(theirs.iter().map(key));
    report.expect(differences.is_empty(), || {
        format!(
            "overlay {name}: deploy-check's rendering differs from `kubectl kustomize`: {}",
            differences.join("; ")
        )
    });
    if differences.is_empty() {
        format!(
            "{name}: identical objects{}",
            if same_order {
                ", same order"
            } else {
                " (order differs)"
            }
        )
    } else {
        format!("{name}: DIFFERENT")
    }
}

fn first_difference(a: &Value, b: &Value, path: String) -> String {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for k in x.keys().chain(y.keys()) {
                match (x.get(k), y.get(k)) {
                    (Some(p), Some(q)) if p == q => {}
                    (Some(p), Some(q)) => return first_difference(p, q, format!("{path}/{k}")),
                    _ => return format!("{path}/{k}"),
                }
            }
            path
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                if p != q {
                    return first_difference(p, q, format!("{path}/{i}"));
                }
            }
            path
        }
        _ => format!("{path} ({a} vs {b})"),
    }
}

// ---------------------------------------------------------------------------------------------
// Schemas: kubernetes-validate from PyPI, in a venv of its own

fn validate_schemas(
    out: &Path,
    version: &str,
    files: &[PathBuf],
    report: &mut Report,
) -> Result<String> {
    let venv = out.join("venv");
    let exe = venv.join("bin").join("kubernetes-validate");
    let installed = Process::new(&exe)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| {
            String::from_utf8_lossy(&o.stdout).contains(KUBERNETES_VALIDATE_VERSION)
                || String::from_utf8_lossy(&o.stderr).contains(KUBERNETES_VALIDATE_VERSION)
        });
    if !installed {
        println!(
            "deploy-check: installing kubernetes-validate {KUBERNETES_VALIDATE_VERSION} into {}",
            venv.display()
        );
        if !venv.join("bin").join("python").exists() {
            run(Process::new("python3").arg("-m").arg("venv").arg(&venv))
                .context("making a Python venv (python3 with the venv module is needed; --skip-schemas skips this step)")?;
        }
        run(Process::new(venv.join("bin").join("python"))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg(format!(
                "kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"
            )))
        .context("installing kubernetes-validate from PyPI")?;
    }
    let mut valid = 0;
    for f in files {
        let o = Process::new(&exe)
            .args(["--strict", "--quiet", "--kubernetes-version", version])
            .arg(f)
            .output()
            .with_context(|| format!("running {}", exe.display()))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        report.expect(o.status.success(), || {
            format!(
                "{}: kubernetes-validate {version} --strict: {}",
                f.display(),
                text.trim()
            )
        });
        if o.status.success() {
            valid += 1;
        }
    }
    Ok(format!(
        "{valid} of {} files valid against Kubernetes {version} (strict, kubernetes-validate {KUBERNETES_VALIDATE_VERSION})",
        files.len()
    ))
}

fn run(cmd: &mut Process) -> Result<()> {
    let o = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !o.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Quantities and durations

/// Bytes of a Kubernetes quantity such as `1536Mi`, `48Gi`, `500M` or `1e9`, rounded up.
fn quantity_bytes(q: &Value) -> Option<u128> {
    let s = match q {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    let mantissa: u128 = format!("{int}{frac}").parse().ok()?;
    let scale = 10u128.checked_pow(u32::try_from(frac.len()).ok()?)?;
    let multiplier: u128 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        e if e.starts_with(['e', 'E']) => 10u128.checked_pow(e[1..].parse().ok()?)?,
        _ => return None,
    };
    Some((mantissa * multiplier).div_ceil(scale))
}

fn duration_secs(s: &str) -> Option<f64> {
    humantime::parse_duration(s).ok().map(|d| d.as_secs_f64())
}

// ---------------------------------------------------------------------------------------------
// The binaries' command lines

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Daemon {
    Ingest,
    Uploader,
    /// `uploader drain`: the one-shot subcommand.
    Drain,
}

impl Daemon {
    fn label(self) -> &'static str {
        match self {
            Daemon::Ingest => "ingest",
            Daemon::Uploader => "uploader",
            Daemon::Drain => "uploader drain",
        }
    }
}

/// The parsed command line of one container: every flag's effective raw values (given or
/// default) by long name, and which were given.
#[derive(Debug, Default)]
struct Flags {
    values: BTreeMap<String, Vec<String>>,
    given: BTreeSet<String>,
}

impl Flags {
    fn get(&self, long: &str) -> Option<&str> {
        self.values
            .get(long)
            .and_then(|v| v.first())
            .map(String::as_str)
    }

    fn all(&self, long: &str) -> &[String] {
        self.values.get(long).map_or(&[], Vec::as_slice)
    }
}

/// The binary's clap command with every environment fallback removed, so that only the
/// manifest's own arguments (and the variables it sets, added as arguments) are parsed.
fn clap_command(daemon: Daemon) -> clap::Command {
    let strip = |a: clap::Arg| a.env(None::<&'static str>);
    let cmd = match daemon {
        Daemon::Ingest => spillway_ingest::Args::command(),
        Daemon::Uploader | Daemon::Drain => spillway_uploader::Args::command(),
    };
    cmd.mut_args(strip)
        .mut_subcommands(move |s| s.mut_args(strip))
}

/// The `SPILLWAY_*` variable of every argument of the daemon (its subcommand's too), by
/// variable, with the argument's long name.
fn clap_env(daemon: Daemon) -> BTreeMap<String, String> {
    let cmd = match daemon {
        Daemon::Ingest => spillway_ingest::Args::command(),
        Daemon::Uploader | Daemon::Drain => spillway_uploader::Args::command(),
    };
    let sub = match daemon {
        Daemon::Drain => cmd.find_subcommand("drain").cloned(),
        _ => None,
    };
    let mut out = BTreeMap::new();
    for c in std::iter::once(&cmd).chain(sub.as_ref()) {
        for a in c.get_arguments() {
            if let (Some(env), Some(long)) = (a.get_env(), a.get_long()) {
                out.insert(env.to_string_lossy().into_owned(), long.to_owned());
            }
        }
    }
    out
}

/// Parses a container's command line (plus the literal `SPILLWAY_*` variables it sets) with the
/// binary's own parser.
fn parse_command_line(
    daemon: Daemon,
    args: &[String],
    env: &[(String, Option<String>)],
) -> std::result::Result<Flags, String> {
    let mut cmd = clap_command(daemon);
    if daemon == Daemon::Drain && cmd.find_subcommand("drain").is_none() {
        return Err(
            "the uploader has no `drain` subcommand (spillway_uploader::Args defines none)".into(),
        );
    }
    let env_flags = clap_env(daemon);
    let mut flags = Flags::default();
    let mut argv: Vec<String> = vec![cmd.get_name().to_owned()];
    argv.extend(args.iter().cloned());
    let given_long: BTreeSet<String> = args
        .iter()
        .filter_map(|a| a.strip_prefix("--"))
        .map(|a| a.split('=').next().unwrap_or(a).to_owned())
        .collect();
    let sub = if daemon == Daemon::Drain {
        cmd.find_subcommand("drain").cloned()
    } else {
        None
    };
    let scope = sub.clone().unwrap_or_else(|| cmd.clone());
    for (name, value) in env {
        let Some(long) = env_flags.get(name) else {
            if name.starts_with("SPILLWAY_") {
                return Err(format!(
                    "env {name} is not read by {} (no argument has it as its variable)",
                    daemon.label()
                ));
            }
            continue;
        };
        if given_long.contains(long) {
            return Err(format!(
                "env {name} and --{long} are both set; the flag wins, so the variable is dead configuration"
            ));
        }
        let Some(value) = value else { continue };
        let takes_no_value = scope.get_arguments().any(|a| {
            a.get_long() == Some(long.as_str())
                && matches!(
                    a.get_action(),
                    clap::ArgAction::SetTrue | clap::ArgAction::SetFalse | clap::ArgAction::Count
                )
        });
        if takes_no_value {
            if matches!(value.as_str(), "true" | "1" | "yes" | "on") {
                argv.push(format!("--{long}"));
            }
        } else {
            argv.push(format!("--{long}={value}"));
        }
    }
    let matches = cmd.try_get_matches_from_mut(&argv).map_err(|e| {
        let text = e.to_string();
        let first = text.lines().next().unwrap_or("").trim();
        format!(
            "`{}` is refused by the binary's parser: {}",
            argv.join(" "),
            first.trim_start_matches("error: ")
        )
    })?;
    let (matches, scope) = match daemon {
        Daemon::Drain => match (matches.subcommand_matches("drain"), sub) {
            (Some(m), Some(s)) => (m.clone(), s),
            _ => {
                return Err(format!(
                    "`{}` does not run the drain subcommand (its first argument must be `drain`)",
                    argv.join(" ")
                ));
            }
        },
        _ => {
            if let Some((name, _)) = matches.subcommand() {
                return Err(format!(
                    "`{}` runs the `{name}` subcommand, not the daemon",
                    argv.join(" ")
                ));
            }
            (matches, cmd)
        }
    };
    for a in scope.get_arguments() {
        let (Some(long), id) = (a.get_long(), a.get_id().as_str()) else {
            continue;
        };
        let raw: Vec<String> = matches
            .try_get_raw(id)
            .ok()
            .flatten()
            .map(|r| r.map(|s| s.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        if matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine) {
            flags.given.insert(long.to_owned());
        }
        flags.values.insert(long.to_owned(), raw);
    }
    Ok(flags)
}

// ---------------------------------------------------------------------------------------------
// Kubernetes objects

/// A pod template and what owns it.
#[derive(Debug)]
struct PodTemplate {
    owner: String,
    owner_kind: String,
    namespace: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    spec: Value,
    workload: Value,
}

impl PodTemplate {
    fn containers(&self) -> impl Iterator<Item = &Value> {
        arr_at(&self.spec, &["containers"])
            .iter()
            .chain(arr_at(&self.spec, &["initContainers"]))
    }

    /// The volume claim templates of a StatefulSet, by name.
    fn claim_templates(&self) -> BTreeMap<String, &Value> {
        arr_at(&self.workload, &["spec", "volumeClaimTemplates"])
            .iter()
            .map(|c| (name_of(c).to_owned(), c))
            .collect()
    }

    fn volume(&self, name: &str) -> Option<&Value> {
        arr_at(&self.spec, &["volumes"])
            .iter()
            .find(|v| str_at(v, &["name"]) == Some(name))
    }

    /// The container port `target` (a name or a number) names, with its protocol.
    fn port(&self, target: &Value) -> Option<(i64, String)> {
        self.containers().find_map(|c| container_port(c, target))
    }
}

fn container_port(c: &Value, target: &Value) -> Option<(i64, String)> {
    arr_at(c, &["ports"]).iter().find_map(|p| {
        let number = at(p, &["containerPort"]).and_then(Value::as_i64)?;
        let hit = match target {
            Value::String(name) => str_at(p, &["name"]) == Some(name.as_str()),
            Value::Number(n) => n.as_i64() == Some(number),
            _ => false,
        };
        hit.then(|| (number, str_at(p, &["protocol"]).unwrap_or("TCP").to_owned()))
    })
}

fn pod_templates(objects: &[Value]) -> Vec<PodTemplate> {
    let mut out = Vec::new();
    for o in objects {
        let template = match kind_of(o) {
            "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
                at(o, &["spec", "template"])
            }
            "CronJob" => at(o, &["spec", "jobTemplate", "spec", "template"]),
            "Pod" => Some(o),
            _ => None,
        };
        let Some(t) = template else { continue };
        out.push(PodTemplate {
            owner: id_of(o),
            owner_kind: kind_of(o).to_owned(),
            namespace: namespace_of(o).to_owned(),
            labels: string_map(at(t, &["metadata", "labels"])),
            annotations: string_map(at(t, &["metadata", "annotations"])),
            spec: at(t, &["spec"]).cloned().unwrap_or(Value::Null),
            workload: o.clone(),
        });
    }
    out
}

/// Which daemon a container runs, by its command (or its image's, which has none).
fn daemon_of(c: &Value) -> Option<Daemon> {
    let command = arr_at(c, &["command"]);
    let bin = command.first().and_then(Value::as_str)?;
    let bin = bin.rsplit('/').next().unwrap_or(bin);
    let first_arg = arr_at(c, &["args"]).first().and_then(Value::as_str);
    match bin {
        "ingest" => Some(Daemon::Ingest),
        "uploader" if first_arg == Some("drain") => Some(Daemon::Drain),
        "uploader" => Some(Daemon::Uploader),
        _ => None,
    }
}

/// Checks one set of objects (a rendered overlay, or a standalone manifest).
fn check_objects(
    scope: &str,
    objects: &[Value],
    examples: &[Value],
    image: &DockerImage,
    report: &mut Report,
) {
    let pods = pod_templates(objects);
    let services: Vec<&Value> = objects.iter().filter(|o| kind_of(o) == "Service").collect();
    let mut images = BTreeSet::new();
    let mut daemons = Vec::new();

    for pod in &pods {
        check_pod_security(scope, pod, report);
        check_secret_refs(scope, pod, objects, examples, report);
        for c in pod.containers() {
            let cname = str_at(c, &["name"]).unwrap_or("?");
            let at_c = format!("{scope}: {} container {cname}", pod.owner);
            for m in arr_at(c, &["volumeMounts"]) {
                let v = str_at(m, &["name"]).unwrap_or("");
                report.expect(
                    pod.volume(v).is_some() || pod.claim_templates().contains_key(v),
                    || format!("{at_c}: volumeMount {v} names no volume or volumeClaimTemplate"),
                );
            }
            let Some(daemon) = daemon_of(c) else { continue };
            if let Some(i) = str_at(c, &["image"]) {
                images.insert(i.to_owned());
            }
            for (port, proto) in container_ports(c) {
                report.expect(image.exposed.contains(&(port, proto.clone())), || {
                    format!("{at_c}: port {port}/{proto} is not EXPOSEd by deploy/Dockerfile")
                });
            }
            let args: Vec<String> = arr_at(c, &["args"])
                .iter()
                .map(|a| a.as_str().map_or_else(|| a.to_string(), str::to_owned))
                .collect();
            let env: Vec<(String, Option<String>)> = arr_at(c, &["env"])
                .iter()
                .filter_map(|e| {
                    let name = str_at(e, &["name"])?.to_owned();
                    Some((name, str_at(e, &["value"]).map(str::to_owned)))
                })
                .collect();
            match parse_command_line(daemon, &args, &env) {
                Ok(flags) => {
                    report.checks += 1;
                    daemons.push((daemon, pod, c, flags, at_c));
                }
                Err(e) => report.fail(format!("{at_c} ({}): {e}", daemon.label())),
            }
        }
    }
    report.expect(images.len() <= 1, || {
        format!(
            "{scope}: the daemons run different images ({}); one image serves both",
            images.iter().cloned().collect::<Vec<_>>().join(", ")
        )
    });

    for (daemon, pod, c, flags, at_c) in &daemons {
        check_daemon(*daemon, pod, c, flags, at_c, report);
        if *daemon == Daemon::Ingest {
            check_ingest_uploaders(pod, flags, at_c, &services, &daemons, report);
        }
    }
    check_services(scope, &services, &pods, report);
    check_other_objects(scope, objects, &pods, report);
}

fn container_ports(c: &Value) -> Vec<(i64, String)> {
    arr_at(c, &["ports"])
        .iter()
        .filter_map(|p| {
            Some((
                at(p, &["containerPort"]).and_then(Value::as_i64)?,
                str_at(p, &["protocol"]).unwrap_or("TCP").to_owned(),
            ))
        })
        .collect()
}

fn check_pod_security(scope: &str, pod: &PodTemplate, report: &mut Report) {
    let at_p = format!("{scope}: {}", pod.owner);
    let s = &pod.spec;
    let sc = |k: &str| at(s, &["securityContext", k]);
    report.expect(sc("runAsNonRoot") == Some(&Value::Bool(true)), || {
        format!("{at_p}: securityContext.runAsNonRoot must be true")
    });
    report.expect(
        sc("runAsUser").and_then(Value::as_i64) == Some(NONROOT),
        || {
            format!(
                "{at_p}: securityContext.runAsUser must be {NONROOT} (the image's nonroot user)"
            )
        },
    );
    report.expect(
        str_at(s, &["securityContext", "seccompProfile", "type"]) == Some("RuntimeDefault"),
        || format!("{at_p}: securityContext.seccompProfile.type must be RuntimeDefault"),
    );
    let has_claims = !pod.claim_templates().is_empty()
        || arr_at(s, &["volumes"])
            .iter()
            .any(|v| v.get("persistentVolumeClaim").is_some());
    if has_claims {
        report.expect(
            sc("fsGroup").and_then(Value::as_i64) == Some(NONROOT),
            || {
                format!(
                    "{at_p}: securityContext.fsGroup must be {NONROOT} so the volume is writable"
                )
            },
        );
    }
    for k in ["hostNetwork", "hostPID", "hostIPC"] {
        report.expect(at(s, &[k]) != Some(&Value::Bool(true)), || {
            format!("{at_p}: {k} must not be set")
        });
    }
    report.expect(
        at(s, &["enableServiceLinks"]) == Some(&Value::Bool(false)),
        || {
            format!(
                "{at_p}: enableServiceLinks must be false: Kubernetes would inject SPILLWAY_* \
                 variables named after the Services, which the daemons read as flags"
            )
        },
    );
    report.expect(
        at(s, &["automountServiceAccountToken"]) == Some(&Value::Bool(false)),
        || format!("{at_p}: automountServiceAccountToken must be false (the daemons never call the API)"),
    );
    for v in arr_at(s, &["volumes"]) {
        report.expect(v.get("hostPath").is_none(), || {
            format!(
                "{at_p}: volume {} is a hostPath",
                str_at(v, &["name"]).unwrap_or("?")
            )
        });
    }
    for c in pod.containers() {
        let at_c = format!("{at_p} container {}", str_at(c, &["name"]).unwrap_or("?"));
        let csc = |k: &str| at(c, &["securityContext", k]);
        report.expect(
            csc("allowPrivilegeEscalation") == Some(&Value::Bool(false)),
            || format!("{at_c}: allowPrivilegeEscalation must be false"),
        );
        report.expect(
            csc("readOnlyRootFilesystem") == Some(&Value::Bool(true)),
            || format!("{at_c}: readOnlyRootFilesystem must be true"),
        );
        report.expect(csc("privileged") != Some(&Value::Bool(true)), || {
            format!("{at_c}: privileged must not be set")
        });
        report.expect(
            arr_at(c, &["securityContext", "capabilities", "drop"])
                .iter()
                .any(|d| d.as_str() == Some("ALL")),
            || format!("{at_c}: capabilities.drop must contain ALL"),
        );
        report.expect(
            arr_at(c, &["securityContext", "capabilities", "add"]).is_empty(),
            || format!("{at_c}: no capability may be added"),
        );
        if let Some(uid) = csc("runAsUser") {
            report.expect(uid.as_i64() == Some(NONROOT), || {
                format!("{at_c}: runAsUser must be {NONROOT}")
            });
        }
    }
}

/// Every Secret a pod needs exists in the objects or in an example Secret file, with the keys.
fn check_secret_refs(
    scope: &str,
    pod: &PodTemplate,
    objects: &[Value],
    examples: &[Value],
    report: &mut Report,
) {
    let find = |name: &str| {
        objects
            .iter()
            .chain(examples)
            .find(|o| kind_of(o) == "Secret" && name_of(o) == name)
    };
    let has_key = |s: &Value, key: &str| {
        at(s, &["stringData", key]).is_some() || at(s, &["data", key]).is_some()
    };
    for c in pod.containers() {
        for e in arr_at(c, &["env"]) {
            let Some(r) = at(e, &["valueFrom", "secretKeyRef"]) else {
                continue;
            };
            let (name, key) = (
                str_at(r, &["name"]).unwrap_or(""),
                str_at(r, &["key"]).unwrap_or(""),
            );
            report.expect(find(name).is_some_and(|s| has_key(s, key)), || {
                format!(
                    "{scope}: {} env {}: Secret {name} with key {key} is neither defined nor in an example Secret file",
                    pod.owner,
                    str_at(e, &["name"]).unwrap_or("?")
                )
            });
        }
    }
    for v in arr_at(&pod.spec, &["volumes"]) {
        if let Some(name) = str_at(v, &["secret", "secretName"]) {
            report.expect(find(name).is_some(), || {
                format!(
                    "{scope}: {} volume {}: Secret {name} is neither defined nor in an example Secret file",
                    pod.owner,
                    str_at(v, &["name"]).unwrap_or("?")
                )
            });
        }
    }
}

fn check_daemon(
    daemon: Daemon,
    pod: &PodTemplate,
    c: &Value,
    flags: &Flags,
    at_c: &str,
    report: &mut Report,
) {
    let grace = at(&pod.spec, &["terminationGracePeriodSeconds"])
        .and_then(Value::as_f64)
        .unwrap_or(30.0);
    let limit = at(c, &["resources", "limits", "memory"]).and_then(quantity_bytes);
    let request = at(c, &["resources", "requests", "memory"]).and_then(quantity_bytes);
    let get_u128 = |long: &str| flags.get(long).and_then(|v| v.parse::<u128>().ok());
    let mounts: Vec<(&str, &str)> = arr_at(c, &["volumeMounts"])
        .iter()
        .filter_map(|m| Some((str_at(m, &["name"])?, str_at(m, &["mountPath"])?)))
        .collect();

    if daemon != Daemon::Drain {
        // Listening addresses, ports, probes, scraping.
        let mut expected = BTreeSet::new();
        for (long, proto) in [
            (
                "listen",
                if daemon == Daemon::Ingest {
                    "UDP"
                } else {
                    "TCP"
                },
            ),
            ("http-listen", "TCP"),
        ] {
            let addr = flags.get(long).and_then(|a| a.parse::<SocketAddr>().ok());
            report.expect(addr.is_some_and(|a| a.ip().is_unspecified()), || {
                format!(
                    "{at_c}: --{long} is {:?}; it must listen on 0.0.0.0 or [::] to be reachable in a pod",
                    flags.get(long).unwrap_or("")
                )
            });
            if let Some(a) = addr {
                expected.insert((i64::from(a.port()), proto.to_owned()));
            }
        }
        let declared: BTreeSet<(i64, String)> = container_ports(c).into_iter().collect();
        report.expect(declared == expected, || {
            format!(
                "{at_c}: containerPorts {declared:?} must be exactly the --listen/--http-listen ports {expected:?} (QUIC on UDP, the rest TCP)"
            )
        });
        let http_port = flags
            .get("http-listen")
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .map(|a| i64::from(a.port()));
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let p = at(c, &[probe, "httpGet"]);
            let port = p
                .and_then(|p| p.get("port"))
                .and_then(|t| container_port(c, t));
            report.expect(
                p.and_then(|p| str_at(p, &["path"])) == Some(path)
                    && port.is_some()
                    && port.map(|p| p.0) == http_port,
                || {
                    format!(
                        "{at_c}: {probe} must be an httpGet of {path} on a container port that is --http-listen's"
                    )
                },
            );
        }
        report.expect(
            container_port(c, &Value::String("metrics".into())).map(|p| p.0) == http_port,
            || format!("{at_c}: the --http-listen port must be a container port named `metrics`"),
        );
        if pod
            .annotations
            .get("prometheus.io/scrape")
            .map(String::as_str)
            == Some("true")
        {
            report.expect(
                pod.annotations
                    .get("prometheus.io/port")
                    .and_then(|p| p.parse::<i64>().ok())
                    == http_port,
                || format!("{at_c}: annotation prometheus.io/port must be the --http-listen port"),
            );
        }
        report.expect(at(c, &["resources", "requests", "cpu"]).is_some(), || {
            format!("{at_c}: resources.requests.cpu is needed (scheduling, the HPA)")
        });
        report.expect(limit.is_some() && limit == request, || {
            format!(
                "{at_c}: resources.requests.memory must equal limits.memory (the limit is the daemon's bound, sized by formula; overcommitting it invites eviction)"
            )
        });
    }

    if daemon != Daemon::Drain {
        // The ingest → uploader link is mutual TLS from Secrets, never plaintext.
        report.expect(!flags.given.contains("insecure-internal"), || {
            format!("{at_c}: --insecure-internal leaves the gRPC link unauthenticated; give --internal-ca, --internal-cert and --internal-key")
        });
        for long in ["internal-ca", "internal-cert", "internal-key"] {
            report.expect(secret_file(pod, flags, &mounts, long), || {
                format!(
                    "{at_c}: --{long} must name a file of a mounted Secret (the link is mutual TLS)"
                )
            });
        }
    }
    match daemon {
        Daemon::Ingest => {
            let shutdown = flags.get("shutdown-grace").and_then(duration_secs);
            report.expect(shutdown.is_some_and(|s| grace >= s + 10.0), || {
                format!(
                    "{at_c}: terminationGracePeriodSeconds {grace} must exceed --shutdown-grace ({}) by at least 10 s (goodbyes wait up to 5 s, the QUIC close 2 s)",
                    flags.get("shutdown-grace").unwrap_or("?")
                )
            });
            for long in ["tls-cert", "tls-key"] {
                report.expect(secret_file(pod, flags, &mounts, long), || {
                    format!(
                        "{at_c}: --{long} must name a file of a mounted Secret (without a certificate ingest writes a self-signed one, which devices do not trust, onto a read-only filesystem)"
                    )
                });
            }
            // Devices prove their uid: a fleet's ingest never runs `--auth none`.
            let auth = flags.get("auth");
            report.expect(matches!(auth, Some("token" | "mtls")), || {
                format!("{at_c}: ingest must run --auth token or --auth mtls (devices write only as the uid their credential names)")
            });
            let material = if auth == Some("mtls") {
                "device-ca"
            } else {
                "token-keys"
            };
            report.expect(secret_file(pod, flags, &mounts, material), || {
                format!("{at_c}: --{material} must name a file of a mounted Secret")
            });
            let (b, s, f, secs) = (
                get_u128("max-buffered-bytes"),
                get_u128("max-sessions"),
                get_u128("max-frame-bytes"),
                get_u128("chunk-seconds"),
            );
            if let (Some(b), Some(s), Some(f), Some(secs)) = (b, s, f, secs) {
                let need = ingest_memory(b, s, f);
                report.notes.push(format!(
                    "{at_c}: memory bound {} MiB (B={b}, S={s}, F={f}), limit {} MiB",
                    need.div_ceil(MIB),
                    limit.map_or("unset".into(), |l| (l / MIB).to_string())
                ));
                report.expect(limit.is_some_and(|l| l >= need), || {
                    format!(
                        "{at_c}: memory limit {} is below B + S·({window} + 2·F + 65,536) + 64 MiB = {need} bytes ({} MiB) for B={b}, S={s}, F={f}",
                        limit.map_or("unset".into(), |l| l.to_string()),
                        need.div_ceil(MIB),
                        window = spillway_ingest::STREAM_RECEIVE_WINDOW,
                    )
                });
                let least = u32::try_from(secs).map_or(u128::MAX, |secs| {
                    spillway_ingest::budget::min_budget(
                        usize::try_from(s).unwrap_or(usize::MAX),
                        secs,
                    ) as u128
                });
                report.expect(b >= least, || {
                    format!(
                        "{at_c}: --max-buffered-bytes {b} must hold a 16 KiB first step per session and one largest chunk ({least} bytes; ingest refuses to start below it)"
                    )
                });
                let per_session = 2 * secs * 16_000 * 2;
                if b < s * per_session {
                    report.warnings.push(format!(
                        "{at_c}: --max-buffered-bytes {b} < 2·{s} sessions·{} bytes: 16-kHz sessions will wait for the budget at full load",
                        per_session / 2
                    ));
                }
            }
        }
        Daemon::Uploader | Daemon::Drain => {
            let drain = flags.get("drain-timeout").and_then(duration_secs);
            if daemon == Daemon::Uploader {
                report.expect(drain.is_some_and(|d| grace >= d + 10.0), || {
                    format!(
                        "{at_c}: terminationGracePeriodSeconds {grace} must exceed --drain-timeout ({}) by at least 10 s, or a stopping pod is killed mid-drain",
                        flags.get("drain-timeout").unwrap_or("?")
                    )
                });
            } else if let Some(deadline) =
                at(&pod.workload, &["spec", "activeDeadlineSeconds"]).and_then(Value::as_f64)
            {
                report.expect(drain.is_some_and(|d| deadline > d), || {
                    format!(
                        "{at_c}: activeDeadlineSeconds {deadline} must exceed --drain-timeout so the drain ends by itself"
                    )
                });
            }
            let spool_dir = flags.get("spool-dir").unwrap_or("");
            let mount = mounts
                .iter()
                .find(|(_, dir)| dir.trim_end_matches('/') == spool_dir.trim_end_matches('/'));
            let claims = pod.claim_templates();
            let max = get_u128("spool-max-bytes");
            match mount {
                None => report.fail(format!(
                    "{at_c}: --spool-dir {spool_dir} is not a volume mount: the spool would live on the container's (read-only) filesystem"
                )),
                Some((name, _)) => {
                    if let Some(claim) = claims.get(*name) {
                        report.checks += 1;
                        let storage = at(claim, &["spec", "resources", "requests", "storage"])
                            .and_then(quantity_bytes);
                        report.expect(
                            arr_at(claim, &["spec", "accessModes"]).iter().any(|m| {
                                matches!(m.as_str(), Some("ReadWriteOnce" | "ReadWriteOncePod"))
                            }),
                            || format!("{at_c}: volumeClaimTemplate {name} must be ReadWriteOnce (one spool, one owner)"),
                        );
                        report.expect(
                            matches!((storage, max), (Some(st), Some(mx)) if st * 10 >= mx * 12),
                            || {
                                format!(
                                    "{at_c}: volumeClaimTemplate {name} requests {} bytes; it must be at least 1.2 × --spool-max-bytes ({}) for the index, sled's log and quarantined files",
                                    storage.map_or("?".into(), |s| s.to_string()),
                                    max.map_or("?".into(), |m| m.to_string())
                                )
                            },
                        );
                    } else if let Some(claim) = pod
                        .volume(name)
                        .and_then(|v| str_at(v, &["persistentVolumeClaim", "claimName"]))
                    {
                        let ordinal = claim.rsplit_once('-').map(|(_, n)| n);
                        report.expect(
                            daemon == Daemon::Drain
                                && claim.starts_with("spool-")
                                && ordinal.is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit())),
                            || format!(
                                "{at_c}: the spool is PVC {claim}; a daemon takes its spool from the StatefulSet's volumeClaimTemplates, a drain Job from an orphaned spool-<statefulset>-<ordinal>"
                            ),
                        );
                    } else {
                        report.fail(format!(
                            "{at_c}: --spool-dir is on volume {name}, which is not persistent: acknowledged audio would die with the pod"
                        ));
                    }
                }
            }
            if daemon == Daemon::Uploader {
                report.expect(pod.owner_kind == "StatefulSet", || {
                    format!(
                        "{at_c}: the uploader must run in a StatefulSet (one spool volume per pod)"
                    )
                });
                let w = &pod.workload;
                report.expect(
                    str_at(w, &["spec", "persistentVolumeClaimRetentionPolicy", "whenScaled"])
                        == Some("Retain"),
                    || format!("{at_c}: persistentVolumeClaimRetentionPolicy.whenScaled must be Retain: a scaled-down pod's spool holds acknowledged audio"),
                );
                report.expect(
                    str_at(w, &["spec", "persistentVolumeClaimRetentionPolicy", "whenDeleted"])
                        != Some("Delete"),
                    || format!("{at_c}: persistentVolumeClaimRetentionPolicy.whenDeleted must not be Delete"),
                );
                report.expect(
                    str_at(w, &["spec", "podManagementPolicy"]) == Some("Parallel"),
                    || format!("{at_c}: podManagementPolicy should be Parallel (uploader pods do not depend on each other)"),
                );
            }
            let (workers, chunk_secs) = (get_u128("workers"), get_u128("max-chunk-seconds"));
            // `uploader drain` serves no puts.
            let puts = if daemon == Daemon::Uploader {
                get_u128("max-puts-in-flight")
            } else {
                Some(0)
            };
            if workers.is_none() {
                report.warnings.push(format!(
                    "{at_c}: --workers is {:?}, not a number: the memory limit was not checked (size it for the most workers)",
                    flags.get("workers").unwrap_or("")
                ));
            }
            if let (Some(w), Some(q), Some(secs)) = (workers, puts, chunk_secs) {
                let need = uploader_memory(w, q, secs);
                if let Some(l) = limit
                    && l >= need
                    && daemon == Daemon::Uploader
                {
                    report.notes.push(format!(
                        "{at_c}: bound {} MiB (W={w}, Q={q}) within the {} MiB limit",
                        need.div_ceil(MIB),
                        l / MIB,
                    ));
                }
                report.expect(limit.is_some_and(|l| l >= need), || {
                    format!(
                        "{at_c}: memory limit {} is below 2·W·C + 2·Q·C + 128 MiB = {need} bytes ({} MiB) for W={w}, Q={q} (--max-puts-in-flight), C={}",
                        limit.map_or("unset".into(), |l| l.to_string()),
                        need.div_ceil(MIB),
                        secs * MAX_SAMPLE_RATE * 2
                    )
                });
            }
            let aws: Vec<&str> = arr_at(c, &["env"])
                .iter()
                .filter_map(|e| str_at(e, &["name"]))
                .filter(|n| n.starts_with("AWS_"))
                .collect();
            report.expect(
                aws.contains(&"AWS_ACCESS_KEY_ID") == aws.contains(&"AWS_SECRET_ACCESS_KEY"),
                || format!("{at_c}: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY go together"),
            );
        }
    }
}

/// True when `--long` is given and names a file directly inside a mounted Secret volume.
fn secret_file(pod: &PodTemplate, flags: &Flags, mounts: &[(&str, &str)], long: &str) -> bool {
    let path = flags.get(long).unwrap_or("");
    flags.given.contains(long)
        && mounts.iter().any(|(name, dir)| {
            let file = path.strip_prefix(dir).and_then(|f| f.strip_prefix('/'));
            let secret = pod.volume(name).and_then(|v| at(v, &["secret"]));
            file.is_some_and(|f| !f.is_empty() && !f.contains('/')) && secret.is_some()
        })
}

/// The memory bound of ingest (deploy/README.md, "Memory"), in bytes, for `--max-buffered-bytes`,
/// `--max-sessions` and `--max-frame-bytes`. The bench holds a measurement to it (row 5c).
pub fn ingest_memory(budget: u128, sessions: u128, frame: u128) -> u128 {
    budget
        + sessions * (u128::from(spillway_ingest::STREAM_RECEIVE_WINDOW) + 2 * frame + 65_536)
        + 64 * MIB
}

/// The uploader's memory bound (deploy/README.md, "Memory"), set by its own flags alone: W
/// uploads and Q puts in flight, each holding up to two largest chunks.
fn uploader_memory(workers: u128, puts_in_flight: u128, max_chunk_seconds: u128) -> u128 {
    2 * (workers + puts_in_flight) * (max_chunk_seconds * MAX_SAMPLE_RATE * 2) + 128 * MIB
}

/// Ingest's `--uploader dns://NAME:PORT` must be a headless Service over the uploader pods and
/// the port their gRPC port.
fn check_ingest_uploaders(
    pod: &PodTemplate,
    flags: &Flags,
    at_c: &str,
    services: &[&Value],
    daemons: &[(Daemon, &PodTemplate, &Value, Flags, String)],
    report: &mut Report,
) {
    for target in flags.all("uploader") {
        let Some(rest) = target.strip_prefix("dns://") else {
            report.fail(format!(
                "{at_c}: --uploader {target}: in Kubernetes use dns://<headless Service>:<port>, so every uploader pod is an endpoint"
            ));
            continue;
        };
        let Some((host, port)) = rest.rsplit_once(':') else {
            report.fail(format!("{at_c}: --uploader {target} has no port"));
            continue;
        };
        let mut labels = host.split('.');
        let name = labels.next().unwrap_or("");
        let namespace = labels.next().unwrap_or(&pod.namespace);
        let port: Option<i64> = port.parse().ok();
        let svc = services
            .iter()
            .find(|s| name_of(s) == name && namespace_of(s) == namespace);
        let Some(svc) = svc else {
            report.fail(format!(
                "{at_c}: --uploader {target}: no Service {name} in namespace {namespace}"
            ));
            continue;
        };
        report.expect(str_at(svc, &["spec", "clusterIP"]) == Some("None"), || {
            format!(
                "{at_c}: --uploader {target}: Service {name} must be headless (clusterIP: None) so its name resolves to every uploader pod"
            )
        });
        let svc_port = arr_at(svc, &["spec", "ports"])
            .iter()
            .find(|p| at(p, &["port"]).and_then(Value::as_i64) == port);
        let Some(svc_port) = svc_port else {
            report.fail(format!(
                "{at_c}: --uploader {target}: Service {name} has no port {}",
                port.map_or("?".into(), |p| p.to_string())
            ));
            continue;
        };
        // A headless Service's DNS answer is the pods' addresses: the port dialled must be the
        // uploader's own --listen port.
        let target_port = svc_port.get("targetPort").or_else(|| svc_port.get("port"));
        let selector = string_map(at(svc, &["spec", "selector"]));
        let reached = daemons.iter().any(|(d, p, c, f, _)| {
            *d == Daemon::Uploader
                && p.namespace == namespace
                && selects(&selector, &p.labels)
                && target_port.and_then(|t| container_port(c, t)).map(|x| x.0) == port
                && f.get("listen")
                    .and_then(|a| a.parse::<SocketAddr>().ok())
                    .map(|a| i64::from(a.port()))
                    == port
        });
        report.expect(reached, || {
            format!(
                "{at_c}: --uploader {target}: Service {name} port {} must select the uploader pods and lead to their --listen port",
                port.map_or("?".into(), |p| p.to_string())
            )
        });
    }
}

fn check_services(scope: &str, services: &[&Value], pods: &[PodTemplate], report: &mut Report) {
    for svc in services {
        let at_s = format!("{scope}: {}", id_of(svc));
        let selector = string_map(at(svc, &["spec", "selector"]));
        let selected: Vec<&PodTemplate> = pods
            .iter()
            .filter(|p| p.namespace == namespace_of(svc) && selects(&selector, &p.labels))
            .collect();
        report.expect(!selected.is_empty(), || {
            format!("{at_s}: selector {selector:?} matches no pod template")
        });
        for port in arr_at(svc, &["spec", "ports"]) {
            let proto = str_at(port, &["protocol"]).unwrap_or("TCP");
            let Some(target) = port.get("targetPort").or_else(|| port.get("port")) else {
                continue;
            };
            for p in &selected {
                let found = p.port(target);
                report.expect(found.as_ref().is_some_and(|f| f.1 == proto), || {
                    format!(
                        "{at_s}: targetPort {target} ({proto}) is not a {proto} container port of {}",
                        p.owner
                    )
                });
            }
        }
    }
}

fn check_other_objects(scope: &str, objects: &[Value], pods: &[PodTemplate], report: &mut Report) {
    let in_ns = |o: &Value| -> Vec<&PodTemplate> {
        pods.iter()
            .filter(|p| p.namespace == namespace_of(o))
            .collect()
    };
    for o in objects {
        let at_o = format!("{scope}: {}", id_of(o));
        match kind_of(o) {
            "StatefulSet" => {
                let svc_name = str_at(o, &["spec", "serviceName"]).unwrap_or("");
                let own = string_map(at(o, &["spec", "template", "metadata", "labels"]));
                let svc = objects.iter().find(|s| {
                    kind_of(s) == "Service"
                        && name_of(s) == svc_name
                        && namespace_of(s) == namespace_of(o)
                });
                report.expect(
                    svc.is_some_and(|s| {
                        str_at(s, &["spec", "clusterIP"]) == Some("None")
                            && selects(&string_map(at(s, &["spec", "selector"])), &own)
                    }),
                    || {
                        format!(
                            "{at_o}: serviceName {svc_name} must be a headless Service (clusterIP: None) selecting its pods"
                        )
                    },
                );
                let selector = string_map(at(o, &["spec", "selector", "matchLabels"]));
                report.expect(selects(&selector, &own), || {
                    format!("{at_o}: spec.selector does not match its own pod template")
                });
            }
            "Deployment" => {
                let own = string_map(at(o, &["spec", "template", "metadata", "labels"]));
                let selector = string_map(at(o, &["spec", "selector", "matchLabels"]));
                report.expect(selects(&selector, &own), || {
                    format!("{at_o}: spec.selector does not match its own pod template")
                });
            }
            "PodDisruptionBudget" => {
                let selector = string_map(at(o, &["spec", "selector", "matchLabels"]));
                report.expect(
                    in_ns(o).iter().any(|p| selects(&selector, &p.labels)),
                    || format!("{at_o}: selector {selector:?} matches no pod template"),
                );
            }
            "HorizontalPodAutoscaler" => {
                let (kind, name) = (
                    str_at(o, &["spec", "scaleTargetRef", "kind"]).unwrap_or(""),
                    str_at(o, &["spec", "scaleTargetRef", "name"]).unwrap_or(""),
                );
                let target = objects.iter().find(|t| {
                    kind_of(t) == kind && name_of(t) == name && namespace_of(t) == namespace_of(o)
                });
                report.expect(target.is_some(), || {
                    format!("{at_o}: scaleTargetRef {kind}/{name} does not exist")
                });
                let max = at(o, &["spec", "maxReplicas"]).and_then(Value::as_i64);
                let min = at(o, &["spec", "minReplicas"])
                    .and_then(Value::as_i64)
                    .unwrap_or(1);
                report.expect(max.is_some_and(|m| m >= min), || {
                    format!("{at_o}: maxReplicas must be at least minReplicas")
                });
            }
            "NetworkPolicy" => {
                let selector = string_map(at(o, &["spec", "podSelector", "matchLabels"]));
                let selected: Vec<&PodTemplate> = in_ns(o)
                    .into_iter()
                    .filter(|p| selects(&selector, &p.labels))
                    .collect();
                report.expect(!selected.is_empty(), || {
                    format!("{at_o}: podSelector {selector:?} matches no pod template")
                });
                for rule in arr_at(o, &["spec", "ingress"]) {
                    for from in arr_at(rule, &["from"]) {
                        if let Some(sel) = at(from, &["podSelector", "matchLabels"]) {
                            let sel = string_map(Some(sel));
                            report.expect(
                                in_ns(o).iter().any(|p| selects(&sel, &p.labels)),
                                || format!("{at_o}: ingress from podSelector {sel:?} matches no pod template"),
                            );
                        }
                    }
                    for port in arr_at(rule, &["ports"]) {
                        let Some(target) = port.get("port") else {
                            continue;
                        };
                        for p in &selected {
                            report.expect(p.port(target).is_some(), || {
                                format!(
                                    "{at_o}: port {target} is not a container port of {}",
                                    p.owner
                                )
                            });
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics and alert rules

/// Every series name the daemons export, from their own registries.
///
/// The text encoding leaves out a label family until it has a child, so each family known here
/// gets one first; a family added later without being listed here is reported (its type, and so
/// its series names, cannot be told otherwise).
fn exposed_metrics() -> Result<BTreeSet<String>> {
    use prometheus_client::registry::Registry;
    use spillway_ingest::metrics as ingest;
    use spillway_uploader::metrics as uploader;

    let mut names = BTreeSet::new();
    let mut ingest_registry = Registry::default();
    let m = ingest::Metrics::register(&mut ingest_registry);
    m.sessions_ended
        .get_or_create(&ingest::EndLabel { reason: "any" })
        .inc();
    m.refusals
        .get_or_create(&ingest::CodeLabel { code: "ANY".into() })
        .inc();
    m.connections_refused
        .get_or_create(&ingest::EndLabel { reason: "any" })
        .inc();
    let mut uploader_registry = Registry::default();
    let m = uploader::Metrics::register(&mut uploader_registry);
    m.puts
        .get_or_create(&uploader::ResultLabel { result: "any" })
        .inc();
    m.uploads
        .get_or_create(&uploader::ResultLabel { result: "any" })
        .inc();
    m.put_rejections
        .get_or_create(&uploader::ReasonLabel { reason: "any" })
        .inc();

    for (daemon, registry) in [
        ("ingest", &ingest_registry),
        ("uploader", &uploader_registry),
    ] {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry)
            .map_err(|e| anyhow!("encoding the {daemon} metrics: {e}"))?;
        let mut families = BTreeSet::new();
        for (name, kind) in crate::metrics::families(&text) {
            families.insert(name.to_owned());
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" | "gaugehistogram" => &["_bucket", "_sum", "_count"],
                "summary" => &["", "_sum", "_count"],
                "info" => &["_info"],
                _ => &[""],
            };
            for s in suffixes {
                names.insert(format!("{name}{s}"));
            }
        }
        // Every registered name, encoded or not, from the registry's Debug form.
        let debug = format!("{registry:?}");
        for piece in debug.split("Descriptor { name: \"").skip(1) {
            let Some(name) = piece.split('"').next() else {
                continue;
            };
            let encoded = families
                .iter()
                .any(|f| f.ends_with(&format!("_{name}")) || f.contains(&format!("_{name}_")));
            if !encoded {
                bail!(
                    "the {daemon} metric {name} is an empty label family deploy-check does not know: \
                     give it a child in exposed_metrics() (xtask/src/deploy_check.rs)"
                );
            }
        }
    }
    Ok(names)
}

/// What the rule file holds.
#[derive(Debug)]
struct AlertsSummary {
    groups: usize,
    rules: usize,
    names: usize,
    exported: usize,
}

fn check_alerts(
    path: &Path,
    at_f: &str,
    metrics: &BTreeSet<String>,
    report: &mut Report,
) -> Result<AlertsSummary> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let doc = parse_single_yaml(path)?;
    let mut summary = AlertsSummary {
        groups: 0,
        rules: 0,
        names: 0,
        exported: metrics.len(),
    };
    let Some(groups) = at(&doc, &["groups"]).and_then(Value::as_array) else {
        report.fail(format!("{at_f}: no `groups` list"));
        return Ok(summary);
    };
    let mut group_names = BTreeSet::new();
    let mut alert_names = BTreeSet::new();
    for (gi, g) in groups.iter().enumerate() {
        summary.groups += 1;
        let gname = str_at(g, &["name"]).unwrap_or("");
        let at_g = format!("{at_f}: group {gi} ({gname})");
        report.expect(!gname.is_empty() && group_names.insert(gname), || {
            format!("{at_g}: needs a unique name")
        });
        if let Some(m) = g.as_object() {
            for k in m.keys() {
                report.expect(
                    ["name", "interval", "rules", "limit", "query_offset"].contains(&k.as_str()),
                    || format!("{at_g}: unknown key {k}"),
                );
            }
        }
        let rules = arr_at(g, &["rules"]);
        report.expect(!rules.is_empty(), || format!("{at_g}: no rules"));
        for (ri, r) in rules.iter().enumerate() {
            summary.rules += 1;
            let name = str_at(r, &["alert"]).or_else(|| str_at(r, &["record"]));
            let at_r = format!("{at_g} rule {ri} ({})", name.unwrap_or("?"));
            if let Some(m) = r.as_object() {
                for k in m.keys() {
                    report.expect(
                        [
                            "alert",
                            "record",
                            "expr",
                            "for",
                            "keep_firing_for",
                            "labels",
                            "annotations",
                        ]
                        .contains(&k.as_str()),
                        || format!("{at_r}: unknown key {k}"),
                    );
                }
            }
            let expr = str_at(r, &["expr"]).unwrap_or("");
            report.expect(!expr.trim().is_empty() && balanced(expr), || {
                format!("{at_r}: expr is empty or its brackets and quotes do not balance")
            });
            if let Some(f) = at(r, &["for"]) {
                report.expect(f.as_str().is_some_and(prometheus_duration), || {
                    format!("{at_r}: `for: {f}` is not a Prometheus duration")
                });
            }
            if let Some(alert) = str_at(r, &["alert"]) {
                report.expect(alert_names.insert(alert.to_owned()), || {
                    format!("{at_r}: alert name used twice")
                });
                report.expect(
                    matches!(
                        str_at(r, &["labels", "severity"]),
                        Some("critical" | "warning" | "info")
                    ),
                    || format!("{at_r}: labels.severity must be critical, warning or info"),
                );
                for a in ["summary", "description"] {
                    report.expect(
                        str_at(r, &["annotations", a]).is_some_and(|s| !s.trim().is_empty()),
                        || format!("{at_r}: annotations.{a} is missing"),
                    );
                }
            } else {
                report.expect(str_at(r, &["record"]).is_some(), || {
                    format!("{at_r}: neither `alert` nor `record`")
                });
            }
        }
    }
    let mut seen = BTreeSet::new();
    for (line_no, line) in text.lines().enumerate() {
        for name in spillway_identifiers(line) {
            let new = seen.insert(name.clone());
            if !metrics.contains(&name) {
                report.fail(format!(
                    "{at_f}:{}: {name} is not a metric the daemons export",
                    line_no + 1
                ));
            } else if new {
                report.checks += 1;
            }
        }
    }
    summary.names = seen.len();
    Ok(summary)
}

/// Every identifier starting with `spillway_` in `line`.
fn spillway_identifiers(line: &str) -> Vec<String> {
    let bytes = line.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(pos) = line[i..].find("spillway_") {
        let start = i + pos;
        let boundary = start == 0 || {
            let b = bytes[start - 1];
            !(b.is_ascii_alphanumeric() || b == b'_')
        };
        let end = line[start..]
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .map_or(line.len(), |e| start + e);
        if boundary {
            out.push(line[start..end].to_owned());
        }
        i = end.max(start + 1);
    }
    out
}

/// Brackets balance and quotes close, outside quoted strings.
fn balanced(expr: &str) -> bool {
    let mut stack = Vec::new();
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in expr.chars() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' | '`' => quote = Some(c),
            '(' | '[' | '{' => stack.push(c),
            ')' | ']' | '}' => {
                let open = match c {
                    ')' => '(',
                    ']' => '[',
                    _ => '{',
                };
                if stack.pop() != Some(open) {
                    return false;
                }
            }
            _ => {}
        }
    }
    stack.is_empty() && quote.is_none()
}

/// A Prometheus duration: one or more `<number><unit>`, units ms s m h d w y.
fn prometheus_duration(s: &str) -> bool {
    let mut rest = s;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let unit = ["ms", "s", "m", "h", "d", "w", "y"]
            .iter()
            .find(|u| rest.starts_with(**u));
        match unit {
            Some(u) => rest = &rest[u.len()..],
            None => return false,
        }
    }
    true
}

// ---------------------------------------------------------------------------------------------
// Dockerfile

/// What the image offers the manifests.
#[derive(Debug, Default)]
struct DockerImage {
    exposed: BTreeSet<(i64, String)>,
}

fn check_dockerfile(root: &Path, report: &mut Report) -> Result<DockerImage> {
    let path = root.join("deploy/Dockerfile");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let at_f = "deploy/Dockerfile";
    // Instructions with their continuation lines joined, comments dropped.
    let mut instructions: Vec<(String, String)> = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if current.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if let Some(body) = t.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(t);
        let (word, rest) = current
            .split_once(char::is_whitespace)
            .unwrap_or((&current, ""));
        instructions.push((word.to_ascii_uppercase(), rest.trim().to_owned()));
        current.clear();
    }
    let stages: Vec<usize> = instructions
        .iter()
        .enumerate()
        .filter(|(_, (w, _))| w == "FROM")
        .map(|(i, _)| i)
        .collect();
    report.expect(stages.len() >= 2, || {
        format!("{at_f}: must be multi-stage (a builder and a minimal runtime)")
    });
    let last = &instructions[stages.last().copied().unwrap_or(0)..];
    let builder = instructions
        .iter()
        .find(|(w, _)| w == "FROM")
        .map(|(_, a)| a.clone())
        .unwrap_or_default();
    let toolchain = std::fs::read_to_string(root.join("rust-toolchain.toml")).unwrap_or_default();
    let channel = toolchain
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel"))
        .and_then(|l| l.split('"').nth(1))
        .unwrap_or("");
    let minor = |v: &str| v.split('.').take(2).collect::<Vec<_>>().join(".");
    let builder_version = builder
        .strip_prefix("rust:")
        .map(|t| t.split(['-', ' ']).next().unwrap_or(""))
        .unwrap_or("");
    report.expect(
        !builder_version.is_empty() && minor(builder_version) == minor(channel),
        || {
            format!(
                "{at_f}: the builder ({builder}) must be rust:{} to match rust-toolchain.toml ({channel})",
                minor(channel)
            )
        },
    );
    let build = instructions
        .iter()
        .find(|(w, a)| w == "RUN" && a.contains("cargo build"))
        .map(|(_, a)| a.clone())
        .unwrap_or_default();
    for needle in [
        "--release",
        "--locked",
        "-p spillway-ingest",
        "-p spillway-uploader",
    ] {
        report.expect(build.contains(needle), || {
            format!("{at_f}: the cargo build must use {needle}")
        });
    }
    let copies: Vec<&String> = last
        .iter()
        .filter(|(w, _)| w == "COPY")
        .map(|(_, a)| a)
        .collect();
    for bin in ["ingest", "uploader"] {
        report.expect(
            copies
                .iter()
                .any(|a| a.contains(bin) && a.contains("/usr/local/bin")),
            || format!("{at_f}: the runtime stage must copy {bin} to /usr/local/bin"),
        );
    }
    let user = last
        .iter()
        .rev()
        .find(|(w, _)| w == "USER")
        .map(|(_, a)| a.clone());
    let uid = user
        .as_deref()
        .map(|u| u.split(':').next().unwrap_or(u).to_owned());
    report.expect(
        uid.as_deref()
            .is_some_and(|u| u.parse::<i64>().ok() == Some(NONROOT)),
        || {
            format!(
                "{at_f}: the runtime stage must end as USER {NONROOT}:{NONROOT} (non-root, the UID the manifests run as); it has {user:?}"
            )
        },
    );
    report.expect(
        last.iter()
            .any(|(w, a)| w == "STOPSIGNAL" && a == "SIGTERM"),
        || format!("{at_f}: the runtime stage must say STOPSIGNAL SIGTERM"),
    );
    let mut image = DockerImage::default();
    for (_, a) in last.iter().filter(|(w, _)| w == "EXPOSE") {
        for p in a.split_whitespace() {
            let (port, proto) = p.split_once('/').unwrap_or((p, "tcp"));
            if let Ok(port) = port.parse::<i64>() {
                image.exposed.insert((port, proto.to_ascii_uppercase()));
            }
        }
    }
    let ignore = std::fs::read_to_string(root.join(".dockerignore")).unwrap_or_default();
    for entry in ["target", ".git", ".spillway"] {
        report.expect(
            ignore
                .lines()
                .any(|l| l.trim().trim_start_matches('/').trim_end_matches('/') == entry),
            || format!(".dockerignore must exclude {entry}/ from the build context"),
        );
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    const BASE_DEPLOYMENT: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: elsewhere
spec:
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
        - name: web
          image: registry.local:5000/team/web:1.0
          args: [\"--a=1\", \"--b=2\"]
        - name: side
          image: other
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector: {app: web}
  ports:
    - port: 80
";

    fn base_and_overlay(overlay: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        write(root.path(), "base/web.yaml", BASE_DEPLOYMENT);
        write(
            root.path(),
            "base/kustomization.yaml",
            "resources: [web.yaml]\nlabels:\n  - pairs: {tier: base}\n",
        );
        write(root.path(), "overlay/kustomization.yaml", overlay);
        root
    }

    #[test]
    fn renders_namespace_labels_images_and_json6902_patches() {
        let root = base_and_overlay(
            "\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: prod
resources: [../base]
labels:
  - pairs: {team: audio}
images:
  - name: registry.local:5000/team/web
    newName: example.org/web
    newTag: \"2.0\"
patches:
  - target: {kind: Deployment, name: web}
    patch: |-
      - op: test
        path: /spec/template/spec/containers/0/args/1
        value: --b=2
      - op: replace
        path: /spec/template/spec/containers/0/args/1
        value: --b=3
      - op: add
        path: /metadata/labels/team
        value: patched
",
        );
        let objects = render_kustomization(&root.path().join("overlay")).unwrap();
        assert_eq!(objects.len(), 2);
        // kustomize's order: Service before Deployment.
        assert_eq!(kind_of(&objects[0]), "Service");
        let d = &objects[1];
        assert_eq!(namespace_of(d), "prod", "namespace replaced");
        assert_eq!(namespace_of(&objects[0]), "prod", "namespace added");
        assert_eq!(
            arr_at(d, &["spec", "template", "spec", "containers"])[0]["image"],
            "example.org/web:2.0",
            "image renamed and retagged"
        );
        assert_eq!(
            arr_at(d, &["spec", "template", "spec", "containers"])[1]["image"],
            "other",
            "other images untouched"
        );
        assert_eq!(
            arr_at(d, &["spec", "template", "spec", "containers"])[0]["args"][1],
            "--b=3",
            "patch applied"
        );
        // Labels run after patches and overwrite them; selectors stay as written.
        assert_eq!(d["metadata"]["labels"]["team"], "audio");
        assert_eq!(d["metadata"]["labels"]["tier"], "base");
        assert_eq!(
            d["spec"]["selector"]["matchLabels"],
            serde_json::json!({"app": "web"})
        );
    }

    #[test]
    fn refuses_what_it_does_not_implement() {
        for (overlay, needle) in [
            (
                "resources: [../base]\ncommonLabels: {a: b}\n",
                "`commonLabels` is not implemented",
            ),
            (
                "resources: [../base]\nconfigMapGenerator: []\n",
                "`configMapGenerator` is not implemented",
            ),
            (
                "resources: [../base]\npatches:\n  - target: {kind: Deployment, name: web}\n    patch: |-\n      spec: {replicas: 3}\n",
                "strategic-merge patches are not implemented",
            ),
            (
                "resources: [../base]\npatches:\n  - path: p.yaml\n    target: {kind: Deployment, name: web}\n",
                "patches[0].path is not implemented",
            ),
            (
                "resources: [../base]\npatches:\n  - target: {kind: Deployment, name: nothing}\n    patch: '[]'\n",
                "matches nothing",
            ),
            (
                "resources: [../base/web.yaml]\n",
                "outside the kustomization's directory",
            ),
            (
                "resources: [../base]\nlabels:\n  - pairs: {a: b}\n    includeSelectors: true\n",
                "only false is implemented",
            ),
        ] {
            let root = base_and_overlay(overlay);
            let err = render_kustomization(&root.path().join("overlay")).unwrap_err();
            assert!(
                format!("{err:#}").contains(needle),
                "{overlay}: {err:#} should say {needle}"
            );
        }
    }

    #[test]
    fn a_failing_test_operation_fails_the_render() {
        let root = base_and_overlay(
            "resources: [../base]\npatches:\n  - target: {kind: Deployment, name: web}\n    patch: |-\n      - {op: test, path: /spec/template/spec/containers/0/args/1, value: --b=9}\n",
        );
        assert!(render_kustomization(&root.path().join("overlay")).is_err());
    }

    #[test]
    fn yaml_output_reads_back_identically_and_quotes_what_yaml_1_1_would_misread() {
        let doc = serde_json::json!({
            "a": ["yes", "on", "0755", "1_000", "1:20", "", "-x", "--flag=1", "a b", "multi\nline", "~", "ok-plain"],
            "b": {"c": [], "d": {}, "e": [{"f": 1, "g": [1, 2.5]}, [true, null]]},
            "app.kubernetes.io/name": "web",
        });
        let text = to_yaml_docs(std::slice::from_ref(&doc)).unwrap();
        assert_eq!(parse_yaml_docs(&text).unwrap(), vec![doc]);
        for quoted in ["\"yes\"", "\"on\"", "\"0755\"", "\"1_000\"", "\"1:20\""] {
            assert!(text.contains(quoted), "{quoted} in\n{text}");
        }
        assert!(text.contains("- ok-plain\n"), "{text}");
        assert!(text.contains("app.kubernetes.io/name: web\n"), "{text}");
    }

    #[test]
    fn image_references_split_at_the_tag_not_the_registry_port() {
        assert_eq!(
            split_image("registry.local:5000/a/b:1.2@sha256:ab"),
            ("registry.local:5000/a/b", Some("1.2"), Some("sha256:ab"))
        );
        assert_eq!(
            split_image("registry.local:5000/a/b"),
            ("registry.local:5000/a/b", None, None)
        );
        assert_eq!(split_image("spillway"), ("spillway", None, None));
    }

    #[test]
    fn quantities() {
        let q = |s: &str| quantity_bytes(&Value::String(s.into()));
        assert_eq!(q("48Gi"), Some(48 << 30));
        assert_eq!(q("1.5Gi"), Some(3 << 29));
        assert_eq!(q("500M"), Some(500_000_000));
        assert_eq!(q("1e3"), Some(1000));
        assert_eq!(q("128974848"), Some(128_974_848));
        assert_eq!(q("12Qi"), None);
    }

    #[test]
    fn prometheus_helpers() {
        assert!(prometheus_duration("5m"));
        assert!(prometheus_duration("1h30m"));
        assert!(!prometheus_duration("5 m"));
        assert!(!prometheus_duration("m"));
        assert!(balanced(r#"sum(rate(x{a="(}"}[5m])) > 0"#));
        assert!(!balanced("sum(rate(x[5m])"));
        assert_eq!(
            spillway_identifiers("a spillway_x_total / xspillway_y + spillway_z{a=\"b\"}"),
            vec!["spillway_x_total", "spillway_z"]
        );
    }

    #[test]
    fn command_lines_are_parsed_by_the_binaries_own_parsers() {
        let args = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let flags = parse_command_line(
            Daemon::Uploader,
            &args(&["--workers=4", "--spool-dir", "/s"]),
            &[],
        )
        .unwrap();
        assert_eq!(flags.get("workers"), Some("4"));
        assert_eq!(flags.get("spool-dir"), Some("/s"));
        assert!(flags.given.contains("workers"));
        assert!(!flags.given.contains("bucket"));
        assert!(
            flags.get("drain-timeout").is_some(),
            "defaults are filled in"
        );
        let err =
            parse_command_line(Daemon::Uploader, &args(&["--no-such-flag"]), &[]).unwrap_err();
        assert!(err.contains("no-such-flag"), "{err}");
        let err =
            parse_command_line(Daemon::Uploader, &args(&["--workers=many"]), &[]).unwrap_err();
        assert!(err.contains("many"), "{err}");
        let err = parse_command_line(
            Daemon::Uploader,
            &[],
            &[("SPILLWAY_NOT_A_FLAG".into(), Some("1".into()))],
        )
        .unwrap_err();
        assert!(err.contains("SPILLWAY_NOT_A_FLAG"), "{err}");
        let err = parse_command_line(
            Daemon::Ingest,
            &args(&["--max-sessions=3"]),
            &[("SPILLWAY_MAX_SESSIONS".into(), Some("4".into()))],
        )
        .unwrap_err();
        assert!(err.contains("dead configuration"), "{err}");
    }

    /// The repository's own deploy/ passes every offline check (no schemas, no kubectl):
    /// renaming a flag or a metric without updating deploy/ fails here.
    #[test]
    fn the_repository_manifests_pass_the_offline_checks() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let mut report = Report::default();
        let image = check_dockerfile(root, &mut report).unwrap();
        let overlays = root.join("deploy/k8s/overlays");
        let mut examples = Vec::new();
        for dir in subdirs(&overlays).unwrap() {
            for f in yaml_files(&dir).unwrap() {
                if f.to_string_lossy().ends_with(".example.yaml") {
                    examples.extend(parse_objects(&f).unwrap());
                }
            }
        }
        for dir in subdirs(&overlays).unwrap() {
            let objects = render_kustomization(&dir).unwrap();
            to_yaml_docs(&objects).unwrap();
            check_objects(&file_name(&dir), &objects, &examples, &image, &mut report);
        }
        for f in yaml_files(&root.join("deploy/k8s/jobs")).unwrap() {
            let objects = parse_objects(&f).unwrap();
            check_objects(&file_name(&f), &objects, &examples, &image, &mut report);
        }
        let metrics = exposed_metrics().unwrap();
        check_alerts(
            &root.join("deploy/prometheus/alerts.yaml"),
            "alerts.yaml",
            &metrics,
            &mut report,
        )
        .unwrap();
        assert!(
            report.failures.is_empty(),
            "deploy/ fails its checks:\n{}",
            report.failures.join("\n")
        );
        assert!(report.checks > 100, "only {} checks ran", report.checks);
    }
}
