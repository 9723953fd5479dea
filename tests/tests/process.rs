//! The real `dataplane` binary: config validation, SIGHUP reload, SIGTERM drain.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use e2e::*;

fn config(extra: &str) -> String {
    process_toml(2, extra)
}

#[test]
fn invalid_config_is_refused_naming_the_key() {
    let dir = scratch_dir("invalid-config");
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[limits]\nmax_headers = 100000\n").unwrap();
    let out = Command::new(bin_path("dataplane"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("limits.max_headers") && err.contains("bad.toml"),
        "{err}"
    );

    std::fs::write(&path, "[limits]\nmax_header = 10\n").unwrap();
    let out = Command::new(bin_path("dataplane"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown field `max_header`"), "{err}");

    std::fs::write(&path, "[limits]\nmax_headers = 50\n").unwrap();
    let out = Command::new(bin_path("dataplane"))
        .args(["--check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sighup_reloads_and_a_bad_file_keeps_the_running_config() {
    let dir = scratch_dir("sighup");
    let gw = GatewayProcess::start(&config(""), &dir);
    assert_eq!(exchange(gw.addr, &chat_request(CHAT_BODY)).status, 200);

    std::fs::write(
        dir.join("dataplane.toml"),
        config("[limits]\nmax_body_bytes = 8\n"),
    )
    .unwrap();
    gw.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || exchange(
            gw.addr,
            &chat_request(CHAT_BODY)
        )
        .status
            == 413),
        "new limit applied: {}",
        gw.log()
    );

    std::fs::write(
        dir.join("dataplane.toml"),
        "[limits]\nmax_body_bytes = \"lots\"\n",
    )
    .unwrap();
    gw.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(10), || gw
        .log()
        .contains("reload refused")));
    assert_eq!(
        exchange(gw.addr, &chat_request(CHAT_BODY)).status,
        413,
        "previous config kept"
    );
}

#[test]
fn sigterm_drains_in_flight_requests_then_exits() {
    let dir = scratch_dir("sigterm");
    let mut gw = GatewayProcess::start(&config("[log]\naccess = true\n"), &dir);
    let mut busy = connect(gw.addr);
    let raw = chat_request(CHAT_BODY);
    let split = raw.len() - 3;
    busy.write_all(&raw[..split]).unwrap();
    in_flight(&gw);

    gw.signal(libc::SIGTERM);
    assert!(wait_until(Duration::from_secs(5), || gw
        .log()
        .contains("shutting down")));
    assert_eq!(
        gw.child.try_wait().unwrap(),
        None,
        "waits for the in-flight request"
    );
    busy.write_all(&raw[split..]).unwrap();
    let r = read_response(&mut busy, &mut Vec::new()).expect("in-flight request answered");
    assert_eq!(r.status, 200);
    assert!(r.closes());
    assert_eq!(
        gw.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        gw.log()
    );
    let log = gw.log();
    let access = log
        .lines()
        .find(|l| l.contains("access:"))
        .expect("access log line");
    for field in [
        "id=",
        "method=\"POST\"",
        "path=\"/v1/chat/completions\"",
        "status=200",
        "latency_us=",
    ] {
        assert!(access.contains(field), "{field} missing in {access}");
    }
    assert!(!log.contains("hello"), "the access log never holds a body");
}

/// Waits until the gateway holds a request whose head it has read (its body reserved
/// against a worker's budget): the request is in flight.
fn in_flight(gw: &GatewayProcess) {
    assert!(
        wait_until(Duration::from_secs(20), || body_bytes(gw.admin_addr) > 0),
        "the request never reached the gateway"
    );
}

#[test]
fn a_second_signal_exits_at_once() {
    let dir = scratch_dir("second-signal");
    let mut gw = GatewayProcess::start(&config("[timeouts]\nshutdown_drain = \"60s\"\n"), &dir);
    let mut busy = connect(gw.addr);
    let raw = chat_request(CHAT_BODY);
    busy.write_all(&raw[..raw.len() - 3]).unwrap();
    in_flight(&gw);
    gw.signal(libc::SIGTERM);
    assert!(wait_until(Duration::from_secs(5), || gw
        .log()
        .contains("shutting down")));
    assert_eq!(gw.child.try_wait().unwrap(), None, "draining");
    gw.signal(libc::SIGINT);
    // Well before the 60 s drain deadline.
    assert_eq!(
        gw.wait_exit(Duration::from_secs(10)),
        Some(130),
        "{}",
        gw.log()
    );
    assert!(gw.log().contains("second signal"));
}

/// A client that gives up while its request waits for the upstream is logged as 499, and
/// the upstream connection is closed rather than left generating for nobody.
#[test]
fn an_abandoned_request_is_logged_as_499() {
    use e2e::mock::{Behavior, MockOptions, MockProvider};
    let mock = MockProvider::start(MockOptions {
        default: Behavior::Hold,
        ..Default::default()
    });
    let dir = scratch_dir("abandoned");
    let mut gw = GatewayProcess::start(
        &config(&format!(
            "[log]\naccess = true\n{}[[routes]]\nprefix = \"\"\ntargets = [{{ upstream = \"m\" }}]\n",
            upstream_toml("m", "openai", &mock.base_url(), "")
        )),
        &dir,
    );
    let mut client = connect(gw.addr);
    client.write_all(&chat_request(CHAT_BODY)).unwrap();
    assert!(wait_until(Duration::from_secs(5), || mock.request_count() == 1));
    drop(client);
    assert!(
        wait_until(Duration::from_secs(10), || mock.closed_by_peer() == 1),
        "the upstream connection stayed open"
    );
    gw.signal(libc::SIGTERM);
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
    let log = gw.log();
    let line = log
        .lines()
        .find(|l| l.contains("access:") && l.contains("/v1/chat/completions"))
        .unwrap_or_else(|| panic!("no access line: {log}"));
    assert!(line.contains("status=499"), "{line}");
}

#[test]
fn drain_deadline_bounds_the_shutdown() {
    let dir = scratch_dir("drain-deadline");
    let mut gw = GatewayProcess::start(&config("[timeouts]\nshutdown_drain = \"300ms\"\n"), &dir);
    let mut stuck = connect(gw.addr);
    stuck
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\n{",
        )
        .unwrap();
    in_flight(&gw);
    gw.signal(libc::SIGTERM);
    assert_eq!(
        gw.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        gw.log()
    );
    assert!(gw.log().contains("drain deadline passed"));
}

#[test]
fn access_log_never_holds_query_strings_or_keys() {
    let dir = scratch_dir("access-log");
    let mut gw = GatewayProcess::start(&config("[log]\naccess = true\n"), &dir);
    let raw = "GET /v1/models?api_key=sk-secret-123 HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer sk-secret-456\r\n\r\n";
    assert_eq!(exchange(gw.addr, raw.as_bytes()).status, 200);
    gw.signal(libc::SIGTERM);
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
    let log = gw.log();
    assert!(log.contains("path=\"/v1/models\""), "{log}");
    assert!(!log.contains("sk-secret"), "{log}");
}

/// The sample configurations in dataplane/examples are valid as shipped (paths moved into
/// a scratch directory, secrets provided).
#[test]
fn the_sample_configurations_are_valid() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dataplane/examples");
    let dir = scratch_dir("examples");
    let check = |name: &str, text: &str, env: &[(&str, &str)]| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let out = Command::new(bin_path("dataplane"))
            .arg("--check")
            .arg("--config")
            .arg(&path)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let read = |name: &str| std::fs::read_to_string(examples.join(name)).unwrap();
    check(
        "static.toml",
        &read("static.toml"),
        &[
            ("OPENAI_API_KEY", "sk-x"),
            ("ANTHROPIC_API_KEY", "sk-ant-x"),
        ],
    );
    check("container-demo.toml", &read("container-demo.toml"), &[]);
    // The node's: its files where the example puts them, under the scratch directory.
    let etc = dir.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("ca.pem"), "").unwrap();
    dataplane::seal::files::write_private(
        &etc.join("enrollment-token"),
        b"aigw_enroll_0123456789abcdefghijklmnopqrstuvwxyzABCD",
    )
    .unwrap();
    dataplane::seal::files::write_private(&etc.join("node-seal.key"), "ab".repeat(32).as_bytes())
        .unwrap();
    std::fs::create_dir_all(etc.join("tls")).unwrap();
    let pair = rcgen::generate_simple_self_signed(vec!["gw.example".into()]).unwrap();
    std::fs::write(etc.join("tls/fullchain.pem"), pair.cert.pem()).unwrap();
    std::fs::write(etc.join("tls/key.pem"), pair.key_pair.serialize_pem()).unwrap();
    let var = dir.join("var");
    std::fs::create_dir_all(&var).unwrap();
    let node = read("node.toml")
        .replace("/etc/aigw/", &format!("{}/", etc.display()))
        .replace("/var/lib/aigw-dataplane/", &format!("{}/", var.display()));
    check("node.toml", &node, &[]);
}
