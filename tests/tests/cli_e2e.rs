//! The quick start with the real binaries: `controlplane serve`, the operator CLI (tenant,
//! key, upstream with its credential from a variable, route, policy, revocation, nodes) and a
//! `dataplane` process linked to it, with requests through to a mock provider.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use e2e::cp::cli;
use e2e::mock::{MockOptions, MockProvider};
use e2e::*;

struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap().trim().to_string()
}

fn chat(gw: SocketAddr, key: &str) -> Resp {
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    post_with_key(gw, key, "/v1/chat/completions", body)
}

#[test]
fn the_operator_cli_drives_a_node_through_the_control_plane() {
    let dir = scratch_dir("cli-e2e");
    let data = dir.join("cp");
    let (api, link) = (free_addr(), free_addr());
    let _cp = Served(
        Command::new(bin_path("controlplane"))
            .args(["serve", "--data-dir"])
            .arg(&data)
            .args(["--listen", &api.to_string()])
            .args(["--link-listen", &link.to_string()])
            .env_remove("AIGW_SEAL_KEY")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("cp.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    assert!(
        wait_until(Duration::from_secs(20), || data
            .join("admin-token")
            .exists()
            && data.join("pki").join("ca.pem").exists()
            && std::net::TcpStream::connect(api).is_ok()),
        "control plane up: {}",
        std::fs::read_to_string(dir.join("cp.log")).unwrap_or_default()
    );
    let url = format!("https://{api}");
    let token = read(&data.join("admin-token"));
    let ca = data.join("pki").join("ca.pem");

    let tenant = cli(
        &url,
        &token,
        &ca,
        &["tenant-create", "Acme", "--tier", "pro"],
        &[],
    );
    let tenant = tenant["id"].as_str().unwrap().to_string();
    let created = cli(
        &url,
        &token,
        &ca,
        &[
            "key-create",
            "--tenant",
            &tenant,
            "--environment",
            "production",
        ],
        &[],
    );
    let key = created["key"].as_str().unwrap().to_string();
    let key_id = created["info"]["key_id"].as_str().unwrap().to_string();

    let provider = MockProvider::start(MockOptions::default());
    let up = cli(
        &url,
        &token,
        &ca,
        &[
            "upstream-put",
            "oa",
            "--tenant",
            &tenant,
            "--kind",
            "openai",
            "--base-url",
            &provider.base_url(),
            "--credential-env",
            "AIGW_CLI_E2E_PROVIDER_KEY",
        ],
        &[("AIGW_CLI_E2E_PROVIDER_KEY", "sk-from-the-cli")],
    );
    assert_eq!(up["has_credential"], true);
    cli(
        &url,
        &token,
        &ca,
        &[
            "route-put",
            "all",
            "--tenant",
            &tenant,
            "--environment",
            "production",
            "--prefix",
            "",
            "--target",
            "oa",
        ],
        &[],
    );
    let routes = cli(&url, &token, &ca, &["route-list", "--tenant", &tenant], &[]);
    assert_eq!(routes["data"].as_array().unwrap().len(), 1);

    // The node: registered with a scope, it enrols with its one-time token at first start;
    // its config names the control plane and where to keep its identity, nothing else.
    let added = cli(
        &url,
        &token,
        &ca,
        &["node-add", "cli-node", "--environment", "production"],
        &[],
    );
    assert_eq!(added["node"]["enrolled"], false);
    let enrollment = added["enrollment_token"].as_str().unwrap().to_string();
    let node_dir = dir.join("node");
    std::fs::create_dir_all(&node_dir).unwrap();
    let identity = node_dir.join("identity");
    let config = format!(
        "[control_plane]\naddress = \"{link}\"\nserver_name = \"localhost\"\nca_file = \"{}\"\nidentity_dir = \"{}\"\nenrollment_token_env = \"AIGW_CLI_E2E_ENROLLMENT_TOKEN\"\n",
        data.join("pki").join("ca.pem").display(),
        identity.display()
    );
    let gw = GatewayProcess::start_with_env(
        &process_toml(2, &config),
        &node_dir,
        &[("AIGW_CLI_E2E_ENROLLMENT_TOKEN", &enrollment)],
    );
    assert!(
        wait_until(Duration::from_secs(10), || admin_get(
            gw.admin_addr,
            "/readyz"
        )
        .status
            == 200),
        "node ready: {}",
        gw.log()
    );
    let r = chat(gw.addr, &key);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        provider.requests()[0].header("authorization"),
        Some("Bearer sk-from-the-cli")
    );
    let forwarded: serde_json::Value =
        serde_json::from_slice(&provider.requests()[0].body).unwrap();
    assert_eq!(
        forwarded["store"], false,
        "OpenAI upstreams are told not to retain by default"
    );

    // `nodes` shows the node and the revision it applied.
    let newest = cli(&url, &token, &ca, &["nodes"], &[]);
    let node = newest["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == "cli-node")
        .cloned()
        .unwrap();
    assert_eq!(node["connected"], true);
    assert_eq!(node["enrolled"], true);
    assert!(node["applied_revision"].as_u64().unwrap() > 0);
    // Its key never left the node; the files are private.
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&identity), 0o700);
        assert_eq!(mode(&identity.join("node.key")), 0o600);
        assert!(identity.join("node.pem").exists());
    }

    // An upstream that cannot be told not to retain breaks the zero retention every
    // environment has until its tenant opts out: requests do not leave.
    let applied = |revision: i64| {
        wait_until(Duration::from_secs(5), || {
            admin_get(gw.admin_addr, "/workers").json()["workers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|w| w["config_revision"].as_i64().unwrap_or(0) >= revision)
        })
    };
    let retaining = cli(
        &url,
        &token,
        &ca,
        &[
            "upstream-put",
            "oa",
            "--tenant",
            &tenant,
            "--kind",
            "openai",
            "--base-url",
            &provider.base_url(),
            "--no-non-retention",
        ],
        &[],
    );
    assert_eq!(retaining["non_retention"]["mode"], "none");
    assert!(applied(retaining["revision"].as_i64().unwrap()));
    let r = chat(gw.addr, &key);
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["code"], "policy_blocked");
    assert_eq!(provider.request_count(), 1, "nothing left for the provider");
    // The tenant's explicit opt-out, audited on its own line, lets it through.
    let policy = cli(
        &url,
        &token,
        &ca,
        &["policy-put", "--tenant", &tenant, "--allow-retention"],
        &[],
    );
    assert!(applied(policy["revision"].as_i64().unwrap()));
    assert_eq!(chat(gw.addr, &key).status, 200);
    let audit = cli(&url, &token, &ca, &["audit"], &[]);
    assert!(
        audit.to_string().contains("policy.zero_retention_opt_out"),
        "{audit}"
    );

    // Output for scripts: ids, one field, a table.
    let text = |args: &[&str]| {
        let out = Command::new(bin_path("controlplane"))
            .args(args)
            .env("AIGW_CONTROLPLANE_URL", &url)
            .env("AIGW_CONTROLPLANE_CA", &ca)
            .env("AIGW_ADMIN_TOKEN", &token)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(text(&["tenant-list", "-o", "id"]), format!("{tenant}\n"));
    let scripted = text(&["key-create", "--tenant", &tenant, "--field", "key"]);
    assert!(
        scripted.starts_with("aigw_prod_") && scripted.lines().count() == 1,
        "{scripted}"
    );
    let table = text(&["route-list", "--tenant", &tenant, "-o", "table"]);
    assert!(table.lines().next().unwrap().contains("name"), "{table}");
    assert!(table.contains("all"), "{table}");

    // Revocation from the CLI.
    cli(&url, &token, &ca, &["key-revoke", &key_id], &[]);
    assert!(
        wait_until(Duration::from_secs(5), || chat(gw.addr, &key).status == 401),
        "revoked"
    );
    // Scoped to staging, the node is sent a snapshot of staging at once: production's keys
    // are gone from it (an unknown key there), a staging key works.
    let staging = cli(
        &url,
        &token,
        &ca,
        &[
            "key-create",
            "--tenant",
            &tenant,
            "--environment",
            "staging",
        ],
        &[],
    )["key"]
        .as_str()
        .unwrap()
        .to_string();
    let fresh = cli(
        &url,
        &token,
        &ca,
        &[
            "key-create",
            "--tenant",
            &tenant,
            "--environment",
            "production",
        ],
        &[],
    )["key"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        wait_until(Duration::from_secs(5), || chat(gw.addr, &fresh).status
            == 200),
        "a production key reaches the node"
    );
    let scoped = cli(
        &url,
        &token,
        &ca,
        &["node-scope", "cli-node", "--environment", "staging"],
        &[],
    );
    assert_eq!(scoped["scope"]["environments"][0], "staging");
    assert!(
        wait_until(Duration::from_secs(5), || chat(gw.addr, &fresh).status
            == 401),
        "the production key is out of the node's scope"
    );
    let r = chat(gw.addr, &staging);
    assert_eq!(
        r.json()["error"]["code"],
        "model_not_found",
        "the staging key is known there (staging routes nothing): {}",
        String::from_utf8_lossy(&r.body)
    );

    // Revoked, the node is cut off at once and told why.
    let revoked = cli(&url, &token, &ca, &["node-revoke", "cli-node"], &[]);
    assert_eq!(revoked["revoked"], true);
    assert!(
        wait_until(Duration::from_secs(5), || gw
            .log()
            .contains("refused this node: this node was revoked")),
        "{}",
        gw.log()
    );
    let listed = cli(&url, &token, &ca, &["nodes"], &[]);
    let node = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == "cli-node")
        .cloned()
        .unwrap();
    assert_eq!(node["revoked"], true);
    assert!(
        wait_until(Duration::from_secs(5), || {
            cli(&url, &token, &ca, &["nodes"], &[])["data"][0]["connected"] == false
        }),
        "the revoked node stays disconnected"
    );

    let audit = cli(&url, &token, &ca, &["audit"], &[]);
    let actions: Vec<&str> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["action"].as_str())
        .collect();
    for a in [
        "tenant.create",
        "key.create",
        "upstream.put",
        "route.put",
        "policy.put",
        "key.revoke",
        "node.add",
        "node.enrolled",
        "node.scope",
        "node.revoke",
    ] {
        assert!(actions.contains(&a), "{a} in {actions:?}");
    }
    assert!(!audit.to_string().contains("sk-from-the-cli"));
    assert!(
        !audit.to_string().contains(&enrollment),
        "the enrolment token is in no audit record"
    );
}

/// `controlplane up`: one command brings up a control plane, a demo provider and a node
/// enrolled with it, and prints a key that works at once; Ctrl-C stops every process it
/// started; a second `up` on the same data directory reuses the node's identity.
#[test]
fn up_runs_a_local_stack_whose_key_works_and_stops_it_all() {
    use std::io::BufRead;
    let dir = scratch_dir("cli-up");
    let (api, link, gateway, admin) = (free_addr(), free_addr(), free_addr(), free_addr());
    let run = || {
        let mut child = Command::new(bin_path("controlplane"))
            .arg("up")
            .arg("--data-dir")
            .arg(&dir)
            .args(["--listen", &api.to_string()])
            .args(["--link-listen", &link.to_string()])
            .args(["--gateway-listen", &gateway.to_string()])
            .args(["--gateway-admin", &admin.to_string()])
            .env_remove("AIGW_SEAL_KEY")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.with_extension("log")).unwrap())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut banner = String::new();
        while !banner.contains("Ctrl-C stops everything") {
            let mut line = String::new();
            assert!(
                out.read_line(&mut line).unwrap() > 0,
                "up exited: {}",
                std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default()
            );
            banner.push_str(&line);
        }
        (Served(child), banner)
    };
    let (up, banner) = run();
    let key = banner
        .split_whitespace()
        .find(|w| w.starts_with("aigw_prod_"))
        .expect("a key in the banner")
        .to_string();
    assert!(banner.contains(&format!("http://{gateway}/v1/chat/completions")));
    // The admin API over HTTPS, and the CA that verifies it.
    let ca = dir.join("controlplane").join("pki").join("ca.pem");
    assert!(
        banner.contains(&format!("AIGW_CONTROLPLANE_URL=https://{api}"))
            && banner.contains(&format!("AIGW_CONTROLPLANE_CA={}", ca.display())),
        "{banner}"
    );
    let r = chat(gateway, &key);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("You said: hi"));
    let pids = |pattern: &str| -> Vec<String> {
        let out = Command::new("pgrep")
            .args(["-f", pattern])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    };
    let node_config = dir.join("node").join("node.toml");
    assert_eq!(
        pids(&node_config.display().to_string()).len(),
        1,
        "the node runs"
    );

    // Ctrl-C: everything stops.
    let pid = up.0.id();
    Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    let mut up = up;
    let status = up.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        wait_until(Duration::from_secs(5), || pids(
            &node_config.display().to_string()
        )
        .is_empty()),
        "the node stopped with it"
    );
    assert!(
        std::net::TcpStream::connect(gateway).is_err(),
        "the gateway is gone"
    );
    assert!(
        std::net::TcpStream::connect(api).is_err(),
        "the control plane is gone"
    );

    // Again on the same data: the node keeps its identity, a new key works.
    let (_up, banner) = run();
    let key = banner
        .split_whitespace()
        .find(|w| w.starts_with("aigw_prod_"))
        .unwrap()
        .to_string();
    assert_eq!(chat(gateway, &key).status, 200);
    let log = std::fs::read_to_string(dir.join("node").join("dataplane.log")).unwrap();
    assert!(
        !log.contains("enrolled with the control plane"),
        "no second enrolment: {log}"
    );
}
