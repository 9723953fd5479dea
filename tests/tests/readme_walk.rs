//! The README's walk, run as written: the block after `<!-- readme-walk -->` in README.md,
//! in a shell, against a running `controlplane up`, from a directory laid out as a checkout
//! after `cargo build --release` (its `target/release` holding this build's binaries), with
//! a home directory of its own. The README and this test cannot drift apart.
//!
//! It uses the README's fixed ports (8080, 8081, 9443, 9900, 9901, 9902) and says so if
//! one is taken.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e::*;

/// The shell block the README marks as its walk.
fn walk_block() -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let after = readme
        .split_once("<!-- readme-walk -->")
        .expect("README.md marks its walk with <!-- readme-walk -->")
        .1;
    let body = after
        .trim_start()
        .strip_prefix("```sh\n")
        .expect("the walk is a ```sh block");
    body[..body.find("\n```").expect("the block ends")].to_string()
}

#[test]
fn the_readme_walk_works_as_written() {
    for port in [8080, 8081, 9443, 9900, 9901, 9902] {
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "port {port} is taken: the README's walk needs it"
        );
    }
    let root = scratch_dir("readme-walk");
    let (home, checkout) = (root.join("home"), root.join("checkout"));
    let release = checkout.join("target/release");
    let tools = root.join("tools");
    for d in [&home, &release, &tools] {
        std::fs::create_dir_all(d).unwrap();
    }
    for bin in ["controlplane", "dataplane"] {
        std::os::unix::fs::symlink(bin_path(bin), release.join(bin)).unwrap();
    }
    // `python3` with the official SDKs, as `pip install openai` would give.
    let python = tools.join("python3");
    std::fs::write(
        &python,
        format!("#!/bin/sh\nexec '{}' \"$@\"\n", sdk_python().display()),
    )
    .unwrap();
    std::fs::set_permissions(&python, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        tools.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let shell_env = |cmd: &mut Command| {
        cmd.current_dir(&checkout)
            .env("HOME", &home)
            .env("PATH", &path)
            .env_remove("XDG_STATE_HOME")
            .env_remove("AIGW_DATA_DIR")
            .env_remove("AIGW_SEAL_KEY")
            .env_remove("AIGW_ADMIN_TOKEN")
            .env_remove("AIGW_CONTROLPLANE_URL");
    };

    // The first terminal: `target/release/controlplane up`, as the README's Try it runs it.
    let mut up = Command::new(release.join("controlplane"));
    up.arg("up")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(root.join("up.log")).unwrap());
    shell_env(&mut up);
    let mut up = up.spawn().unwrap();
    let mut banner = std::io::BufReader::new(up.stdout.take().unwrap());
    loop {
        let mut line = String::new();
        assert!(
            banner.read_line(&mut line).unwrap() > 0,
            "up exited: {}",
            std::fs::read_to_string(root.join("up.log")).unwrap_or_default()
        );
        if line.contains("Ctrl-C stops everything") {
            break;
        }
    }

    // The second terminal: the README's block, in a shell that stops at the first failure.
    let mut walk = Command::new("bash");
    walk.args(["-e", "-o", "pipefail", "-c", &walk_block()]);
    shell_env(&mut walk);
    let out = walk.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let _ = Command::new("kill")
        .args(["-INT", &up.id().to_string()])
        .status();
    let stopped = wait_until(Duration::from_secs(15), || {
        matches!(up.try_wait(), Ok(Some(_)))
    });
    if !stopped {
        let _ = up.kill();
    }
    assert!(
        out.status.success(),
        "the walk failed\nstdout:\n{stdout}\nstderr:\n{stderr}\nnode 2:\n{}",
        std::fs::read_to_string(checkout.join("node2/log")).unwrap_or_default()
    );
    for expected in [
        "(demo) You said: Hello!",
        "You said: Hi, node two",
        "edge-2",
        "revoked\n",
        "revoked key: 401",
    ] {
        assert!(stdout.contains(expected), "{expected:?} missing:\n{stdout}");
    }
    assert!(stopped, "up did not stop on Ctrl-C");
}
