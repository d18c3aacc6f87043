//! Kubernetes objects: pod templates, their security settings and Secret references, Services
//! and the other objects the overlays hold.

#[allow(clippy::wildcard_imports)]
use super::*;

/// A pod template and what owns it.
#[derive(Debug)]
pub(super) struct PodTemplate {
    pub(super) owner: String,
    pub(super) owner_kind: String,
    pub(super) namespace: String,
    pub(super) labels: BTreeMap<String, String>,
    pub(super) annotations: BTreeMap<String, String>,
    pub(super) spec: Value,
    pub(super) workload: Value,
}

impl PodTemplate {
    pub(super) fn containers(&self) -> impl Iterator<Item = &Value> {
        arr_at(&self.spec, &["containers"])
            .iter()
            .chain(arr_at(&self.spec, &["initContainers"]))
    }

    /// The volume claim templates of a StatefulSet, by name.
    pub(super) fn claim_templates(&self) -> BTreeMap<String, &Value> {
        arr_at(&self.workload, &["spec", "volumeClaimTemplates"])
            .iter()
            .map(|c| (name_of(c).to_owned(), c))
            .collect()
    }

    pub(super) fn volume(&self, name: &str) -> Option<&Value> {
        arr_at(&self.spec, &["volumes"])
            .iter()
            .find(|v| str_at(v, &["name"]) == Some(name))
    }

    /// The container port `target` (a name or a number) names, with its protocol.
    pub(super) fn port(&self, target: &Value) -> Option<(i64, String)> {
        self.containers().find_map(|c| container_port(c, target))
    }
}

pub(super) fn container_port(c: &Value, target: &Value) -> Option<(i64, String)> {
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

pub(super) fn pod_templates(objects: &[Value]) -> Vec<PodTemplate> {
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
pub(super) fn daemon_of(c: &Value) -> Option<Daemon> {
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
pub(super) fn check_objects(
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

pub(super) fn container_ports(c: &Value) -> Vec<(i64, String)> {
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

pub(super) fn check_pod_security(scope: &str, pod: &PodTemplate, report: &mut Report) {
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
pub(super) fn check_secret_refs(
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

pub(super) fn check_services(
    scope: &str,
    services: &[&Value],
    pods: &[PodTemplate],
    report: &mut Report,
) {
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

pub(super) fn check_other_objects(
    scope: &str,
    objects: &[Value],
    pods: &[PodTemplate],
    report: &mut Report,
) {
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
