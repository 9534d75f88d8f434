//! The `proxy.toml` inside each Kubernetes kustomization passes `tallyfy-proxy
//! check`, laid out as the pod mounts it (config/ and secrets/ side by side), and
//! every secret file it names is a key of the kustomization's Secret.

use std::path::Path;
use std::process::Command;

fn secret_files(config: &str) -> Vec<String> {
    config
        .split("file = \"../secrets/")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_deployed_config_passes_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let mut checked = 0;
    for entry in std::fs::read_dir(&root).expect("deploy/kubernetes exists") {
        let folder = entry.expect("entry").path();
        let Ok(config) = std::fs::read_to_string(folder.join("proxy.toml")) else { continue };
        let secret =
            std::fs::read_to_string(folder.join("secret.yaml")).expect("a secret.yaml beside proxy.toml");

        let pod = tempfile::tempdir().expect("dir");
        std::fs::create_dir_all(pod.path().join("config")).expect("mkdir");
        std::fs::create_dir_all(pod.path().join("secrets")).expect("mkdir");
        std::fs::write(pod.path().join("config/proxy.toml"), &config).expect("write");
        let files = secret_files(&config);
        assert!(!files.is_empty(), "{}: the example reads its secrets from files", folder.display());
        for file in &files {
            assert!(
                secret.contains(&format!("\n  {file}: ")),
                "{}: secret.yaml lacks key {file}",
                folder.display()
            );
            std::fs::write(pod.path().join("secrets").join(file), "placeholder\n").expect("write");
        }
        let output = Command::new(env!("CARGO_BIN_EXE_tallyfy-proxy"))
            .args(["check", "--config", "config/proxy.toml"])
            .current_dir(pod.path())
            .output()
            .expect("runs");
        assert!(
            output.status.success(),
            "{}: {}{}",
            folder.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        checked += 1;
    }
    assert_eq!(checked, 2, "sidecar and gateway");
}

#[test]
fn the_gateways_fleet_component_passes_check_and_keeps_the_gateways_config() {
    let gateway = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/gateway");
    let base = std::fs::read_to_string(gateway.join("proxy.toml")).expect("gateway config");
    let config = std::fs::read_to_string(gateway.join("fleet/proxy.toml")).expect("fleet config");
    assert!(config.starts_with(&base), "fleet/proxy.toml is the gateway's with [fleet] added below it");
    assert!(config[base.len()..].contains("[fleet]"));
    let secret = std::fs::read_to_string(gateway.join("fleet/secret.yaml")).expect("fleet secret");
    assert!(secret.contains("\n  redis_url: ") && secret.contains("\n  fleet_key: "));

    // Laid out as the patched pod mounts it.
    let pod = tempfile::tempdir().expect("dir");
    for dir in ["config", "secrets", "fleet"] {
        std::fs::create_dir_all(pod.path().join(dir)).expect("mkdir");
    }
    std::fs::write(pod.path().join("config/proxy.toml"), &config).expect("write");
    for file in secret_files(&config) {
        std::fs::write(pod.path().join("secrets").join(file), "placeholder\n").expect("write");
    }
    std::fs::write(pod.path().join("fleet/fleet_key"), "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n")
        .expect("write");
    std::fs::write(pod.path().join("fleet/redis_url"), "redis://:pw-in-url@redis:6379/0\n").expect("write");
    let output = Command::new(env!("CARGO_BIN_EXE_tallyfy-proxy"))
        .args(["check", "--config", "config/proxy.toml"])
        .current_dir(pod.path())
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("fleet         tallyfy-proxy/gateway"), "{stdout}");
    assert!(!stdout.contains("pw-in-url"), "check never prints the URL's password");
}

/// Each example names its own ConfigMap and Secrets: applied into one
/// namespace, the second no longer replaces the first's config and
/// credentials (the running gateway, reloading live, took the sidecar's
/// `any = true` identity and served its user's token to callers without a key).
#[test]
fn the_examples_share_no_config_or_secret_name() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let names = |example: &str| -> Vec<String> {
        let mut names = Vec::new();
        let mut files = vec![root.join(example)];
        while let Some(path) = files.pop() {
            if path.is_dir() {
                files
                    .extend(std::fs::read_dir(&path).expect("dir").map(|entry| entry.expect("entry").path()));
                continue;
            }
            if path.extension().is_none_or(|ext| ext != "yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read");
            let kinds = ["kind: ConfigMap", "kind: Secret", "configMapGenerator:", "secretGenerator:"];
            if !kinds.iter().any(|kind| text.contains(kind)) {
                continue;
            }
            // `metadata: name:` of a Secret or ConfigMap, `- name:` of a generator.
            let lines: Vec<&str> = text.lines().collect();
            for (at, line) in lines.iter().enumerate() {
                let generated = line.starts_with("  - name: ") && text.contains("Generator:");
                let declared = at > 0 && lines[at - 1] == "metadata:" && line.starts_with("  name: ");
                if generated || (declared && !text.contains("kind: Deployment")) {
                    names.push(line.rsplit(": ").next().expect("a name").trim().to_owned());
                }
            }
        }
        names
    };
    let (sidecar, gateway) = (names("sidecar"), names("gateway"));
    assert!(sidecar.len() >= 2 && gateway.len() >= 3, "{sidecar:?} {gateway:?}");
    for name in &sidecar {
        assert!(!gateway.contains(name), "{name} is in both examples");
    }
}
