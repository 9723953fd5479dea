//! Customer-managed keys against a local AWS KMS (moto's server, started here): an
//! enterprise tenant names its own key, its provider credentials are sealed under data keys
//! that key generates, so are its logged bodies, and disabling the key makes them unreadable
//! (crypto-shredding) and stops new writes with KMS's error — while other tenants carry on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use e2e::cp::*;
use e2e::mock::{MockOptions, MockProvider};
use e2e::*;
use serde_json::json;

struct Moto(Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn moto() -> (Moto, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bin = sdk_python().with_file_name("moto_server");
    let child = Command::new(&bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e} (bash .ci/setup installs moto)", bin.display()));
    let up = wait_until(Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(up, "moto's server did not start");
    (Moto(child), format!("http://127.0.0.1:{port}"))
}

/// moto's KMS, the control plane's AWS credentials as it would have them where it runs,
/// and a key created there: (moto, its endpoint, the key's id).
fn kms_with_a_key() -> (Moto, String, String) {
    std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    let (moto, endpoint) = moto();
    let key_id = kms_admin(&endpoint, &["create"]);
    (moto, endpoint, key_id)
}

fn kms_admin(endpoint: &str, args: &[&str]) -> String {
    let mut all = vec![endpoint];
    all.extend_from_slice(args);
    run_sdk_script("kms_key.py", &all)
        .trim()
        .trim_start_matches("ok")
        .trim()
        .to_string()
}

/// The tenant's production environment: upstream `oa` at `provider` with `credential`, and
/// every model routed to it.
fn route_to(cp: &controlplane::Running, tenant: &str, provider: &MockProvider, credential: &str) {
    let base = format!("/v1/tenants/{tenant}/environments/production");
    put(
        cp,
        &format!("{base}/upstreams/oa"),
        json!({"provider": "openai", "base_url": provider.base_url(), "credential": credential}),
    );
    put(
        cp,
        &format!("{base}/routes/all"),
        json!({"prefix": "", "targets": [{"upstream": "oa"}]}),
    );
}

#[test]
fn a_tenants_own_kms_key_seals_its_credentials_and_disabling_it_shreds_them() {
    let (_moto, endpoint, key_id) = kms_with_a_key();
    let dir = scratch_dir("kms");
    let cp = cp_start(dir.clone(), "127.0.0.1:0");
    let bank_provider = MockProvider::start(MockOptions::default());
    let shop_provider = MockProvider::start(MockOptions::default());
    tenant(&cp, "bank", "enterprise");
    tenant(&cp, "shop", "pro");
    let cmk = json!({"key_id": key_id, "region": "us-east-1", "endpoint": endpoint});

    // Enterprise only, and a key KMS does not know is refused with KMS's words.
    let r = api(&cp, "PUT", "/v1/tenants/shop/kms", Some(cmk.clone()));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("enterprise"), "{}", r.text());
    let r = api(
        &cp,
        "PUT",
        "/v1/tenants/bank/kms",
        Some(json!({"key_id": "no-such-key", "region": "us-east-1", "endpoint": endpoint})),
    );
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "kms_unavailable");
    let r = api(&cp, "PUT", "/v1/tenants/bank/kms", Some(cmk.clone()));
    assert_eq!(r.status, 200, "{}", r.text());

    route_to(&cp, "bank", &bank_provider, "sk-bank-cmk-marker-4411");
    route_to(&cp, "shop", &shop_provider, "sk-shop-marker-9902");
    let bank_key = key(&cp, "bank", "production");
    let shop_key = key(&cp, "shop", "production");
    let gw = gateway(dataplane::config::DriverChoice::IoUring, &cp);
    wait_workers(&gw, revision(&cp));
    let first = chat_with_key(gw.addr(), Some(&bank_key), "gpt-4o");
    assert_eq!(first.status, 200);
    assert_eq!(
        bank_provider.requests()[0].header("authorization"),
        Some("Bearer sk-bank-cmk-marker-4411")
    );
    // The request's bodies are logged, sealed under a data key of the bank's own KMS key.
    let logged = format!(
        "/v1/tenants/bank/bodies/{}",
        first.header("x-request-id").unwrap()
    );
    assert!(
        wait_until(Duration::from_secs(15), || api(&cp, "GET", &logged, None)
            .status
            == 200),
        "the bank's request was never logged"
    );
    let db = std::fs::read(dir.join("controlplane.db")).unwrap();
    assert!(
        !db.windows(23).any(|w| w == b"sk-bank-cmk-marker-4411"),
        "the credential is in clear in the store"
    );
    drop(gw);

    // The tenant disables its key: once the unwrapped key is gone from memory (a minute at
    // most), its credential no longer opens and a new one cannot be sealed.
    kms_admin(&endpoint, &["disable", &key_id]);
    cp.store().forget_unwrapped_keys();
    let r = api(
        &cp,
        "PUT",
        "/v1/tenants/bank/environments/production/upstreams/oa2",
        Some(
            json!({"provider": "openai", "base_url": bank_provider.base_url(), "credential": "sk-new"}),
        ),
    );
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("Disabled"), "KMS's reason: {}", r.text());
    // Its logged bodies are unreadable too.
    let r = api(&cp, "GET", &logged, None);
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "kms_unavailable");
    // A node starting now gets everything but the bank's upstream; the shop is not affected.
    let gw = gateway(dataplane::config::DriverChoice::IoUring, &cp);
    wait_workers(&gw, revision(&cp));
    let r = chat_with_key(gw.addr(), Some(&bank_key), "gpt-4o");
    assert_ne!(r.status, 200, "{}", r.text());
    assert_eq!(
        bank_provider.request_count(),
        1,
        "nothing more reached the bank's provider"
    );
    assert_eq!(
        chat_with_key(gw.addr(), Some(&shop_key), "gpt-4o").status,
        200
    );
    drop(gw);

    // Enabled again, the same stored credential opens: nothing was lost, only locked.
    kms_admin(&endpoint, &["enable", &key_id]);
    let r = api(&cp, "GET", &logged, None);
    assert_eq!(r.status, 200, "logged bodies open again: {}", r.text());
    let gw = gateway(dataplane::config::DriverChoice::IoUring, &cp);
    wait_workers(&gw, revision(&cp));
    assert_eq!(
        chat_with_key(gw.addr(), Some(&bank_key), "gpt-4o").status,
        200
    );
}

/// A TCP relay to moto that can be told to stop answering: it then reads and drops what
/// it is sent, relaying nothing (a KMS endpoint that has gone silent).
struct Relay {
    url: String,
    silent: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Requests that reached the relay while it was silent.
    swallowed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Relay {
    fn start(to: &str) -> Relay {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering::SeqCst;
        let to = to.trim_start_matches("http://").to_string();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let silent = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let swallowed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (s, w) = (silent.clone(), swallowed.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { return };
                let Ok(mut upstream) = std::net::TcpStream::connect(&to) else {
                    return;
                };
                let (mut c2, mut u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                let (s1, w1) = (s.clone(), w.clone());
                // Client to moto: dropped while silent.
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n) = client.read(&mut buf) {
                        if n == 0 {
                            return;
                        }
                        if s1.load(SeqCst) {
                            w1.fetch_add(1, SeqCst);
                        } else if upstream.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
                let s2 = s.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n) = u2.read(&mut buf) {
                        if n == 0 || (!s2.load(SeqCst) && c2.write_all(&buf[..n]).is_err()) {
                            return;
                        }
                    }
                });
            }
        });
        Relay {
            url,
            silent,
            swallowed,
        }
    }
}

/// One tenant's KMS going silent holds up that tenant's credentials only: the store opens
/// credentials after its transaction, with its connection free, so while building what
/// nodes hold waits on that KMS (up to its 10 s timeout), another tenant's writes go
/// through at once — and the silent tenant's upstream is left out, the other's is not.
#[test]
fn a_kms_that_goes_silent_holds_up_no_other_tenant() {
    use std::sync::atomic::Ordering::SeqCst;
    let (_moto, endpoint, key_id) = kms_with_a_key();
    let relay = Relay::start(&endpoint);
    let cp = cp_start(scratch_dir("kms-silent"), "127.0.0.1:0");
    tenant(&cp, "bank", "enterprise");
    tenant(&cp, "shop", "pro");
    let cmk = json!({"key_id": key_id, "region": "us-east-1", "endpoint": relay.url});
    let r = api(&cp, "PUT", "/v1/tenants/bank/kms", Some(cmk));
    assert_eq!(r.status, 200, "{}", r.text());
    put(
        &cp,
        "/v1/tenants/bank/environments/production/upstreams/oa",
        json!({"provider": "openai", "base_url": "http://127.0.0.1:9", "credential": "sk-bank"}),
    );

    relay.silent.store(true, SeqCst);
    cp.store().forget_unwrapped_keys();
    std::thread::scope(|s| {
        let snapshot = s.spawn(|| {
            let started = std::time::Instant::now();
            (cp.store().snapshot(), started.elapsed())
        });
        assert!(
            wait_until(Duration::from_secs(10), || relay.swallowed.load(SeqCst) > 0),
            "the snapshot never asked the bank's KMS"
        );
        let started = std::time::Instant::now();
        put(
            &cp,
            "/v1/tenants/shop/environments/production/upstreams/oa",
            json!({"provider": "openai", "base_url": "http://127.0.0.1:9", "credential": "sk-shop"}),
        );
        let write_took = started.elapsed();
        let (snapshot, snapshot_took) = snapshot.join().unwrap();
        assert!(
            snapshot_took >= Duration::from_secs(5),
            "the snapshot did not wait on the silent KMS ({snapshot_took:?}): the test shows nothing"
        );
        assert!(
            write_took < Duration::from_secs(3),
            "another tenant's write waited {write_took:?} on the bank's KMS"
        );
        let (records, _, _) = snapshot.unwrap();
        let upstreams: Vec<&str> = records
            .iter()
            .filter_map(|r| match r {
                aigw_wire::Record::Upstream(u) => Some(u.tenant_id.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(
            upstreams,
            Vec::<&str>::new(),
            "read before the shop's write; the bank's is left out"
        );
    });
    // The bank's KMS answers again: once the control plane's KMS watch has heard from it
    // (every 5 s while it is silent), both upstreams, credentials opened.
    relay.silent.store(false, SeqCst);
    let opened = || -> Vec<(String, Option<String>)> {
        let (records, _, _) = cp.store().snapshot().unwrap_or_else(|e| panic!("{e}"));
        let mut opened: Vec<(String, Option<String>)> = records
            .iter()
            .filter_map(|r| match r {
                aigw_wire::Record::Upstream(u) => Some((u.tenant_id.clone(), u.credential.clone())),
                _ => None,
            })
            .collect();
        opened.sort();
        opened
    };
    let both = vec![
        ("bank".to_string(), Some("sk-bank".to_string())),
        ("shop".to_string(), Some("sk-shop".to_string())),
    ];
    assert!(
        wait_until(Duration::from_secs(30), || opened() == both),
        "{:?}",
        opened()
    );
}

/// A control plane checking tenants' KMS keys every second.
fn cp_watching_kms(name: &str) -> controlplane::Running {
    controlplane::start(controlplane::Options {
        data_dir: scratch_dir(name),
        api_listen: "127.0.0.1:0".parse().unwrap(),
        push_listen: "127.0.0.1:0".parse().unwrap(),
        kms_check_every: Duration::from_secs(1),
        ..Default::default()
    })
    .unwrap()
}

/// Nodes already connected follow the tenant's key: they drop its upstreams when the key
/// is disabled and get them back when it is enabled again. A KMS that stops answering
/// changes nothing they hold, and once the control plane has found it silent nothing waits
/// on it: a node starting then gets its snapshot at once (the silent tenant's upstream left
/// out), and gets that upstream when the KMS answers again.
#[test]
fn connected_nodes_follow_the_tenants_kms_key_and_a_silent_one_holds_nothing_up() {
    use std::sync::atomic::Ordering::SeqCst;
    let (_moto, endpoint, key_id) = kms_with_a_key();
    let relay = Relay::start(&endpoint);
    let cp = cp_watching_kms("kms-watch");
    let bank_provider = MockProvider::start(MockOptions::default());
    let shop_provider = MockProvider::start(MockOptions::default());
    tenant(&cp, "bank", "enterprise");
    tenant(&cp, "shop", "pro");
    let cmk = json!({"key_id": key_id, "region": "us-east-1", "endpoint": relay.url});
    let r = api(&cp, "PUT", "/v1/tenants/bank/kms", Some(cmk));
    assert_eq!(r.status, 200, "{}", r.text());
    route_to(&cp, "bank", &bank_provider, "sk-bank");
    route_to(&cp, "shop", &shop_provider, "sk-shop");
    let bank_key = key(&cp, "bank", "production");
    let shop_key = key(&cp, "shop", "production");
    let gw = gateway(dataplane::config::DriverChoice::IoUring, &cp);
    wait_workers(&gw, revision(&cp));
    let status = |gw: &Gateway, key: &str| chat_with_key(gw.addr(), Some(key), "gpt-4o").status;
    assert_eq!(status(&gw, &bank_key), 200);
    assert_eq!(status(&gw, &shop_key), 200);

    // Disabled: the connected node drops the bank's upstream (the data key the control
    // plane unwrapped is forgotten as soon as its watch hears of it); the shop carries on.
    kms_admin(&endpoint, &["disable", &key_id]);
    assert!(
        wait_until(Duration::from_secs(20), || status(&gw, &bank_key) != 200),
        "the connected node still uses a credential the tenant's disabled key sealed"
    );
    let served = bank_provider.request_count();
    assert_ne!(status(&gw, &bank_key), 200);
    assert_eq!(
        bank_provider.request_count(),
        served,
        "nothing more reached the bank's provider"
    );
    assert_eq!(status(&gw, &shop_key), 200);

    // Enabled again: it gets the upstream back.
    kms_admin(&endpoint, &["enable", &key_id]);
    assert!(
        wait_until(Duration::from_secs(20), || status(&gw, &bank_key) == 200),
        "the connected node never got the bank's upstream back"
    );

    // Silent: once the control plane's watch has found it so, opening what it sealed fails
    // at once instead of waiting 10 s.
    relay.silent.store(true, SeqCst);
    cp.store().forget_unwrapped_keys();
    let quick_refusal = || {
        let started = std::time::Instant::now();
        let r = api(
            &cp,
            "PUT",
            "/v1/tenants/bank/environments/production/upstreams/oa2",
            Some(
                json!({"provider": "openai", "base_url": bank_provider.base_url(), "credential": "sk-new"}),
            ),
        );
        r.status == 502 && started.elapsed() < Duration::from_secs(2)
    };
    assert!(
        wait_until(Duration::from_secs(40), quick_refusal),
        "the control plane kept waiting on a silent KMS"
    );
    // What connected nodes hold does not change for a silence.
    assert_eq!(status(&gw, &bank_key), 200);
    let started = std::time::Instant::now();
    let gw2 = gateway(dataplane::config::DriverChoice::IoUring, &cp);
    wait_workers(&gw2, revision(&cp));
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "a node's first snapshot waited {took:?} on the silent KMS"
    );
    assert_eq!(status(&gw2, &shop_key), 200);
    assert_ne!(
        status(&gw2, &bank_key),
        200,
        "the bank's credential cannot have opened"
    );

    // The KMS answers again: the new node gets the bank's upstream.
    relay.silent.store(false, SeqCst);
    assert!(
        wait_until(Duration::from_secs(30), || status(&gw2, &bank_key) == 200),
        "the node never got the bank's upstream once its KMS answered"
    );
}
