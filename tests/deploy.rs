//! The deployment artifacts under `deploy/`, checked with the real tools
//! that `scripts/test.sh` installs: every Kubernetes overlay renders with
//! kustomize and validates against the Kubernetes schemas (offline; the
//! cert-manager objects, which those schemas do not cover, against the
//! fields of cert-manager's v1 CRDs here), its settings load with Ferry's
//! own config loader, every link is TLS with certificates that name what
//! is dialled, secrets come from mounted Secrets only, NetworkPolicies let
//! only JobManagers reach a TaskManager's gRPC port, the NATS values keep
//! every write on disk and require TLS and a password (checked against a
//! real nats-server), the Dockerfile passes hadolint and builds with CI's
//! build step, and the alert rules pass `promtool check` and their unit
//! tests.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::tools::*;
use serde_json::Value;

const REGIONS_DIR: &str = "deploy/k8s/overlays";

/// The overlay directories (one per region).
fn overlays() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(repo().join(REGIONS_DIR))
        .expect("overlays dir")
        .flatten()
        .filter(|e| e.path().join("kustomization.yaml").exists())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

/// `kubectl kustomize` of one overlay.
fn render(region: &str) -> String {
    run_ok(
        "kubectl",
        &["kustomize", &format!("{REGIONS_DIR}/{region}")],
    )
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

/// The JobManagers' StatefulSet and the TaskManagers' Deployment.
const JOBMANAGER: &str = "ferry-jobmanager";
const TASKMANAGER: &str = "ferry-taskmanager";

/// The Deployment or StatefulSet named `name`.
fn workload<'a>(docs: &'a [Value], name: &str) -> &'a Value {
    docs.iter()
        .find(|d| {
            (d["kind"] == "Deployment" || d["kind"] == "StatefulSet")
                && d["metadata"]["name"] == name
        })
        .unwrap_or_else(|| panic!("no Deployment or StatefulSet {name} rendered"))
}

/// The name of one pod of `workload`: a StatefulSet's pods are numbered.
fn pod_name(workload: &Value) -> String {
    let name = workload["metadata"]["name"].as_str().unwrap();
    if workload["kind"] == "StatefulSet" {
        format!("{name}-0")
    } else {
        format!("{name}-7d9f8-abcde")
    }
}

fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

fn pod_labels(workload: &Value) -> &Value {
    &workload["spec"]["template"]["metadata"]["labels"]
}

/// Whether a cert-manager object (`cert-manager.io/...`), which the
/// Kubernetes schemas do not cover.
fn is_cert_manager(doc: &Value) -> bool {
    doc["apiVersion"]
        .as_str()
        .is_some_and(|a| a.starts_with("cert-manager.io/"))
}

/// Documents as one multi-document YAML text.
fn to_yaml(docs: &[&Value]) -> String {
    docs.iter()
        .map(|d| serde_yaml_ng::to_string(d).expect("YAML"))
        .collect::<Vec<_>>()
        .join("---\n")
}

/// `kubernetes-validate --strict` of every object that is not cert-manager's;
/// its output.
fn validate_core(docs: &[Value]) -> std::process::Output {
    let core: Vec<&Value> = docs.iter().filter(|d| !is_cert_manager(d)).collect();
    let file = temp_file(&to_yaml(&core), ".yaml");
    run(
        "kubernetes-validate",
        &["--strict", file.path().to_str().unwrap()],
    )
}

fn config_map(docs: &[Value]) -> BTreeMap<String, String> {
    let cm = docs
        .iter()
        .find(|d| {
            d["kind"] == "ConfigMap"
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("ferry-config"))
        })
        .expect("ferry-config ConfigMap");
    serde_json::from_value(cm["data"].clone()).expect("string data")
}

/// The environment a container of `deployment` (a Deployment or a
/// StatefulSet) gets: the ConfigMap, then its own `env` with `$(VAR)`
/// references and field refs filled in.
fn container_env(docs: &[Value], deployment: &str) -> BTreeMap<String, String> {
    let d = workload(docs, deployment);
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    let mut env = config_map(docs);
    for e in c["env"].as_array().expect("env") {
        let name = e["name"].as_str().unwrap().to_string();
        let value = match (
            e["value"].as_str(),
            e["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        ) {
            (Some(v), _) => {
                let mut v = v.to_string();
                for (k, val) in &env {
                    v = v.replace(&format!("$({k})"), val);
                }
                v
            }
            (None, Some("metadata.name")) => pod_name(d),
            (None, Some("status.podIP")) => "10.1.2.3".to_string(),
            (None, other) => panic!("{deployment}: unexpected env source {other:?} for {name}"),
        };
        env.insert(name, value);
    }
    env
}

#[test]
fn every_overlay_renders_and_validates_against_the_kubernetes_schemas() {
    let regions = overlays();
    assert!(
        regions.len() >= 3,
        "one overlay per region, found {regions:?}"
    );
    for region in &regions {
        let rendered = render(region);
        let kinds: BTreeSet<String> = yaml_docs(&rendered)
            .iter()
            .map(|d| d["kind"].as_str().unwrap_or("?").to_string())
            .collect();
        for k in [
            "Deployment",
            "StatefulSet",
            "Service",
            "ConfigMap",
            "PodDisruptionBudget",
            "NetworkPolicy",
            "Certificate",
            "ClusterIssuer",
        ] {
            assert!(kinds.contains(k), "{region}: no {k} rendered ({kinds:?})");
        }
        let docs = yaml_docs(&rendered);
        // --strict: unknown fields are errors, not warnings. An object of
        // an API the tool has no schema for is a warning, and fails here:
        // only cert-manager's are taken out, and checked below instead.
        let out = validate_core(&docs);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{region}: {text}");
        assert!(
            !text.contains("ERROR") && !text.contains("WARN"),
            "{region}: {text}"
        );
        for d in docs.iter().filter(|d| is_cert_manager(d)) {
            check_cert_manager(d).unwrap_or_else(|e| panic!("{region}: {e}"));
        }
    }
}

#[test]
fn kubernetes_validate_rejects_a_broken_object() {
    // The validator really checks: a typo in a field and a wrong type fail.
    let rendered = render(&overlays()[0]);
    for (from, to) in [
        (
            "terminationGracePeriodSeconds",
            "terminationGracePeriodSecond",
        ),
        ("replicas: 3", "replicas: three"),
        (
            "publishNotReadyAddresses: true",
            "publishNotReadyAddress: true",
        ),
    ] {
        let broken = rendered.replacen(from, to, 1);
        assert_ne!(broken, rendered, "{from} not in the rendered objects");
        let out = validate_core(&yaml_docs(&broken));
        assert!(!out.status.success(), "{to} passed validation");
    }
}

#[test]
fn the_cert_manager_check_rejects_a_broken_object() {
    let docs = yaml_docs(&render(&overlays()[0]));
    let cert = find(&docs, "Certificate", "ferry-jobmanager-api");
    let issuer = find(&docs, "ClusterIssuer", "ferry-region-ca");
    check_cert_manager(cert).unwrap();
    check_cert_manager(issuer).unwrap();
    let broken = |doc: &Value, edit: &dyn Fn(&mut Value)| {
        let mut d = doc.clone();
        edit(&mut d);
        check_cert_manager(&d)
    };
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, &Value, Edit)> = vec![
        (
            "no secretName",
            cert,
            Box::new(|d| {
                d["spec"].as_object_mut().unwrap().remove("secretName");
            }),
        ),
        (
            "a typo in a field",
            cert,
            Box::new(|d| {
                let v = d["spec"]
                    .as_object_mut()
                    .unwrap()
                    .remove("dnsNames")
                    .unwrap();
                d["spec"]["dnsName"] = v;
            }),
        ),
        (
            "an unknown usage",
            cert,
            Box::new(|d| d["spec"]["usages"][0] = "server-auth".into()),
        ),
        (
            "a wildcard inside a name",
            cert,
            Box::new(|d| d["spec"]["dnsNames"][0] = "ferry.*.svc".into()),
        ),
        (
            "renewBefore longer than the duration",
            cert,
            Box::new(|d| d["spec"]["renewBefore"] = "3000h".into()),
        ),
        (
            "an issuer kind cert-manager does not have",
            cert,
            Box::new(|d| d["spec"]["issuerRef"]["kind"] = "CA".into()),
        ),
        (
            "a key size ECDSA does not have",
            cert,
            Box::new(|d| d["spec"]["privateKey"]["size"] = 2048.into()),
        ),
        (
            "two issuer types",
            issuer,
            Box::new(|d| d["spec"]["selfSigned"] = serde_json::json!({})),
        ),
        (
            "a ClusterIssuer in a namespace",
            issuer,
            Box::new(|d| d["metadata"]["namespace"] = "ferry".into()),
        ),
        (
            "another apiVersion",
            issuer,
            Box::new(|d| d["apiVersion"] = "cert-manager.io/v1alpha2".into()),
        ),
    ];
    for (what, doc, edit) in cases {
        assert!(
            broken(doc, &*edit).is_err(),
            "{what}: the cert-manager check accepted it"
        );
    }
}

/// Fields of `spec` of a cert-manager.io/v1 Certificate (its CRD).
const CERTIFICATE_SPEC: &[&str] = &[
    "additionalOutputFormats",
    "commonName",
    "dnsNames",
    "duration",
    "emailAddresses",
    "encodeUsagesInRequest",
    "ipAddresses",
    "isCA",
    "issuerRef",
    "keystores",
    "literalSubject",
    "nameConstraints",
    "otherNames",
    "privateKey",
    "renewBefore",
    "renewBeforePercentage",
    "revisionHistoryLimit",
    "secretName",
    "secretTemplate",
    "signatureAlgorithm",
    "subject",
    "uris",
    "usages",
];

/// The values `usages` may take (cert-manager's KeyUsage).
const USAGES: &[&str] = &[
    "signing",
    "digital signature",
    "content commitment",
    "key encipherment",
    "key agreement",
    "data encipherment",
    "cert sign",
    "crl sign",
    "encipher only",
    "decipher only",
    "any",
    "server auth",
    "client auth",
    "code signing",
    "email protection",
    "s/mime",
    "ipsec end system",
    "ipsec tunnel",
    "ipsec user",
    "timestamping",
    "ocsp signing",
    "microsoft sgc",
    "netscape sgc",
];

/// The issuer types of an Issuer or ClusterIssuer, and the fields of the
/// two used here.
const ISSUER_TYPES: &[&str] = &["acme", "ca", "selfSigned", "vault", "venafi"];
const CA_ISSUER: &[&str] = &[
    "secretName",
    "crlDistributionPoints",
    "issuingCertificateURLs",
    "ocspServers",
];

/// A Go duration as cert-manager reads it (`2160h`, `1h30m`, `90s`).
fn go_duration(s: &str) -> Option<std::time::Duration> {
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .filter(|&i| i > 0)?;
        let value: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..u] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            _ => return None,
        };
        total += value * unit;
        rest = &rest[u..];
    }
    Some(std::time::Duration::from_secs_f64(total))
}

/// Whether `name` is a DNS name a certificate may carry: labels of
/// letters, digits and `-`, a wildcard only as the whole first label.
fn is_dns_name(name: &str) -> bool {
    let labels: Vec<&str> = name.split('.').collect();
    labels.iter().enumerate().all(|(i, l)| {
        (i == 0 && *l == "*" && labels.len() > 2)
            || (!l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-'))
    })
}

/// Checks a cert-manager object the way cert-manager's CRD schemas and
/// webhook would: known fields only, the required ones present, values
/// from their enums. Any other kind of cert-manager.io is an error: there
/// is no check for it here.
fn check_cert_manager(d: &Value) -> Result<(), String> {
    let kind = d["kind"].as_str().unwrap_or("?");
    let name = d["metadata"]["name"].as_str().unwrap_or("?");
    let at = format!("{kind} {name}");
    if d["apiVersion"] != "cert-manager.io/v1" {
        return Err(format!(
            "{at}: apiVersion {} is not cert-manager.io/v1",
            d["apiVersion"]
        ));
    }
    let spec = d["spec"]
        .as_object()
        .ok_or_else(|| format!("{at}: no spec"))?;
    let unknown = |allowed: &[&str], obj: &serde_json::Map<String, Value>, what: &str| match obj
        .keys()
        .find(|k| !allowed.contains(&k.as_str()))
    {
        Some(k) => Err(format!("{at}: unknown field {what}.{k}")),
        None => Ok(()),
    };
    let namespaced = d["metadata"]["namespace"].is_string();
    match kind {
        "Certificate" => {
            if !namespaced {
                return Err(format!("{at}: a Certificate lives in a namespace"));
            }
            unknown(CERTIFICATE_SPEC, spec, "spec")?;
            if spec
                .get("secretName")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                return Err(format!("{at}: spec.secretName is required"));
            }
            let issuer = spec
                .get("issuerRef")
                .and_then(Value::as_object)
                .ok_or_else(|| format!("{at}: spec.issuerRef is required"))?;
            unknown(&["name", "kind", "group"], issuer, "spec.issuerRef")?;
            if !issuer.get("name").is_some_and(Value::is_string) {
                return Err(format!("{at}: spec.issuerRef.name is required"));
            }
            if let Some(k) = issuer.get("kind")
                && k != "Issuer"
                && k != "ClusterIssuer"
            {
                return Err(format!(
                    "{at}: spec.issuerRef.kind {k} is not Issuer or ClusterIssuer"
                ));
            }
            if let Some(g) = issuer.get("group")
                && g != "cert-manager.io"
            {
                return Err(format!(
                    "{at}: spec.issuerRef.group {g} (this deployment uses cert-manager.io issuers)"
                ));
            }
            let identities = [
                "commonName",
                "literalSubject",
                "dnsNames",
                "ipAddresses",
                "uris",
                "emailAddresses",
                "otherNames",
            ];
            if !identities.iter().any(|k| spec.contains_key(*k)) {
                return Err(format!("{at}: names nothing (one of {identities:?})"));
            }
            for list in [
                "dnsNames",
                "ipAddresses",
                "uris",
                "emailAddresses",
                "usages",
            ] {
                if let Some(v) = spec.get(list)
                    && !v
                        .as_array()
                        .is_some_and(|a| !a.is_empty() && a.iter().all(Value::is_string))
                {
                    return Err(format!("{at}: spec.{list} must be a list of strings"));
                }
            }
            for n in spec
                .get("dnsNames")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let n = n.as_str().unwrap();
                if !is_dns_name(n) {
                    return Err(format!("{at}: {n} is not a DNS name"));
                }
            }
            for u in spec
                .get("usages")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if !USAGES.contains(&u.as_str().unwrap()) {
                    return Err(format!("{at}: usage {u} is not one of cert-manager's"));
                }
            }
            if let Some(v) = spec.get("isCA")
                && !v.is_boolean()
            {
                return Err(format!("{at}: spec.isCA must be true or false"));
            }
            if let Some(pk) = spec.get("privateKey") {
                let pk = pk
                    .as_object()
                    .ok_or_else(|| format!("{at}: spec.privateKey must be an object"))?;
                unknown(
                    &["algorithm", "encoding", "rotationPolicy", "size"],
                    pk,
                    "spec.privateKey",
                )?;
                let algorithm = pk.get("algorithm").and_then(Value::as_str).unwrap_or("RSA");
                let sizes: &[u64] = match algorithm {
                    "RSA" => &[2048, 4096, 8192],
                    "ECDSA" => &[256, 384, 521],
                    "Ed25519" => &[],
                    a => return Err(format!("{at}: privateKey.algorithm {a}")),
                };
                if let Some(size) = pk.get("size")
                    && algorithm != "Ed25519"
                    && !size.as_u64().is_some_and(|s| sizes.contains(&s))
                {
                    return Err(format!("{at}: privateKey.size {size} for {algorithm}"));
                }
                for (field, allowed) in [
                    ("encoding", &["PKCS1", "PKCS8"][..]),
                    ("rotationPolicy", &["Never", "Always"][..]),
                ] {
                    if let Some(v) = pk.get(field)
                        && !v.as_str().is_some_and(|v| allowed.contains(&v))
                    {
                        return Err(format!(
                            "{at}: privateKey.{field} {v} is not one of {allowed:?}"
                        ));
                    }
                }
            }
            let duration = |field: &str, default: std::time::Duration| match spec.get(field) {
                None => Ok(default),
                Some(v) => v
                    .as_str()
                    .and_then(go_duration)
                    .ok_or_else(|| format!("{at}: spec.{field} {v} is not a duration")),
            };
            let lifetime = duration("duration", std::time::Duration::from_secs(90 * 86400))?;
            if lifetime < std::time::Duration::from_secs(3600) {
                return Err(format!(
                    "{at}: spec.duration is below cert-manager's minimum of 1h"
                ));
            }
            if spec.contains_key("renewBefore") {
                let before = duration("renewBefore", lifetime)?;
                if before < std::time::Duration::from_secs(300) || before >= lifetime {
                    return Err(format!(
                        "{at}: spec.renewBefore must be at least 5m and below spec.duration"
                    ));
                }
            }
            Ok(())
        }
        "ClusterIssuer" | "Issuer" => {
            if namespaced != (kind == "Issuer") {
                return Err(format!(
                    "{at}: an Issuer lives in a namespace, a ClusterIssuer in none"
                ));
            }
            unknown(ISSUER_TYPES, spec, "spec")?;
            if spec.len() != 1 {
                return Err(format!(
                    "{at}: give exactly one issuer type of {ISSUER_TYPES:?}"
                ));
            }
            if let Some(ca) = spec.get("ca") {
                let ca = ca
                    .as_object()
                    .ok_or_else(|| format!("{at}: spec.ca must be an object"))?;
                unknown(CA_ISSUER, ca, "spec.ca")?;
                if !ca.get("secretName").is_some_and(Value::is_string) {
                    return Err(format!("{at}: spec.ca.secretName is required"));
                }
            }
            if let Some(ss) = spec.get("selfSigned") {
                let ss = ss
                    .as_object()
                    .ok_or_else(|| format!("{at}: spec.selfSigned must be an object"))?;
                unknown(&["crlDistributionPoints"], ss, "spec.selfSigned")?;
            }
            Ok(())
        }
        other => Err(format!(
            "{at}: no check for cert-manager kind {other}; add one to tests/deploy.rs"
        )),
    }
}

#[test]
fn each_overlay_names_its_region_nats_and_bucket_and_loads_as_ferry_config() {
    let mut buckets = BTreeSet::new();
    for region in overlays() {
        let docs = yaml_docs(&render(&region));
        let cm = config_map(&docs);
        assert_eq!(cm["FERRY_REGION"], region);
        // Both NATS clusters serve TLS only; tls:// makes the client insist.
        for var in ["FERRY_NATS_URLS", "FERRY_REGIONS_GLOBAL_URLS"] {
            for url in cm[var].split(',') {
                assert!(url.starts_with("tls://"), "{region}: {var} {url}");
            }
        }
        let storage = &cm["FERRY_STORAGE"];
        assert!(
            storage.contains(&format!("ferry-{region}")),
            "{region}: storage {storage} is not the region's bucket"
        );
        assert!(buckets.insert(storage.clone()), "{storage} used twice");
        for var in cm.keys().filter(|k| k.starts_with("FERRY_")) {
            assert!(
                ferry_core::config::ENV_KEYS
                    .iter()
                    .any(|(v, _, _)| v == var),
                "{region}: {var} is not a Ferry setting (docs/config.md)"
            );
        }
        // And those set in the pod specs: the loader only warns about an
        // unknown one, so a misspelt TLS or password file would leave a
        // link open or unauthenticated without failing anything.
        for deployment in [JOBMANAGER, TASKMANAGER] {
            let c = &pod_spec(workload(&docs, deployment))["containers"][0];
            for e in c["env"].as_array().unwrap() {
                let var = e["name"].as_str().unwrap();
                assert!(
                    !var.starts_with("FERRY_")
                        || ferry_core::config::ENV_KEYS
                            .iter()
                            .any(|(v, _, _)| *v == var),
                    "{region} {deployment}: {var} is not a Ferry setting (docs/config.md)"
                );
            }
        }
        // What the processes will see loads with Ferry's config loader and
        // passes its checks (timings, primary, the region's own store).
        for deployment in [JOBMANAGER, TASKMANAGER] {
            let env = container_env(&docs, deployment);
            let cfg = ferry_core::config::ProcessConfig::load(None, &env)
                .unwrap_or_else(|e| panic!("{region} {deployment}: {e}"));
            assert_eq!(cfg.region, region);
            assert_eq!(
                cfg.regions.stores.get(&region),
                Some(storage),
                "{region}: regions.stores names another store for this region"
            );
            // Secure by default: Ferry refuses a listener beyond loopback
            // without TLS and authentication unless given --insecure,
            // which no container here passes (checked below).
            let role = if deployment == JOBMANAGER {
                ferry_core::config::ProcessRole::JobManager
            } else {
                ferry_core::config::ProcessRole::TaskManager
            };
            assert_eq!(
                cfg.unprotected_listeners(role),
                Vec::<String>::new(),
                "{region} {deployment}: would need --insecure"
            );
            // Every link TLS, every NATS connection with credentials.
            assert!(cfg.tls.grpc.is_some(), "{region} {deployment}: no tls.grpc");
            assert!(
                cfg.nats.tls.as_ref().is_some_and(|t| t.ca_file.is_some()
                    && t.cert_file.is_some()
                    && t.key_file.is_some()),
                "{region} {deployment}: no nats.tls with a CA and a client certificate"
            );
            assert!(
                cfg.nats.auth.user.is_some() && cfg.nats.auth.password_file.is_some(),
                "{region} {deployment}: no NATS credentials"
            );
            if deployment == JOBMANAGER {
                assert!(cfg.tls.api.is_some(), "{region}: no tls.api");
                assert!(
                    cfg.regions
                        .global
                        .tls
                        .as_ref()
                        .is_some_and(|t| t.ca_file.is_some()
                            && t.cert_file.is_some()
                            && t.key_file.is_some()),
                    "{region}: no regions.global.tls with a CA and a client certificate"
                );
                let global = &cfg.regions.global.auth;
                assert!(
                    global.user.is_some() && global.password_file.is_some(),
                    "{region}: no credentials for the global NATS cluster"
                );
            }
        }
    }
}

/// A container port by name or number.
fn container_port(container: &Value, port: &Value) -> u64 {
    match port {
        Value::String(name) => container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == *name)
            .and_then(|x| x["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no port named {name}")),
        v => v.as_u64().expect("port"),
    }
}

/// The path and port a probe of `container` targets, resolved through its
/// named ports.
fn probe_port(container: &Value, probe: &str) -> (String, u64) {
    let p = &container[probe]["httpGet"];
    let path = p["path"]
        .as_str()
        .unwrap_or_else(|| panic!("{probe} is not httpGet"))
        .to_string();
    (path, container_port(container, &p["port"]))
}

/// The scheme a probe uses (Kubernetes' default is HTTP).
fn probe_scheme(container: &Value, probe: &str) -> String {
    container[probe]["httpGet"]["scheme"]
        .as_str()
        .unwrap_or("HTTP")
        .to_string()
}

fn listen_port(addr: &str) -> u64 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn jobmanagers_are_highly_available_and_probed_where_ferry_serves() {
    let region = overlays()[0].clone();
    let docs = yaml_docs(&render(&region));
    let jm = find(&docs, "StatefulSet", JOBMANAGER);
    let spec = &jm["spec"];
    assert_eq!(spec["replicas"], 3);
    let labels = &spec["template"]["metadata"]["labels"];
    let pod = &spec["template"]["spec"];
    let anti =
        &pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(anti["topologyKey"], "kubernetes.io/hostname");
    for (k, v) in anti["labelSelector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            &labels[k], v,
            "anti-affinity does not select the JobManager pods"
        );
    }
    let pdb = find(&docs, "PodDisruptionBudget", "ferry-jobmanager");
    assert_eq!(pdb["spec"]["minAvailable"], 2);
    for (k, v) in pdb["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&labels[k], v, "the PDB does not select the JobManager pods");
    }
    // Graceful stop: the lease release is immediate, in-flight API calls
    // (a cancel with savepoint) get SHUTDOWN_GRACE; keep a margin on top.
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    let api_grace = ferry_jobmanager::api::SHUTDOWN_GRACE.as_secs();
    assert!(
        grace >= 3 * api_grace,
        "terminationGracePeriodSeconds {grace} < 3 × {api_grace}"
    );

    // A StatefulSet only for the pods' DNS names: all start at once (with
    // minInstancesForElection 2 an ordered start would wait on the first),
    // and a rollout replaces one at a time.
    assert_eq!(spec["podManagementPolicy"], "Parallel");
    assert_eq!(spec["updateStrategy"]["type"], "RollingUpdate");
    assert!(
        spec["updateStrategy"]["rollingUpdate"]["maxUnavailable"].is_null(),
        "one JobManager at a time"
    );

    let env = container_env(&docs, JOBMANAGER);
    let c = &pod["containers"][0];
    let api = listen_port(&env["FERRY_API_LISTEN"]);
    assert_eq!(probe_port(c, "livenessProbe"), ("/healthz".into(), api));
    assert_eq!(probe_port(c, "startupProbe"), ("/healthz".into(), api));
    assert_eq!(probe_port(c, "readinessProbe"), ("/readyz".into(), api));
    // With tls.api the port speaks HTTPS only: an HTTP probe would get 400
    // https_required and restart the pod forever.
    assert!(env.contains_key("FERRY_TLS_API_CERT_FILE"));
    for probe in ["livenessProbe", "startupProbe", "readinessProbe"] {
        assert_eq!(probe_scheme(c, probe), "HTTPS", "JobManager {probe}");
    }
    let ann = &spec["template"]["metadata"]["annotations"];
    assert_eq!(ann["prometheus.io/port"], api.to_string());
    assert_eq!(ann["prometheus.io/scheme"], "https");

    let tm = find(&docs, "Deployment", TASKMANAGER);
    let env = container_env(&docs, TASKMANAGER);
    let c = &tm["spec"]["template"]["spec"]["containers"][0];
    let http = listen_port(&env["FERRY_TASKMANAGER_HTTP_LISTEN"]);
    assert_eq!(probe_port(c, "livenessProbe"), ("/healthz".into(), http));
    assert_eq!(probe_port(c, "readinessProbe"), ("/readyz".into(), http));
    // The TaskManager's probe port stays plaintext (tls.grpc is its gRPC
    // port's only).
    for probe in ["livenessProbe", "startupProbe", "readinessProbe"] {
        assert_eq!(probe_scheme(c, probe), "HTTP", "TaskManager {probe}");
    }
    let tm_grace = tm["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    assert!(tm_grace >= 30);
    // A rolling upgrade moves the jobs by savepoint: the preStop hook
    // drains through the probe port, within the grace period, and SIGTERM
    // drains too.
    let hook: Vec<&str> = c["lifecycle"]["preStop"]["exec"]["command"]
        .as_array()
        .expect("a preStop exec hook")
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        &hook[..5],
        [
            "/usr/local/bin/ferry",
            "taskmanager",
            "drain",
            "--local",
            "--wait"
        ],
        "{hook:?}"
    );
    assert_eq!(http, 9249, "the hook's default --http port");
    let secs = |v: &str| humantime::parse_duration(v).unwrap().as_secs();
    let hook_timeout = secs(hook[hook.iter().position(|a| *a == "--timeout").unwrap() + 1]);
    assert!(
        hook_timeout < tm_grace,
        "{hook_timeout} s vs grace {tm_grace} s"
    );
    assert_eq!(env["FERRY_TASKMANAGER_DRAIN_ON_SHUTDOWN"], "true");
    assert!(secs(&env["FERRY_TASKMANAGER_DRAIN_TIMEOUT"]) < tm_grace);
    // The exchange port: advertised on the pod IP over https, declared,
    // and open to TaskManagers only.
    let exchange = listen_port(&env["FERRY_TASKMANAGER_EXCHANGE_LISTEN"]);
    assert_eq!(
        env["FERRY_TASKMANAGER_EXCHANGE_ADVERTISE"],
        format!("https://{}:{exchange}", env["POD_IP"])
    );
    assert!(
        c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["containerPort"] == exchange)
    );

    for d in docs
        .iter()
        .filter(|d| d["kind"] == "Deployment" || d["kind"] == "StatefulSet")
    {
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(
            pod["securityContext"]["runAsNonRoot"], true,
            "{}",
            d["metadata"]["name"]
        );
        for c in pod["containers"].as_array().unwrap() {
            let req = &c["resources"]["requests"];
            assert!(
                req["cpu"].is_string() && req["memory"].is_string(),
                "{}: no resource requests",
                c["name"]
            );
            assert_eq!(
                c["args"][0], c["name"],
                "the container runs `ferry {}`",
                c["name"]
            );
            // Secure by default: TLS and authentication everywhere, so
            // nothing needs Ferry's opt-out.
            assert!(
                !c["args"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|a| a.as_str().is_some_and(|a| a.contains("insecure"))),
                "{}: runs with --insecure",
                c["name"]
            );
        }
    }
    // The Service reaches the JobManagers' API port.
    let svc = find(&docs, "Service", "ferry-jobmanager");
    for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&labels[k], v);
    }
}

#[test]
fn nats_values_sync_every_write_and_the_global_cluster_spans_every_region() {
    let regional: Value =
        serde_yaml_ng::from_str(&read("deploy/nats/regional-values.yaml")).unwrap();
    let global: Value = serde_yaml_ng::from_str(&read("deploy/nats/global-values.yaml")).unwrap();
    for (name, v) in [("regional", &regional), ("global", &global)] {
        assert_eq!(v["config"]["jetstream"]["enabled"], true, "{name}");
        assert_eq!(
            v["config"]["jetstream"]["merge"]["sync_interval"], "always",
            "{name}: JetStream must fsync before acknowledging (Jepsen lost acknowledged writes without it)"
        );
        assert_eq!(v["config"]["cluster"]["enabled"], true, "{name}");
    }
    let cm = config_map(&yaml_docs(&render(&overlays()[0])));
    assert_eq!(
        regional["config"]["cluster"]["replicas"].to_string(),
        cm["FERRY_NATS_REPLICAS"],
        "the region's KV replicas match its NATS nodes"
    );
    // One global node per region; the routes and the JobManagers' global
    // URLs name the same hosts.
    let host = |url: &str| {
        url.split("://")
            .nth(1)
            .unwrap()
            .split(':')
            .next()
            .unwrap()
            .to_string()
    };
    let clients: BTreeSet<String> = cm["FERRY_REGIONS_GLOBAL_URLS"]
        .split(',')
        .map(host)
        .collect();
    assert_eq!(
        cm["FERRY_REGIONS_GLOBAL_REPLICAS"],
        clients.len().to_string(),
        "global KV replicas = one per global node"
    );
    let mut prefixes = BTreeSet::new();
    for region in overlays() {
        let v: Value = serde_yaml_ng::from_str(&read(&format!("deploy/nats/global-{region}.yaml")))
            .unwrap_or_else(|e| panic!("deploy/nats/global-{region}.yaml: {e}"));
        assert!(
            prefixes.insert(v["config"]["serverNamePrefix"].to_string()),
            "{region}: server names collide"
        );
        let routes: BTreeSet<String> = v["config"]["cluster"]["merge"]["routes"]
            .as_array()
            .expect("routes")
            .iter()
            .map(|r| host(r.as_str().unwrap()))
            .collect();
        assert_eq!(
            routes, clients,
            "{region}: routes and FERRY_REGIONS_GLOBAL_URLS differ"
        );
    }
}

/// Whether a label selector (`matchLabels` only) selects pods labelled
/// `labels`. An empty selector selects every pod.
fn selects(selector: &Value, labels: &Value) -> bool {
    assert!(
        selector["matchExpressions"].is_null(),
        "matchExpressions in {selector}: teach `selects` to read them"
    );
    selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| &labels[k] == v)
}

/// Who may open a TCP connection to `port` of a pod labelled `labels`
/// (its `container` resolves named ports), by the rendered
/// NetworkPolicies of its namespace: `None` when no policy isolates the
/// pod for ingress (anyone may), else the `from` peers of every rule that
/// admits the port, a rule without `from` as one `{}` peer (anyone).
fn ingress_peers(
    docs: &[Value],
    labels: &Value,
    container: &Value,
    port: u64,
) -> Option<Vec<Value>> {
    let policies: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "NetworkPolicy" && selects(&d["spec"]["podSelector"], labels))
        .filter(|d| {
            let types = &d["spec"]["policyTypes"];
            // Without policyTypes a policy is an ingress policy.
            types.is_null() || types.as_array().unwrap().iter().any(|t| t == "Ingress")
        })
        .collect();
    if policies.is_empty() {
        return None;
    }
    let mut peers = Vec::new();
    for p in policies {
        for rule in p["spec"]["ingress"].as_array().into_iter().flatten() {
            let admits = match rule["ports"].as_array() {
                None => true,
                Some(ports) if ports.is_empty() => true,
                Some(ports) => ports.iter().any(|pp| {
                    let tcp = pp["protocol"].is_null() || pp["protocol"] == "TCP";
                    let hit = match &pp["port"] {
                        Value::Null => true,
                        v @ Value::String(_) => {
                            container["ports"].is_array() && container_port(container, v) == port
                        }
                        v => {
                            let from = v.as_u64().unwrap();
                            let to = pp["endPort"].as_u64().unwrap_or(from);
                            (from..=to).contains(&port)
                        }
                    };
                    tcp && hit
                }),
            };
            if !admits {
                continue;
            }
            match rule["from"].as_array() {
                Some(from) if !from.is_empty() => peers.extend(from.iter().cloned()),
                _ => peers.push(serde_json::json!({})),
            }
        }
    }
    Some(peers)
}

/// What the NetworkPolicies of a rendered region must hold: only pods of
/// the namespace that are JobManagers reach a TaskManager's gRPC port,
/// only labelled namespaces its metrics port, clients the JobManagers'
/// API, and nothing reaches anything else.
fn check_network_policies(docs: &[Value]) -> Result<(), String> {
    let jm = workload(docs, JOBMANAGER);
    let tm = workload(docs, TASKMANAGER);
    let (jm_labels, tm_labels) = (pod_labels(jm), pod_labels(tm));
    let tm_c = &pod_spec(tm)["containers"][0];
    let jm_c = &pod_spec(jm)["containers"][0];
    let tm_env = container_env(docs, TASKMANAGER);
    let grpc = listen_port(&tm_env["FERRY_TASKMANAGER_LISTEN"]);
    let http = listen_port(&tm_env["FERRY_TASKMANAGER_HTTP_LISTEN"]);
    let api = listen_port(&container_env(docs, JOBMANAGER)["FERRY_API_LISTEN"]);

    // gRPC: pods of this namespace that are JobManagers, and no others.
    let peers = ingress_peers(docs, tm_labels, tm_c, grpc)
        .ok_or("no NetworkPolicy isolates the TaskManagers")?;
    if peers.is_empty() {
        return Err(format!(
            "nothing may reach the TaskManagers' gRPC port {grpc}"
        ));
    }
    for peer in &peers {
        let keys: Vec<&String> = peer.as_object().unwrap().keys().collect();
        if keys != ["podSelector"] {
            return Err(format!(
                "{peer} may reach port {grpc}: only a podSelector of this namespace may"
            ));
        }
        let sel = &peer["podSelector"];
        if !selects(sel, jm_labels)
            || selects(sel, tm_labels)
            || sel["matchLabels"]["app.kubernetes.io/component"] != "jobmanager"
        {
            return Err(format!(
                "{sel} admits more than the JobManagers to port {grpc}"
            ));
        }
    }
    // Probes and metrics: Prometheus' namespace, by its label.
    let peers = ingress_peers(docs, tm_labels, tm_c, http).unwrap_or_default();
    if peers.is_empty() {
        return Err(format!("Prometheus cannot reach port {http}"));
    }
    for peer in &peers {
        let labelled = peer["namespaceSelector"]["matchLabels"]
            .as_object()
            .is_some_and(|m| !m.is_empty());
        if !labelled || !peer["ipBlock"].is_null() {
            return Err(format!(
                "{peer} may reach port {http}: only labelled namespaces should"
            ));
        }
    }
    // The REST API: clients.
    if ingress_peers(docs, jm_labels, jm_c, api).is_some_and(|p| p.is_empty()) {
        return Err(format!("nothing may reach the API port {api}"));
    }
    // Everything else is denied, on Ferry's pods and on any other pod of
    // the namespace.
    let stranger = serde_json::json!({"app": "something-else"});
    for (what, labels, c, port) in [
        ("a TaskManager", tm_labels, tm_c, api),
        ("a JobManager", jm_labels, jm_c, grpc),
        ("a JobManager", jm_labels, jm_c, http),
        ("another pod", &stranger, &Value::Null, 80),
    ] {
        if ingress_peers(docs, labels, c, port) != Some(vec![]) {
            return Err(format!("port {port} of {what} is not denied"));
        }
    }
    Ok(())
}

#[test]
fn only_jobmanagers_reach_a_taskmanagers_grpc_port() {
    for region in overlays() {
        let docs = yaml_docs(&render(&region));
        check_network_policies(&docs).unwrap_or_else(|e| panic!("{region}: {e}"));
    }
}

#[test]
fn the_network_policy_check_catches_an_open_port() {
    let docs = yaml_docs(&render(&overlays()[0]));
    check_network_policies(&docs).unwrap();
    let policy = |docs: &mut Vec<Value>, name: &str, edit: &dyn Fn(&mut Value)| {
        for d in docs
            .iter_mut()
            .filter(|d| d["kind"] == "NetworkPolicy" && d["metadata"]["name"] == name)
        {
            edit(d);
        }
    };
    type Edit<'a> = Box<dyn Fn(&mut Vec<Value>) + 'a>;
    let cases: Vec<(&str, Edit<'_>)> = vec![
        (
            "gRPC open to every Ferry pod",
            Box::new(|d| {
                policy(d, "ferry-taskmanager-grpc", &|p| {
                    p["spec"]["ingress"][0]["from"][0]["podSelector"] =
                        serde_json::json!({"matchLabels": {"app.kubernetes.io/name": "ferry"}})
                })
            }),
        ),
        (
            "gRPC open to JobManagers of any namespace",
            Box::new(|d| {
                policy(d, "ferry-taskmanager-grpc", &|p| {
                    p["spec"]["ingress"][0]["from"][0]["namespaceSelector"] = serde_json::json!({})
                })
            }),
        ),
        (
            "gRPC open to anyone",
            Box::new(|d| {
                policy(d, "ferry-taskmanager-grpc", &|p| {
                    p["spec"]["ingress"][0]
                        .as_object_mut()
                        .unwrap()
                        .remove("from");
                })
            }),
        ),
        (
            "metrics open to anyone",
            Box::new(|d| {
                policy(d, "ferry-taskmanager-metrics", &|p| {
                    p["spec"]["ingress"][0]["from"] = serde_json::json!([])
                })
            }),
        ),
        (
            "no default deny",
            Box::new(|d| d.retain(|p| p["metadata"]["name"] != "ferry-default-deny-ingress")),
        ),
        (
            "no policies",
            Box::new(|d| d.retain(|p| p["kind"] != "NetworkPolicy")),
        ),
    ];
    for (what, edit) in cases {
        let mut broken = docs.clone();
        edit(&mut broken);
        assert!(
            check_network_policies(&broken).is_err(),
            "{what}: the check passed"
        );
    }
}

/// Whether a certificate name (`*.` only as the first label) covers `host`.
fn name_covers(pattern: &str, host: &str) -> bool {
    let (pattern, host) = (pattern.to_ascii_lowercase(), host.to_ascii_lowercase());
    match pattern.strip_prefix("*.") {
        Some(rest) => host
            .split_once('.')
            .is_some_and(|(first, tail)| !first.is_empty() && tail == rest),
        None => pattern == host,
    }
}

/// The DNS names of a Certificate.
fn dns_names(cert: &Value) -> Vec<String> {
    cert["spec"]["dnsNames"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| n.as_str().unwrap().to_string())
        .collect()
}

fn usages(cert: &Value) -> Vec<&str> {
    cert["spec"]["usages"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| n.as_str().unwrap())
        .collect()
}

/// The rendered Certificate that writes Secret `secret` in `namespace`.
fn certificate_for<'a>(docs: &'a [Value], namespace: &str, secret: &str) -> &'a Value {
    docs.iter()
        .find(|d| {
            d["kind"] == "Certificate"
                && d["metadata"]["namespace"] == namespace
                && d["spec"]["secretName"] == secret
        })
        .unwrap_or_else(|| panic!("no Certificate writes Secret {namespace}/{secret}"))
}

/// The Secret volume a container mounts `path` from, and the file's key:
/// `(secretName, key)`, or `None` if `path` is in no Secret volume.
fn secret_behind(workload: &Value, path: &str) -> Option<(String, String)> {
    let pod = pod_spec(workload);
    let c = &pod["containers"][0];
    let mount = c["volumeMounts"].as_array()?.iter().find(|m| {
        let dir = m["mountPath"].as_str().unwrap().trim_end_matches('/');
        path.strip_prefix(dir)
            .is_some_and(|rest| rest.starts_with('/'))
    })?;
    let dir = mount["mountPath"].as_str().unwrap().trim_end_matches('/');
    assert!(
        mount["subPath"].is_null() && mount["subPathExpr"].is_null(),
        "{path}: a subPath mount does not see a Secret change (rotation)"
    );
    let volume = pod["volumes"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == mount["name"])?;
    let secret = &volume["secret"];
    if secret.is_null() {
        return None;
    }
    assert!(
        secret["optional"] != true,
        "{path}: Secret {} is optional; a pod without it would start without the file",
        secret["secretName"]
    );
    assert!(
        secret["items"].is_null(),
        "{path}: items are not followed here"
    );
    Some((
        secret["secretName"].as_str()?.to_string(),
        path[dir.len() + 1..].to_string(),
    ))
}

/// Files a process reads its secrets and certificates from: the `FERRY_*`
/// settings ending in `_FILE`.
fn file_settings(env: &BTreeMap<String, String>) -> Vec<(&String, &String)> {
    env.iter()
        .filter(|(k, _)| k.starts_with("FERRY_") && k.ends_with("_FILE"))
        .collect()
}

/// The host of a URL.
fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap();
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

fn values(file: &str) -> Value {
    serde_yaml_ng::from_str(&read(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

const REGIONAL_VALUES: &str = "deploy/nats/regional-values.yaml";
const GLOBAL_VALUES: &str = "deploy/nats/global-values.yaml";
/// The namespace of both NATS releases.
const NATS_NAMESPACE: &str = "nats";

#[test]
fn certificates_name_what_each_link_dials() {
    let regional = values(REGIONAL_VALUES);
    let global = values(GLOBAL_VALUES);
    for region in overlays() {
        let docs = yaml_docs(&render(&region));
        let jm = workload(&docs, JOBMANAGER);
        let tm = workload(&docs, TASKMANAGER);
        let jm_env = container_env(&docs, JOBMANAGER);
        let tm_env = container_env(&docs, TASKMANAGER);
        let ns = jm["metadata"]["namespace"].as_str().unwrap();
        // The Certificate whose Secret holds the file of setting `var`.
        let cert_of = |w: &Value, env: &BTreeMap<String, String>, var: &str| -> Value {
            let path = env
                .get(var)
                .unwrap_or_else(|| panic!("{region}: {} has no {var}", w["metadata"]["name"]));
            let (secret, _) = secret_behind(w, path)
                .unwrap_or_else(|| panic!("{region}: {var}={path} is in no Secret volume"));
            certificate_for(&docs, ns, &secret).clone()
        };

        // The REST API: advertised by its per-pod name, which exists
        // (a StatefulSet pod under its headless Service) and which the
        // certificate carries; clients dial the Service.
        let advertise = &jm_env["FERRY_API_ADVERTISE"];
        assert!(advertise.starts_with("https://"), "{region}: {advertise}");
        assert_eq!(
            listen_port(advertise),
            listen_port(&jm_env["FERRY_API_LISTEN"]),
            "{region}: {advertise} is not the API port"
        );
        assert_eq!(
            jm["kind"], "StatefulSet",
            "{region}: JobManager pods need DNS names"
        );
        let service = jm["spec"]["serviceName"].as_str().unwrap();
        let headless = find(&docs, "Service", service);
        assert_eq!(
            headless["spec"]["clusterIP"], "None",
            "{region}: {service} is not headless"
        );
        assert_eq!(
            headless["spec"]["publishNotReadyAddresses"], true,
            "{region}: an unready leader must keep its name"
        );
        assert!(selects(
            &serde_json::json!({"matchLabels": headless["spec"]["selector"]}),
            pod_labels(jm)
        ));
        let host = url_host(advertise);
        assert_eq!(
            host,
            format!("{}.{service}.{ns}.svc.cluster.local", pod_name(jm)),
            "{region}: {advertise} is not the pod's DNS name"
        );
        let api = cert_of(jm, &jm_env, "FERRY_TLS_API_CERT_FILE");
        let names = dns_names(&api);
        assert!(
            names.iter().any(|n| name_covers(n, host)),
            "{region}: the API certificate {names:?} does not name {host}"
        );
        let svc = format!("{JOBMANAGER}.{ns}.svc");
        assert!(
            names.iter().any(|n| name_covers(n, &svc)),
            "{region}: the API certificate does not name the Service {svc}"
        );
        // Client auth too: a standby presents it when it forwards a
        // certificate caller's write.
        assert!(
            usages(&api).contains(&"server auth") && usages(&api).contains(&"client auth"),
            "{region}: API certificate usages"
        );

        // gRPC: the TaskManagers' one certificate carries the name the
        // JobManagers check for; the JobManagers' does not (it cannot pass
        // for a TaskManager). Both ends authenticate: server and client.
        let tm_advertise = &tm_env["FERRY_TASKMANAGER_ADVERTISE"];
        assert!(
            tm_advertise.starts_with("https://"),
            "{region}: {tm_advertise}"
        );
        assert_eq!(
            listen_port(tm_advertise),
            listen_port(&tm_env["FERRY_TASKMANAGER_LISTEN"])
        );
        let server_name = jm_env
            .get("FERRY_TLS_GRPC_SERVER_NAME")
            .unwrap_or_else(|| panic!("{region}: no FERRY_TLS_GRPC_SERVER_NAME: one certificate per pod IP would be needed"));
        let tm_grpc = cert_of(tm, &tm_env, "FERRY_TLS_GRPC_CERT_FILE");
        let jm_grpc = cert_of(jm, &jm_env, "FERRY_TLS_GRPC_CERT_FILE");
        assert!(
            dns_names(&tm_grpc)
                .iter()
                .any(|n| name_covers(n, server_name)),
            "{region}: the TaskManager certificate {:?} does not name {server_name}",
            dns_names(&tm_grpc)
        );
        assert!(
            !dns_names(&jm_grpc)
                .iter()
                .any(|n| name_covers(n, server_name)),
            "{region}: the JobManagers' gRPC certificate could pass for a TaskManager"
        );
        // And the other way: a TaskManager takes commands only from a
        // certificate with the JobManagers' name, which its own lacks.
        let client_name = tm_env
            .get("FERRY_TLS_GRPC_CLIENT_NAME")
            .unwrap_or_else(|| panic!("{region}: no FERRY_TLS_GRPC_CLIENT_NAME: a TaskManager's certificate could send commands"));
        assert!(
            dns_names(&jm_grpc)
                .iter()
                .any(|n| name_covers(n, client_name)),
            "{region}: the JobManagers' gRPC certificate {:?} does not name {client_name}",
            dns_names(&jm_grpc)
        );
        assert!(
            !dns_names(&tm_grpc)
                .iter()
                .any(|n| name_covers(n, client_name)),
            "{region}: the TaskManagers' certificate could pass for a JobManager"
        );
        for (who, c) in [("TaskManager", &tm_grpc), ("JobManager", &jm_grpc)] {
            for u in ["server auth", "client auth"] {
                assert!(
                    usages(c).contains(&u),
                    "{region}: {who} gRPC certificate lacks {u}"
                );
            }
        }
        assert_eq!(
            tm_grpc["spec"]["issuerRef"], jm_grpc["spec"]["issuerRef"],
            "{region}: the two ends of gRPC are signed by different CAs"
        );

        // NATS: the servers' certificates (in the NATS namespace, the
        // Secrets the values mount) carry every host Ferry dials, the
        // region's node of the global cluster its cross-region name.
        let nats_cert = |v: &Value| {
            let secret = v["config"]["nats"]["tls"]["secretName"].as_str().unwrap();
            certificate_for(&docs, NATS_NAMESPACE, secret).clone()
        };
        let regional_cert = nats_cert(&regional);
        let global_cert = nats_cert(&global);
        let cm = config_map(&docs);
        for url in cm["FERRY_NATS_URLS"].split(',') {
            let h = url_host(url);
            assert!(
                dns_names(&regional_cert).iter().any(|n| name_covers(n, h)),
                "{region}: the NATS certificate does not name {h}"
            );
        }
        // The routes between the region's nodes, with useFQDN.
        assert_eq!(regional["config"]["cluster"]["routeURLs"]["useFQDN"], true);
        let route = format!("nats-0.nats-headless.{NATS_NAMESPACE}.svc.cluster.local");
        assert!(
            dns_names(&regional_cert)
                .iter()
                .any(|n| name_covers(n, &route))
        );
        let own = cm["FERRY_REGIONS_GLOBAL_URLS"]
            .split(',')
            .map(url_host)
            .find(|h| h.contains(&region))
            .unwrap_or_else(|| panic!("{region}: no global node of this region"));
        assert!(
            dns_names(&global_cert).iter().any(|n| name_covers(n, own)),
            "{region}: the global node's certificate {:?} does not name {own}",
            dns_names(&global_cert)
        );
        for (c, what) in [(&regional_cert, "regional"), (&global_cert, "global")] {
            for u in ["server auth", "client auth"] {
                assert!(
                    usages(c).contains(&u),
                    "{region}: {what} NATS certificate lacks {u} (routes)"
                );
            }
        }
        // Each client's certificate (and so its ca.crt) from the CA of the
        // servers it talks to.
        for (w, env, var, server) in [
            (jm, &jm_env, "FERRY_NATS_TLS_CERT_FILE", &regional_cert),
            (tm, &tm_env, "FERRY_NATS_TLS_CERT_FILE", &regional_cert),
            (
                jm,
                &jm_env,
                "FERRY_REGIONS_GLOBAL_TLS_CERT_FILE",
                &global_cert,
            ),
        ] {
            let client = cert_of(w, env, var);
            assert_eq!(
                client["spec"]["issuerRef"], server["spec"]["issuerRef"],
                "{region}: {var}: another CA than the server's"
            );
            assert!(usages(&client).contains(&"client auth"), "{region}: {var}");
        }
        for v in [&regional, &global] {
            let secret = v["natsBox"]["contexts"]["default"]["tls"]["secretName"]
                .as_str()
                .expect("nats-box has a client certificate");
            let boxc = certificate_for(&docs, NATS_NAMESPACE, secret);
            assert_eq!(boxc["spec"]["issuerRef"], nats_cert(v)["spec"]["issuerRef"]);
        }

        // Every issuer exists; a CA issuer's key comes from a CA
        // Certificate made here, or from a Secret docs/operations.md says
        // how to create.
        let ops = read("docs/operations.md");
        for cert in docs.iter().filter(|d| d["kind"] == "Certificate") {
            let r = &cert["spec"]["issuerRef"];
            let issuer = find(
                &docs,
                r["kind"].as_str().unwrap_or("Issuer"),
                r["name"].as_str().unwrap(),
            );
            if issuer["kind"] == "Issuer" {
                assert_eq!(
                    issuer["metadata"]["namespace"],
                    cert["metadata"]["namespace"]
                );
            }
        }
        for issuer in docs.iter().filter(|d| d["kind"] == "ClusterIssuer") {
            let Some(secret) = issuer["spec"]["ca"]["secretName"].as_str() else {
                continue;
            };
            let made = docs.iter().find(|d| {
                d["kind"] == "Certificate"
                    && d["metadata"]["namespace"] == "cert-manager"
                    && d["spec"]["secretName"] == secret
            });
            match made {
                Some(ca) => assert_eq!(ca["spec"]["isCA"], true, "{region}: {secret}"),
                None => assert!(
                    ops.contains(&format!("-n cert-manager create secret tls {secret}")),
                    "{region}: nothing makes the CA Secret {secret}; docs/operations.md must say how"
                ),
            }
        }
    }
}

#[test]
fn secrets_are_mounted_files_and_never_in_the_config_map() {
    let ops = read("docs/operations.md");
    let secret_word = |k: &str| {
        ["PASSWORD", "TOKEN", "SECRET", "SEED", "CREDS", "PRIVATE"]
            .iter()
            .any(|w| k.contains(w))
    };
    for region in overlays() {
        let docs = yaml_docs(&render(&region));
        let cm = config_map(&docs);
        for (k, v) in &cm {
            assert!(
                !secret_word(k) || k.ends_with("_FILE"),
                "{region}: {k} holds a secret in the ConfigMap; mount it from a Secret"
            );
            assert!(!v.contains("-----BEGIN"), "{region}: {k} holds a PEM block");
            for url in v.split(',') {
                assert!(
                    !ferry_core::config::url_has_credentials(url.trim()),
                    "{region}: {k} has credentials in a URL"
                );
            }
        }
        for name in [JOBMANAGER, TASKMANAGER] {
            let w = workload(&docs, name);
            let c = &pod_spec(w)["containers"][0];
            for e in c["env"].as_array().unwrap() {
                let k = e["name"].as_str().unwrap();
                assert!(
                    !(secret_word(k) && !k.ends_with("_FILE") && e["value"].is_string()),
                    "{region} {name}: {k} is a literal in the pod spec"
                );
            }
            let env = container_env(&docs, name);
            let files = file_settings(&env);
            assert!(!files.is_empty());
            let mut link_secret: BTreeMap<&str, String> = BTreeMap::new();
            for (var, path) in files {
                let (secret, key) = secret_behind(w, path).unwrap_or_else(|| {
                    panic!("{region} {name}: {var}={path} is in no Secret volume")
                });
                let ns = w["metadata"]["namespace"].as_str().unwrap();
                let by_cert_manager = docs.iter().any(|d| {
                    d["kind"] == "Certificate"
                        && d["metadata"]["namespace"] == ns
                        && d["spec"]["secretName"] == secret.as_str()
                });
                if by_cert_manager {
                    assert!(
                        ["tls.crt", "tls.key", "ca.crt"].contains(&key.as_str()),
                        "{region} {name}: {var}: cert-manager writes no {key}"
                    );
                } else {
                    // Made by hand: the guide says how, with this key.
                    let how = format!("create secret generic {secret}");
                    let at = ops
                        .find(&how)
                        .unwrap_or_else(|| panic!("{region} {name}: docs/operations.md does not say how to create Secret {secret} ({var})"));
                    let line = ops[at..].lines().next().unwrap();
                    assert!(
                        line.contains(&key),
                        "{region} {name}: docs/operations.md creates {secret} without the key {key} ({var})"
                    );
                }
                // A link's certificate, key and CA come from one Secret, so
                // they always match.
                for link in [
                    "FERRY_TLS_API_",
                    "FERRY_TLS_GRPC_",
                    "FERRY_NATS_TLS_",
                    "FERRY_REGIONS_GLOBAL_TLS_",
                ] {
                    if var.starts_with(link) {
                        let first = link_secret.entry(link).or_insert_with(|| secret.clone());
                        assert_eq!(*first, secret, "{region} {name}: {link}* from two Secrets");
                    }
                }
            }
            // What each process must have: TLS on every link it uses and
            // credentials for every NATS cluster it connects to.
            let mut needed = vec![
                "FERRY_TLS_GRPC_CERT_FILE",
                "FERRY_TLS_GRPC_KEY_FILE",
                "FERRY_TLS_GRPC_CA_FILE",
                "FERRY_NATS_TLS_CA_FILE",
                "FERRY_NATS_TLS_CERT_FILE",
                "FERRY_NATS_TLS_KEY_FILE",
                "FERRY_NATS_PASSWORD_FILE",
            ];
            if name == JOBMANAGER {
                needed.extend([
                    "FERRY_TLS_API_CERT_FILE",
                    "FERRY_TLS_API_KEY_FILE",
                    "FERRY_TLS_API_CA_FILE",
                    "FERRY_API_AUTH_TOKENS_FILE",
                    "FERRY_REGIONS_GLOBAL_TLS_CA_FILE",
                    "FERRY_REGIONS_GLOBAL_TLS_CERT_FILE",
                    "FERRY_REGIONS_GLOBAL_TLS_KEY_FILE",
                    "FERRY_REGIONS_GLOBAL_PASSWORD_FILE",
                ]);
            }
            for var in needed {
                assert!(env.contains_key(var), "{region} {name}: no {var}");
            }
        }
    }
}

/// The environment variable a NATS config value refers to, as the chart
/// writes it: `<< $VAR >>` becomes the bare `$VAR`, which nats-server
/// reads from its environment.
fn env_reference(v: &Value) -> Option<&str> {
    v.as_str()?
        .strip_prefix("<<")?
        .strip_suffix(">>")?
        .trim()
        .strip_prefix('$')
}

#[test]
fn nats_values_require_tls_and_a_password_from_a_secret() {
    let docs = yaml_docs(&render(&overlays()[0]));
    let jm_env = container_env(&docs, JOBMANAGER);
    for (file, ferry_user) in [
        (REGIONAL_VALUES, &jm_env["FERRY_NATS_USER"]),
        (GLOBAL_VALUES, &jm_env["FERRY_REGIONS_GLOBAL_USER"]),
    ] {
        let v = values(file);
        let config = &v["config"];
        let secret = config["nats"]["tls"]["secretName"]
            .as_str()
            .expect("a TLS Secret");
        // TLS for clients and for routes, each side with a certificate of
        // the CA, which the Secret cert-manager writes carries as ca.crt.
        for block in ["nats", "cluster"] {
            let tls = &config[block]["tls"];
            assert_eq!(tls["enabled"], true, "{file}: config.{block}.tls");
            assert_eq!(
                tls["secretName"], secret,
                "{file}: config.{block}.tls.secretName"
            );
            assert_eq!(
                tls["merge"]["verify"], true,
                "{file}: config.{block}.tls must ask for client certificates"
            );
        }
        assert_eq!(v["tlsCA"]["enabled"], true, "{file}: no CA for verify");
        assert_eq!(v["tlsCA"]["secretName"], secret, "{file}: tlsCA");
        assert!(v["tlsCA"]["key"].is_null() || v["tlsCA"]["key"] == "ca.crt");
        certificate_for(&docs, NATS_NAMESPACE, secret);

        // Authentication: users in accounts, every password a variable
        // from a Secret, nobody let in without a user.
        let merge = &config["merge"];
        for key in [
            "no_auth_user",
            "authorization",
            "accounts_resolver",
            "resolver",
        ] {
            assert!(merge[key].is_null(), "{file}: config.merge.{key}");
        }
        let env = &v["container"]["env"];
        let accounts = merge["accounts"].as_object().expect("accounts");
        let mut jetstream_users = Vec::new();
        for (name, account) in accounts {
            for u in account["users"].as_array().into_iter().flatten() {
                let var = env_reference(&u["password"]).unwrap_or_else(|| {
                    panic!(
                        "{file}: user {} of {name}: the password must be << $VAR >> from a Secret",
                        u["user"]
                    )
                });
                let r = &env[var]["valueFrom"]["secretKeyRef"];
                assert!(
                    r["name"].is_string() && r["key"].is_string(),
                    "{file}: {var} is not from a Secret"
                );
                if account["jetstream"] == "enabled" {
                    jetstream_users.push(u["user"].as_str().unwrap().to_string());
                }
            }
        }
        assert!(
            jetstream_users.contains(ferry_user),
            "{file}: Ferry's user {ferry_user} is in no account with JetStream ({jetstream_users:?})"
        );
        let sys = merge["system_account"].as_str().expect("system_account");
        assert!(accounts.contains_key(sys), "{file}: system account {sys}");
        assert!(
            accounts[sys]["jetstream"].is_null(),
            "{file}: no JetStream in the system account"
        );
    }
    for region in overlays() {
        let v = values(&format!("deploy/nats/global-{region}.yaml"));
        for r in v["config"]["cluster"]["merge"]["routes"]
            .as_array()
            .unwrap()
        {
            assert!(
                r.as_str().unwrap().starts_with("tls://"),
                "{region}: route {r}"
            );
        }
    }
}

/// A nats-server configuration the way the chart (nats-io/k8s, files/config)
/// writes it from `values`, for one node on loopback: the client `tls`
/// block (cert_file and key_file from the mounted Secret, ca_file from
/// tlsCA, then `tls.merge`), JetStream with `jetstream.merge`, then
/// `config.merge`; as JSON with `<< ... >>` strings unquoted. `certs` is
/// the directory standing in for both mounts.
fn chart_nats_conf(
    values: &Value,
    port: u16,
    certs: &std::path::Path,
    store: &std::path::Path,
) -> String {
    let config = &values["config"];
    let mut tls = serde_json::json!({
        "cert_file": certs.join("tls.crt"),
        "key_file": certs.join("tls.key"),
        "ca_file": certs.join(values["tlsCA"]["key"].as_str().unwrap_or("ca.crt")),
    });
    for (k, v) in config["nats"]["tls"]["merge"]
        .as_object()
        .into_iter()
        .flatten()
    {
        tls[k] = v.clone();
    }
    let mut jetstream = serde_json::json!({"store_dir": store});
    for (k, v) in config["jetstream"]["merge"]
        .as_object()
        .into_iter()
        .flatten()
    {
        jetstream[k] = v.clone();
    }
    let mut conf = serde_json::json!({
        "listen": format!("127.0.0.1:{port}"),
        "tls": tls,
        "jetstream": jetstream,
    });
    for (k, v) in config["merge"].as_object().into_iter().flatten() {
        conf[k] = v.clone();
    }
    let text = serde_json::to_string_pretty(&conf).unwrap();
    // The chart's rule: "<< x >>" strings are written unquoted.
    let mut out = String::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("\"<<") {
        out.push_str(&rest[..i]);
        let end = rest[i..].find(">>\"").expect("closing >>") + i;
        out.push_str(rest[i + 3..end].trim());
        rest = &rest[end + 3..];
    }
    out.push_str(rest);
    out
}

/// A nats-server started with `conf` and `env`; killed on drop.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends CONNECT and PING over a plain TCP connection; the first line
/// after INFO (PONG if the server took it).
fn plaintext_attempt(port: u16) -> (String, String) {
    use std::io::{BufRead, BufReader, Write};
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut info = String::new();
    reader.read_line(&mut info).unwrap();
    let _ = (&stream)
        .write_all(b"CONNECT {\"verbose\":false,\"user\":\"ferry\",\"pass\":\"x\"}\r\nPING\r\n");
    let mut answer = String::new();
    let _ = reader.read_line(&mut answer);
    (info, answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_values_keep_out_clients_without_tls_a_certificate_or_the_password() {
    use ferry_testkit::pki::Pki;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    for file in [REGIONAL_VALUES, GLOBAL_VALUES] {
        let v = values(file);
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path(), "ca");
        let server = pki.issue("server", &["127.0.0.1"]);
        let client = pki.issue("client", &["ferry"]);
        let stranger = Pki::new(dir.path(), "other").issue("stranger", &["ferry"]);
        let certs = server.cert.parent().unwrap();
        // Passwords as the Secrets would hold them, into the variables the
        // values name.
        let mut env = BTreeMap::new();
        let mut passwords = BTreeMap::new();
        for account in v["config"]["merge"]["accounts"]
            .as_object()
            .unwrap()
            .values()
        {
            for u in account["users"].as_array().into_iter().flatten() {
                let var = env_reference(&u["password"]).unwrap().to_string();
                let pw = format!("{:032x}", rand::random::<u128>());
                env.insert(var, pw.clone());
                if account["jetstream"] == "enabled" {
                    passwords.insert(u["user"].as_str().unwrap().to_string(), pw);
                }
            }
        }
        let (user, password) = passwords.first_key_value().expect("a JetStream user");
        let port = ferry_testkit::free_port();
        let conf = dir.path().join("nats.conf");
        std::fs::write(
            &conf,
            chart_nats_conf(&v, port, certs, &dir.path().join("js")),
        )
        .unwrap();
        let log = dir.path().join("nats.log");
        let mut child = std::process::Command::new(tool("nats-server"))
            .args(["-c", conf.to_str().unwrap()])
            .envs(&env)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        ferry_testkit::wait_listening(
            &mut child,
            "nats-server",
            port,
            Some(&log),
            std::time::Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("{file}: {e}\n{}", std::fs::read_to_string(&conf).unwrap()));
        let _server = Server(child);

        let (info, answer) = plaintext_attempt(port);
        assert!(info.contains("\"tls_required\":true"), "{file}: {info}");
        assert!(
            !answer.starts_with("PONG"),
            "{file}: a plaintext client got in"
        );

        let url = format!("tls://127.0.0.1:{port}");
        let connect = |cert: Option<&ferry_testkit::pki::Leaf>, user: &str, pw: &str| {
            let mut o = async_nats::ConnectOptions::new()
                .require_tls(true)
                .add_root_certificates(server.ca.clone())
                .user_and_password(user.to_string(), pw.to_string())
                .connection_timeout(std::time::Duration::from_secs(5));
            if let Some(c) = cert {
                o = o.add_client_certificate(c.cert.clone(), c.key.clone());
            }
            let url = url.clone();
            async move { o.connect(url).await }
        };
        assert!(
            connect(None, user, password).await.is_err(),
            "{file}: in without a client certificate"
        );
        assert!(
            connect(Some(&stranger), user, password).await.is_err(),
            "{file}: in with another CA's certificate"
        );
        assert!(
            connect(Some(&client), user, "wrong").await.is_err(),
            "{file}: in with a wrong password"
        );
        let nc = connect(Some(&client), user, password)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{file}: Ferry's user cannot connect: {e}\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        // Its account has JetStream: Ferry's KV bucket works.
        let js = async_nats::jetstream::new(nc);
        let kv = js
            .create_key_value(async_nats::jetstream::kv::Config {
                bucket: "ferry-test".into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{file}: no JetStream for {user}: {e}"));
        kv.put("leader", "jm-0".into()).await.unwrap();
        assert_eq!(kv.get("leader").await.unwrap().unwrap(), "jm-0");
    }
}

#[test]
fn dockerfile_passes_hadolint() {
    run_ok("hadolint", &["deploy/docker/Dockerfile"]);
    // And hadolint does fail on what it should: a root final user.
    let bad = read("deploy/docker/Dockerfile").replace("USER 65532:65532", "USER root");
    let file = temp_file(&bad, ".Dockerfile");
    let out = run("hadolint", &[file.path().to_str().unwrap()]);
    assert!(!out.status.success(), "hadolint accepted a root user");
}

#[test]
fn dockerfile_builds_with_the_ci_build_step_and_runs_as_non_root() {
    let dockerfile = read("deploy/docker/Dockerfile");
    let build = "scripts/build-release.sh";
    assert!(
        dockerfile
            .lines()
            .any(|l| l.trim_start().starts_with("scripts/build-release.sh")
                || l.contains(&format!("RUN {build}"))),
        "the Dockerfile must build with {build}"
    );
    // Run as a command (possibly through the script's step runner), not
    // merely mentioned in a comment or a message.
    assert!(
        read("scripts/test.sh").lines().any(|l| {
            let l = l.trim();
            !l.starts_with('#')
                && !l.starts_with("echo")
                && l.split_whitespace().any(|w| w == build)
        }),
        "CI must run {build}"
    );
    assert!(
        read(build).contains("cargo build --release --locked -p ferry"),
        "{build} builds the locked release binary"
    );
    // The builder's Rust is at least the workspace's rust-version.
    let cargo: toml_like::Version = toml_like::rust_version(&read("Cargo.toml"));
    let from = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("FROM rust:"))
        .expect("a rust: builder stage");
    let image: toml_like::Version = toml_like::parse(from.split('-').next().unwrap());
    assert!(
        image >= cargo,
        "builder rust:{from} is older than rust-version {cargo:?}"
    );
    let last_user = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("USER "))
        .next_back()
        .expect("a USER line");
    assert!(
        !last_user.starts_with('0') && !last_user.starts_with("root"),
        "USER {last_user}"
    );
}

/// Version numbers without a TOML parser.
mod toml_like {
    pub type Version = Vec<u64>;
    pub fn parse(v: &str) -> Version {
        v.trim()
            .trim_matches('"')
            .split('.')
            .map(|p| p.parse().expect("version part"))
            .collect()
    }
    pub fn rust_version(cargo_toml: &str) -> Version {
        let line = cargo_toml
            .lines()
            .find(|l| l.starts_with("rust-version"))
            .expect("rust-version in Cargo.toml");
        parse(line.split('=').nth(1).unwrap())
    }
}

const RULES: &str = "deploy/prometheus/ferry-rules.yaml";
const RULE_TESTS: &str = "deploy/prometheus/tests/ferry-rules.test.yaml";

#[test]
fn alert_rules_pass_promtool_check() {
    let out = run_ok("promtool", &["check", "rules", RULES]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn alert_rules_unit_tests_pass() {
    let out = run_ok("promtool", &["test", "rules", RULE_TESTS]);
    assert!(out.contains("SUCCESS"), "{out}");
}

/// GitHub's anchor of a Markdown heading.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            'a'..='z' | '0'..='9' | '-' | '_' => Some(c),
            ' ' => Some('-'),
            _ => None,
        })
        .collect()
}

#[test]
fn every_alert_fires_in_a_unit_test_and_links_its_runbook() {
    let rules: Value = serde_yaml_ng::from_str(&read(RULES)).unwrap();
    let tests: Value = serde_yaml_ng::from_str(&read(RULE_TESTS)).unwrap();
    let ops = read("docs/operations.md");
    let anchors: BTreeSet<String> = ops
        .lines()
        .filter_map(|l| {
            l.strip_prefix('#')
                .map(|h| anchor(h.trim_start_matches('#')))
        })
        .collect();
    // Alerts a test expects to fire (a non-empty exp_alerts).
    let mut fired = BTreeSet::new();
    for t in tests["tests"].as_array().unwrap() {
        for a in t["alert_rule_test"].as_array().unwrap() {
            if a["exp_alerts"].as_array().is_some_and(|e| !e.is_empty()) {
                fired.insert(a["alertname"].as_str().unwrap().to_string());
            }
        }
    }
    let mut alerts = BTreeSet::new();
    for g in rules["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            let Some(name) = r["alert"].as_str() else {
                continue;
            };
            alerts.insert(name.to_string());
            assert!(fired.contains(name), "no unit test fires {name}");
            let url = r["annotations"]["runbook_url"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: no runbook_url"));
            let a = url
                .strip_prefix("docs/operations.md#")
                .unwrap_or_else(|| panic!("{name}: runbook {url} is not in docs/operations.md"));
            assert!(
                anchors.contains(a),
                "{name}: docs/operations.md has no heading #{a}"
            );
            assert!(r["labels"]["severity"].is_string(), "{name}: no severity");
        }
    }
    for required in [
        "FerryNoLeader",
        "FerryMoreThanOneLeader",
        "FerryHeartbeatFailures",
        "FerryCheckpointsFailing",
        "FerryReplicationLag",
        "FerryRegionDown",
        "FerryFailoverHappened",
        "FerryDrillFailed",
    ] {
        assert!(alerts.contains(required), "{required} missing from {RULES}");
    }
}

#[test]
fn metric_names_are_read_out_of_promql() {
    let got = metric_names(
        r#"max by (region) (ferry_replication_lag_seconds{region!="x"}) > 60 or rate(ferry_checkpoint_duration_seconds_bucket[5m]) and on() label_replace(up, "a", "ferry_not_a_metric", "", "")"#,
    );
    let want: BTreeSet<String> = [
        "ferry_replication_lag_seconds",
        "ferry_checkpoint_duration_seconds_bucket",
    ]
    .map(String::from)
    .into();
    assert_eq!(got, want);
}

const DASHBOARD: &str = "deploy/grafana/ferry.json";

#[test]
fn dashboard_is_grafana_json_whose_queries_parse_as_promql() {
    let d: Value = serde_json::from_str(&read(DASHBOARD)).expect("dashboard JSON");
    assert_eq!(d["uid"], "ferry");
    let panels = d["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "panel id {} twice",
            p["id"]
        );
        assert!(
            p["gridPos"]["w"].as_u64().is_some(),
            "{}: no gridPos",
            p["title"]
        );
        if p["type"] != "row" {
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "{}: fixed data source",
                p["title"]
            );
            assert!(
                !p["targets"].as_array().unwrap().is_empty(),
                "{}: no query",
                p["title"]
            );
        }
    }
    // Every query parses: promtool checks them as recording rules, with
    // Grafana's interval variable replaced by a duration.
    let exprs = dashboard_exprs(&d);
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, e)) in exprs.iter().enumerate() {
        let e = e
            .replace("$__rate_interval", "5m")
            .replace("$__interval", "1m");
        assert!(!e.contains('$'), "unknown Grafana variable in {e}");
        rules.push_str(&format!(
            "      - record: dashboard_query_{i}\n        expr: {}\n",
            serde_json::to_string(&e).unwrap()
        ));
    }
    let file = temp_file(&rules, ".yaml");
    run_ok(
        "promtool",
        &["check", "rules", file.path().to_str().unwrap()],
    );
    // What the issue asks the dashboard to show.
    let all: String = exprs
        .iter()
        .map(|(_, e)| e.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    for needle in [
        "ferry_ha_is_leader",
        "ferry_ha_epoch",
        "ferry_ha_members",
        "ferry_job_records_in_total",
        "ferry_checkpoint_duration_seconds_bucket",
        "ferry_checkpoint_size_bytes",
        "ferry_replication_lag_seconds",
        "ferry_failovers_total",
    ] {
        assert!(all.contains(needle), "the dashboard does not show {needle}");
    }
}
