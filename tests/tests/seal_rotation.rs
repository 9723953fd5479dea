//! Replacing the seal key (the key-encryption key): `controlplane seal-key-rotate` and
//! `dataplane --rotate-seal-key` rewrite only the keyring beside the sealed data, while the
//! control plane runs; afterwards the new key opens everything sealed before and the old one
//! opens nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use e2e::cp::*;
use e2e::mock::{MockOptions, MockProvider};
use e2e::*;
use serde_json::json;

fn sha(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn the_control_planes_seal_key_is_replaced_by_rewriting_its_keyring_only() {
    let dir = scratch_dir("seal-rotation-cp");
    let openai = MockProvider::start(MockOptions::default());
    let cp = cp_start(dir.clone(), "127.0.0.1:0");
    tenant(&cp, "acme", "pro");
    put(
        &cp,
        "/v1/tenants/acme/environments/production/upstreams/oa",
        json!({"provider": "openai", "base_url": openai.base_url(), "credential": "sk-sealed-marker-7731"}),
    );
    let old_key = std::fs::read_to_string(dir.join("seal.key")).unwrap();
    let ring = dir.join("keyring");
    assert!(ring.exists(), "a keyring beside the store");
    let db_before = sha(&dir.join("controlplane.db"));

    // While it runs.
    let new_key = secret_file("seal-rotation-new-key", &"7c".repeat(32));
    let out = Command::new(bin_path("controlplane"))
        .args(["seal-key-rotate", "--data-dir"])
        .arg(&dir)
        .arg("--new-key-file")
        .arg(&new_key)
        .env_remove("AIGW_SEAL_KEY")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("replaced"));
    assert_eq!(
        std::fs::read_to_string(dir.join("seal.key"))
            .unwrap()
            .trim(),
        "7c".repeat(32)
    );
    assert_eq!(
        sha(&dir.join("controlplane.db")),
        db_before,
        "nothing but the keyring is rewritten"
    );
    // The running control plane still seals and opens with the data key it holds.
    let r = api(
        &cp,
        "GET",
        "/v1/tenants/acme/environments/production/upstreams/oa",
        None,
    );
    assert_eq!(r.json()["has_credential"], true, "{}", r.text());
    cp.stop();

    // Restarted with the new key: the credential sealed before opens and reaches the provider.
    let cp = cp_start(dir.clone(), "127.0.0.1:0");
    put(
        &cp,
        "/v1/tenants/acme/environments/production/routes/all",
        json!({"prefix": "", "targets": [{"upstream": "oa"}]}),
    );
    let k = key(&cp, "acme", "production");
    let gw = gateway(dataplane::config::DriverChoice::IoUring, &cp);
    wait_workers(&gw, revision(&cp));
    assert_eq!(chat_with_key(gw.addr(), Some(&k), "gpt-4o").status, 200);
    assert_eq!(
        openai.requests()[0].header("authorization"),
        Some("Bearer sk-sealed-marker-7731")
    );
    drop(gw);
    cp.stop();
    // Neither the provider credential nor the API key is in any file in clear.
    let mut files = Vec::new();
    let mut dirs = vec![dir.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                files.push(p);
            }
        }
    }
    assert!(files.len() > 3, "{files:?}");
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        for marker in ["sk-sealed-marker-7731", k.as_str()] {
            assert!(
                !bytes.windows(marker.len()).any(|w| w == marker.as_bytes()),
                "{marker} in clear in {}",
                f.display()
            );
        }
    }

    // The old key opens nothing any more.
    std::fs::write(dir.join("seal.key"), old_key).unwrap();
    let started = controlplane::start(controlplane::Options {
        data_dir: dir.clone(),
        api_listen: "127.0.0.1:0".parse().unwrap(),
        push_listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    });
    let Err(e) = started else {
        panic!("the old key was taken")
    };
    assert!(format!("{e:#}").contains("does not open"), "{e:#}");
}
