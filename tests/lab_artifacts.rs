//! The docker lab's monitoring files are checked artifacts (issue 13): docker-compose.yml
//! parses and wires Prometheus, Grafana and the FreeSWITCH option to files that exist, and
//! every metric the Grafana dashboard queries is one a running `callvault serve` exposes on
//! `/metrics` (a renamed metric breaks this test instead of silently emptying a panel).
//! No Docker engine is needed: the files are read, callvault runs on loopback.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::{Server, ServerConfig};
use serde_yaml::Value;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn yaml(rel: &str) -> Value {
    let text = std::fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
}

fn dashboard() -> serde_json::Value {
    let rel = "config/grafana/dashboards/callvault.json";
    let text = std::fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{rel} is not valid JSON: {e}"))
}

/// Every PromQL expression of every panel.
fn dashboard_exprs(d: &serde_json::Value) -> Vec<String> {
    let panels = d["panels"].as_array().expect("panels");
    panels
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().expect("expr").to_string())
        .collect()
}

/// Metric names in a PromQL expression: identifiers of our namespaces (functions, label
/// names and label values never start with `callvault_` or `process_`).
fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("callvault_") || w.starts_with("process_"))
        .map(str::to_string)
        .collect()
}

#[test]
fn compose_wires_monitoring_and_freeswitch_to_files_that_exist() {
    let compose = yaml("docker-compose.yml");
    let services = compose["services"].as_mapping().expect("services");
    for name in [
        "callvault",
        "asterisk",
        "sipp",
        "prometheus",
        "grafana",
        "freeswitch",
    ] {
        assert!(
            services.contains_key(name),
            "service {name} missing from docker-compose.yml"
        );
    }
    for name in ["prometheus", "grafana", "freeswitch"] {
        let image = compose["services"][name]["image"].as_str().expect("image");
        let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
        assert!(
            !tag.is_empty() && tag != "latest",
            "{name}: image {image} is not pinned"
        );
    }
    let profiles = &compose["services"]["freeswitch"]["profiles"];
    assert_eq!(
        profiles
            .as_sequence()
            .map(|s| s.iter().filter_map(Value::as_str).collect::<Vec<_>>()),
        Some(vec!["freeswitch"]),
        "FreeSWITCH only runs with --profile freeswitch"
    );
    // Every bind mount's source is a file or folder of the repository.
    for (name, svc) in services {
        let Some(vols) = svc["volumes"].as_sequence() else {
            continue;
        };
        for v in vols.iter().filter_map(Value::as_str) {
            if let Some(src) = v.split(':').next().filter(|s| s.starts_with("./")) {
                assert!(repo(src).exists(), "{name:?}: {src} does not exist");
            }
        }
    }
    // Prometheus scrapes callvault where compose and the lab config put it.
    let ip = compose["services"]["callvault"]["networks"]["lab"]["ipv4_address"]
        .as_str()
        .expect("callvault address");
    let lab = std::fs::read_to_string(repo("config/examples/asterisk-trunk.toml")).unwrap();
    assert!(lab.contains("listen = \"0.0.0.0:8080\""), "lab HTTP port");
    let prom = yaml("config/prometheus/prometheus.yml");
    let job = &prom["scrape_configs"][0];
    assert_eq!(job["metrics_path"].as_str(), Some("/metrics"));
    assert_eq!(
        job["static_configs"][0]["targets"][0].as_str(),
        Some(format!("{ip}:8080").as_str())
    );
    // callvault routes 5xxx to the FreeSWITCH trunk profile's address and port.
    let fs_ip = compose["services"]["freeswitch"]["networks"]["lab"]["ipv4_address"]
        .as_str()
        .expect("freeswitch address");
    let profile =
        std::fs::read_to_string(repo("config/freeswitch/sip_profiles/callvault.xml")).unwrap();
    let port = profile
        .split("name=\"sip-port\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("sip-port in the FreeSWITCH profile");
    assert!(
        lab.contains(&format!("target = \"{fs_ip}:{port}\"")),
        "the lab config routes to FreeSWITCH at {fs_ip}:{port}"
    );
    // Grafana's data source is the prometheus service.
    let prom_ip = compose["services"]["prometheus"]["networks"]["lab"]["ipv4_address"]
        .as_str()
        .expect("prometheus address");
    let ds = yaml("config/grafana/provisioning/datasources/prometheus.yml");
    assert_eq!(
        ds["datasources"][0]["url"].as_str(),
        Some(format!("http://{prom_ip}:9090").as_str())
    );
    let uid = ds["datasources"][0]["uid"].as_str().expect("uid");
    let d = dashboard();
    for p in d["panels"].as_array().expect("panels") {
        assert_eq!(p["datasource"]["uid"].as_str(), Some(uid), "{}", p["title"]);
    }
}

#[test]
fn every_metric_the_dashboard_queries_is_exposed() {
    let exprs = dashboard_exprs(&dashboard());
    let wanted: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    // The brief's panels: calls, RTP relayed/refused, stores, threshold, auth, connections.
    for m in [
        "callvault_calls_active",
        "callvault_calls_total",
        "callvault_rtp_packets_relayed_total",
        "callvault_rtp_packets_refused_total",
        "callvault_stores",
        "callvault_threshold_seconds_bucket",
        "callvault_auth_user_lockouts_total",
        "callvault_connections_active",
    ] {
        assert!(wanted.contains(m), "the dashboard has no panel for {m}");
    }

    let server = Server::spawn(ServerConfig::new());
    let text = server.metrics();
    // Names of the series /metrics exposes (`name{labels} value` or `name value`).
    let exposed: BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|m| !exposed.contains(m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics callvault does not expose: {missing:?}"
    );
}

/// The compose cluster profile (issue 11 item 5): each node's environment is a config callvault
/// accepts (`config check` with exactly those variables over the image's default file), the
/// nodes are the addresses the front's dispatcher list names, and Kamailio accepts the front's
/// config with that list.
#[test]
fn compose_cluster_profile_nodes_and_front_fit_together() {
    let compose = yaml("docker-compose.yml");
    let services = &compose["services"];
    let mut node_sip = BTreeSet::new();
    for name in ["callvault-node1", "callvault-node2"] {
        let s = &services[name];
        assert_eq!(s["profiles"][0].as_str(), Some("cluster"), "{name}");
        let env = s["environment"].as_mapping().expect("environment");
        let mut cmd = std::process::Command::new(common::callvault_bin());
        cmd.args(["config", "check", "--config"])
            .arg(repo("config/examples/docker.toml"))
            .env_remove("CALLVAULT_CONFIG");
        for (k, v) in env {
            let v = match v {
                Value::String(s) => s.clone(),
                other => serde_yaml::to_string(other).unwrap().trim().to_string(),
            };
            cmd.env(k.as_str().unwrap(), v);
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name}: {out:?}");
        let node_id = name.trim_start_matches("callvault-");
        assert!(text.contains(&format!("node_id = \"{node_id}\"")), "{text}");
        assert!(text.contains("objects = \"s3://callvault\""), "{text}");
        assert!(
            !text.contains("callvault:callvault@"),
            "password printed: {text}"
        );
        let ip = s["networks"]["lab"]["ipv4_address"].as_str().unwrap();
        node_sip.insert(format!("sip:{ip}:5060"));
    }
    let list = std::fs::read_to_string(repo("config/kamailio/dispatcher-docker.list")).unwrap();
    let listed: BTreeSet<String> = list
        .lines()
        .filter(|l| l.starts_with("1 "))
        .map(|l| l.split_whitespace().nth(1).unwrap().to_string())
        .collect();
    assert_eq!(
        listed, node_sip,
        "dispatcher-docker.list vs the compose nodes"
    );
    let front = &services["kamailio"];
    let mounts: Vec<&str> = front["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for m in &mounts {
        let local = m.split(':').next().unwrap().trim_start_matches("./");
        assert!(repo(local).exists(), "{m}: missing {local}");
    }
    if !common::tool_available("kamailio") {
        return;
    }
    let out = std::process::Command::new("kamailio")
        .arg("-c")
        .arg("-f")
        .arg(repo("config/kamailio/kamailio.cfg"))
        .args(["-A", "LISTEN=udp:127.0.0.1:5060", "-A"])
        .arg(format!(
            "DISPATCHER_LIST=\"{}\"",
            repo("config/kamailio/dispatcher-docker.list").display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kamailio -c: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
