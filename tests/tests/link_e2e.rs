//! The node link as an attacker or a misconfigured node meets it, over real TLS: before a
//! node is authenticated the control plane reads one small Hello or Enroll and nothing
//! else; only the certificate of an enrolled node opens a session; a node whose enrolment
//! fails is told why.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use aigw_wire::{decode_frame, encode_frame, Frame, Message, DEFAULT_MAX_FRAME, PROTOCOL_VERSION};
use e2e::cp::{cp_start, link_client, link_client_as};
use e2e::*;

/// Reads until the control plane closes the link; returns what it sent and how long it
/// took.
fn until_closed(s: &mut impl Read) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return (got, start.elapsed()),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

#[test]
fn before_authentication_only_a_small_hello_is_read() {
    let cp = cp_start(scratch_dir("link-preauth"), "127.0.0.1:0");
    // A frame announcing 16 MiB of snapshot: the link closes on its header. Were the frame
    // read and decoded, the control plane would wait for the rest until its handshake
    // deadline (10 s) instead.
    let mut s = link_client(&cp);
    let mut header = ((16u32 << 20) - 8).to_be_bytes().to_vec();
    header.extend_from_slice(&aigw_wire::messages::types::SNAPSHOT.to_be_bytes());
    header.extend(std::iter::repeat_n(0u8, 64 * 1024));
    // The control plane may close before all of it is written.
    let _ = s.write_all(&header).and_then(|()| s.flush());
    let (_, took) = until_closed(&mut s);
    assert!(took < Duration::from_secs(5), "closed after {took:?}");
    // The same with a Hello announcing 16 MiB.
    let mut s = link_client(&cp);
    let mut header = ((16u32 << 20) - 8).to_be_bytes().to_vec();
    header.extend_from_slice(&aigw_wire::messages::types::HELLO.to_be_bytes());
    header.extend(std::iter::repeat_n(0u8, 64 * 1024));
    // The control plane may close before all of it is written.
    let _ = s.write_all(&header).and_then(|()| s.flush());
    let (_, took) = until_closed(&mut s);
    assert!(took < Duration::from_secs(5), "closed after {took:?}");

    // A Hello without a certificate: told to enrol, then closed.
    let mut s = link_client(&cp);
    send(&mut s, &hello("intruder"));
    let (got, _) = until_closed(&mut s);
    match decode_frame(&got, DEFAULT_MAX_FRAME).unwrap() {
        Some((Frame::Message(Message::Refused { reason }), _)) => {
            assert!(reason.contains("no certificate"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // An Enroll with a made-up token: told so.
    let mut s = link_client(&cp);
    send(
        &mut s,
        &Message::Enroll {
            token: "aigw_enroll_made-up-0123456789abcdefghijklmnop".into(),
            public_key: vec![4; 65],
        },
    );
    let (got, _) = until_closed(&mut s);
    match decode_frame(&got, DEFAULT_MAX_FRAME).unwrap() {
        Some((Frame::Message(Message::Refused { reason }), _)) => {
            assert!(reason.contains("enrolment token is not valid"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // A certificate the link's CA did not sign: the TLS handshake fails.
    let stranger = e2e::cp::register(&cp);
    {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![stranger.node_id.clone()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::create_dir_all(&stranger.identity_dir).unwrap();
        dataplane::seal::files::write_private(
            &stranger.identity_dir.join("node.key"),
            key.serialize_pem().as_bytes(),
        )
        .unwrap();
        std::fs::write(stranger.identity_dir.join("node.pem"), cert.pem()).unwrap();
    }
    let mut s = link_client_as(&cp, Some(&stranger));
    send(&mut s, &hello("stranger"));
    let (got, _) = until_closed(&mut s);
    assert!(
        !matches!(
            decode_frame(&got, DEFAULT_MAX_FRAME),
            Ok(Some((Frame::Message(Message::Snapshot { .. }), _)))
        ),
        "a self-signed certificate is not served"
    );

    // An enrolled node is served, whatever name it gives.
    let node = e2e::cp::enrolled(&cp);
    let mut s = link_client_as(&cp, Some(&node));
    send(&mut s, &hello("any name"));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((Frame::Message(m), _)) = decode_frame(&buf, DEFAULT_MAX_FRAME).unwrap() {
            assert!(matches!(m, Message::Snapshot { .. }), "{m:?}");
            break;
        }
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn hello(node_id: &str) -> Message {
    Message::Hello {
        protocol_version: PROTOCOL_VERSION,
        node_id: node_id.into(),
        boot_epoch: 1,
        revision_held: 0,
        token: String::new(),
        revision_id: 0,
    }
}

fn send(s: &mut impl Write, m: &Message) {
    let mut out = Vec::new();
    encode_frame(m, &mut out);
    // The control plane may close first; what it answered is what counts.
    let _ = s.write_all(&out).and_then(|()| s.flush());
}

/// A node given a spent enrolment token says so, naming the fix; one given a fresh token
/// while it holds an identity enrols again, and its previous certificate is refused from
/// then on.
#[test]
fn a_node_is_told_why_its_enrolment_fails_and_can_enrol_again() {
    let cp = cp_start(scratch_dir("link-enrol"), "127.0.0.1:0");
    let spent = e2e::cp::enrolled(&cp);
    let dir = scratch_dir("link-enrol-node");
    let config = |identity: &std::path::Path, token_file: &std::path::Path| {
        process_toml(1, &format!(
            "[control_plane]\naddress = \"{}\"\nserver_name = \"localhost\"\nca_file = \"{}\"\nidentity_dir = \"{}\"\nenrollment_token_file = \"{}\"\n",
            cp.push_addr,
            cp.ca_file.display(),
            identity.display(),
            token_file.display()
        ))
    };
    // Another node (a fresh identity directory) with the token the first one spent.
    let gw = GatewayProcess::start(&config(&dir.join("identity"), &spent.token_file), &dir);
    assert!(
        wait_until(Duration::from_secs(10), || gw
            .log()
            .contains("enrolment token is not valid")),
        "{}",
        gw.log()
    );
    assert!(!dir.join("identity").join("node.pem").exists());
    drop(gw);

    // The enrolled node is given a new token: it enrols again at start; its old
    // certificate no longer opens the link.
    let old_cert = std::fs::read(spent.identity_dir.join("node.pem")).unwrap();
    let r = e2e::cp::api(
        &cp,
        "POST",
        &format!("/v1/nodes/{}/enrollment", spent.node_id),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let fresh = secret_file(
        "reenrol-token",
        r.json()["enrollment_token"].as_str().unwrap(),
    );
    let before = identity_copy(&spent);
    // This time through the variable, as an operator would start it.
    let gw = GatewayProcess::start_with_env(
        &config(&spent.identity_dir, &fresh).replace(
            &format!("enrollment_token_file = \"{}\"\n", fresh.display()),
            "",
        ),
        &dir,
        &[(
            "AIGW_ENROLLMENT_TOKEN",
            std::fs::read_to_string(&fresh).unwrap().as_str(),
        )],
    );
    assert!(
        wait_until(Duration::from_secs(10), || gw
            .log()
            .contains("enrolled with the control plane")
            && admin_get(gw.admin_addr, "/readyz").status == 200),
        "{}",
        gw.log()
    );
    assert_ne!(
        std::fs::read(spent.identity_dir.join("node.pem")).unwrap(),
        old_cert,
        "a new certificate"
    );
    let mut s = link_client_as(&cp, Some(&before));
    send(&mut s, &hello("old"));
    let (got, _) = until_closed(&mut s);
    match decode_frame(&got, DEFAULT_MAX_FRAME).unwrap() {
        Some((Frame::Message(Message::Refused { reason }), _)) => {
            assert!(reason.contains("revoked or replaced"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

/// A copy of a node's identity as it is now (its files in a directory of their own).
fn identity_copy(link: &e2e::cp::NodeLink) -> e2e::cp::NodeLink {
    let copy = link.identity_dir.with_extension("before");
    let _ = std::fs::remove_dir_all(&copy);
    std::fs::create_dir_all(&copy).unwrap();
    for f in ["node.key", "node.pem", "node.id"] {
        std::fs::copy(link.identity_dir.join(f), copy.join(f)).unwrap();
    }
    e2e::cp::NodeLink {
        identity_dir: copy,
        ..link.clone()
    }
}

/// A node whose control plane is gone backs off between attempts (doubling from 50 ms, up
/// to 10 s), yet stops at once when told to: the backoff waits on the shutdown signal.
#[test]
fn a_node_backing_off_from_its_control_plane_stops_at_once() {
    let cp = cp_start(scratch_dir("link-stop"), "127.0.0.1:0");
    // Where the node looks for its control plane, something that takes each attempt and
    // ends it at once, counting them.
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let link = e2e::cp::register(&cp).at(gone.local_addr().unwrap());
    cp.stop();
    let attempts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = attempts.clone();
    std::thread::spawn(move || {
        for conn in gone.incoming() {
            drop(conn);
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let gw = e2e::cp::gateway_with(dataplane::config::DriverChoice::Epoll, &link, |_| {});
    // After its eighth failed attempt the node waits 6.4 s before the next.
    assert!(
        wait_until(Duration::from_secs(60), || attempts
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 8),
        "the node stopped trying"
    );
    let started = Instant::now();
    gw.stop();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "stopped after {took:?}");
    assert_eq!(
        attempts.load(std::sync::atomic::Ordering::SeqCst),
        8,
        "the node was not waiting out its backoff"
    );
}
