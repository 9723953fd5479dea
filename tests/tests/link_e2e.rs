//! The node link as an attacker or a misconfigured node meets it, over real TLS: before a
//! node is authenticated the control plane reads one small Hello and nothing else, and a
//! node with a wrong token is told so.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use aigw_wire::{decode_frame, encode_frame, Frame, Message, DEFAULT_MAX_FRAME, PROTOCOL_VERSION};
use e2e::cp::{cp_start, link_client};
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

    // A Hello with a wrong token: told why, then closed.
    let mut s = link_client(&cp);
    let mut out = Vec::new();
    encode_frame(
        &Message::Hello {
            protocol_version: PROTOCOL_VERSION,
            node_id: "intruder".into(),
            boot_epoch: 1,
            revision_held: 0,
            token: "aigw_node_not-the-right-one-0123456789abcdefghij".into(),
            revision_id: 0,
        },
        &mut out,
    );
    s.write_all(&out).unwrap();
    s.flush().unwrap();
    let (got, _) = until_closed(&mut s);
    match decode_frame(&got, DEFAULT_MAX_FRAME).unwrap() {
        Some((Frame::Message(Message::Refused { reason }), _)) => {
            assert_eq!(reason, "wrong node token")
        }
        other => panic!("{other:?}"),
    }

    // The real node still gets served.
    let mut s = link_client(&cp);
    let mut out = Vec::new();
    encode_frame(
        &Message::Hello {
            protocol_version: PROTOCOL_VERSION,
            node_id: "node".into(),
            boot_epoch: 1,
            revision_held: 0,
            token: cp.node_token.clone(),
            revision_id: 0,
        },
        &mut out,
    );
    s.write_all(&out).unwrap();
    s.flush().unwrap();
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

#[test]
fn a_node_with_a_wrong_token_says_so() {
    let cp = cp_start(scratch_dir("link-wrong-token"), "127.0.0.1:0");
    let dir = scratch_dir("link-wrong-token-node");
    std::env::set_var(
        "AIGW_E2E_WRONG_NODE_TOKEN",
        "aigw_node_wrong-token-0123456789abcdefghijkl",
    );
    let gw = GatewayProcess::start(
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nworkers = 1\npin_workers = false\n[admin]\nlisten = \"127.0.0.1:0\"\n[control_plane]\naddress = \"{}\"\nserver_name = \"localhost\"\nca_file = \"{}\"\ntoken_env = \"AIGW_E2E_WRONG_NODE_TOKEN\"\n",
            cp.push_addr,
            cp.ca_file.display()
        ),
        &dir,
    );
    assert!(
        wait_until(Duration::from_secs(10), || gw
            .log()
            .contains("refused this node: wrong node token")),
        "{}",
        gw.log()
    );
}
