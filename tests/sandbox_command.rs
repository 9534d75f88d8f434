//! `tallyfy-proxy sandbox` prints curl commands that work as printed (with the
//! default `sandbox` feature; without it there is no such command).
#![cfg(feature = "sandbox")]

use tallyfy_proxy::sandbox_mode;

#[tokio::test]
async fn the_printed_curl_commands_work_as_printed() {
    let mode =
        sandbox_mode::start("127.0.0.1:0".parse().expect("addr"), "127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("sandbox mode starts");
    mode.proxy.ready().await;
    let banner = mode.banner();
    assert!(banner.starts_with("tallyfy-proxy sandbox ready"), "{banner}");

    // Join backslash-continued lines, keep the curl commands.
    let joined = banner.replace("\\\n", " ");
    let commands: Vec<&str> = joined.lines().map(str::trim).filter(|l| l.starts_with("curl ")).collect();
    assert!(commands.len() >= 3, "{banner}");
    for command in commands {
        let output = tokio::process::Command::new("sh")
            .args(["-c", &format!("{command} --fail-with-body")])
            .output()
            .await
            .expect("sh runs");
        let body = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{command}\n{body}");
        let json: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{command}: {e}: {body}"));
        assert!(json.get("error").is_none(), "{command}: {json}");
    }
}
