//! Each Spillway container against its binary: flags, ports, probes, grace periods, volumes,
//! memory limits by the daemons' own formulas, and ingest's path to the uploaders.

#[allow(clippy::wildcard_imports)]
use super::*;

pub(super) fn check_daemon(
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
                let need = spillway_ingest::config::memory_bound(b, s, f);
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
                let need = spillway_uploader::config::memory_bound(w, q, secs);
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
                        "{at_c}: memory limit {} is below 2·W·C + Q·S + G·(C + S) + 128 MiB = {need} bytes ({} MiB) for W={w}, Q={q} (--max-puts-in-flight), C={}, S={} (a streamed put), G={} (gathered puts)",
                        limit.map_or("unset".into(), |l| l.to_string()),
                        need.div_ceil(MIB),
                        secs * MAX_SAMPLE_RATE * 2,
                        spillway_uploader::put::STREAMED_CALL_BYTES,
                        spillway_uploader::put::Gathered::MAX,
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
pub(super) fn secret_file(
    pod: &PodTemplate,
    flags: &Flags,
    mounts: &[(&str, &str)],
    long: &str,
) -> bool {
    let path = flags.get(long).unwrap_or("");
    flags.given.contains(long)
        && mounts.iter().any(|(name, dir)| {
            let file = path.strip_prefix(dir).and_then(|f| f.strip_prefix('/'));
            let secret = pod.volume(name).and_then(|v| at(v, &["secret"]));
            file.is_some_and(|f| !f.is_empty() && !f.contains('/')) && secret.is_some()
        })
}

/// Ingest's `--uploader dns://NAME:PORT` must be a headless Service over the uploader pods and
/// the port their gRPC port.
pub(super) fn check_ingest_uploaders(
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
