//! `deploy/Dockerfile` and `.dockerignore`.

#[allow(clippy::wildcard_imports)]
use super::*;

/// What the image offers the manifests.
#[derive(Debug, Default)]
pub(super) struct DockerImage {
    pub(super) exposed: BTreeSet<(i64, String)>,
}

pub(super) fn check_dockerfile(root: &Path, report: &mut Report) -> Result<DockerImage> {
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
