//! The deployment artifacts under `deploy/`, checked with the real tools
//! that `scripts/test.sh` installs: every Kubernetes overlay renders with
//! kustomize and validates against the Kubernetes schemas (offline; the
//! cert-manager objects, which those schemas do not cover, against the
//! fields of cert-manager's v1 CRDs here), its settings load with Ferry's
//! own config loader, the NATS values keep every write on disk, the
//! Dockerfile passes hadolint and builds with CI's
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

/// The environment a container of `deployment` gets: the ConfigMap, then
/// its own `env` with `$(VAR)` references and field refs filled in.
fn container_env(docs: &[Value], deployment: &str) -> BTreeMap<String, String> {
    let d = find(docs, "Deployment", deployment);
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
            (None, Some("metadata.name")) => format!("{deployment}-7d9f8-abcde"),
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
            "Service",
            "ConfigMap",
            "PodDisruptionBudget",
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
        assert!(
            cm["FERRY_NATS_URLS"].starts_with("nats://"),
            "{region}: {}",
            cm["FERRY_NATS_URLS"]
        );
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
        // What the processes will see loads with Ferry's config loader and
        // passes its checks (timings, primary, the region's own store).
        for deployment in ["ferry-jobmanager", "ferry-taskmanager"] {
            let env = container_env(&docs, deployment);
            let cfg = ferry_core::config::ProcessConfig::load(None, &env)
                .unwrap_or_else(|e| panic!("{region} {deployment}: {e}"));
            assert_eq!(cfg.region, region);
            assert_eq!(
                cfg.regions.stores.get(&region),
                Some(storage),
                "{region}: regions.stores names another store for this region"
            );
        }
    }
}

/// The port a probe of `container` targets, resolved through its named ports.
fn probe_port(container: &Value, probe: &str) -> (String, u64) {
    let p = &container[probe]["httpGet"];
    let path = p["path"]
        .as_str()
        .unwrap_or_else(|| panic!("{probe} is not httpGet"))
        .to_string();
    let port = match &p["port"] {
        Value::String(name) => container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == *name)
            .and_then(|x| x["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("{probe}: no port named {name}")),
        v => v.as_u64().expect("port"),
    };
    (path, port)
}

fn listen_port(addr: &str) -> u64 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn jobmanagers_are_highly_available_and_probed_where_ferry_serves() {
    let region = overlays()[0].clone();
    let docs = yaml_docs(&render(&region));
    let jm = find(&docs, "Deployment", "ferry-jobmanager");
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

    let env = container_env(&docs, "ferry-jobmanager");
    let c = &pod["containers"][0];
    let api = listen_port(&env["FERRY_API_LISTEN"]);
    assert_eq!(probe_port(c, "livenessProbe"), ("/healthz".into(), api));
    assert_eq!(probe_port(c, "startupProbe"), ("/healthz".into(), api));
    assert_eq!(probe_port(c, "readinessProbe"), ("/readyz".into(), api));
    let ann = &spec["template"]["metadata"]["annotations"];
    assert_eq!(ann["prometheus.io/port"], api.to_string());

    let tm = find(&docs, "Deployment", "ferry-taskmanager");
    let env = container_env(&docs, "ferry-taskmanager");
    let c = &tm["spec"]["template"]["spec"]["containers"][0];
    let http = listen_port(&env["FERRY_TASKMANAGER_HTTP_LISTEN"]);
    assert_eq!(probe_port(c, "livenessProbe"), ("/healthz".into(), http));
    assert_eq!(probe_port(c, "readinessProbe"), ("/readyz".into(), http));
    assert!(
        tm["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap()
            >= 30
    );

    for d in docs.iter().filter(|d| d["kind"] == "Deployment") {
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
