//! Slow clients can't hold ingest: one trickling its headers is cut off after `http.header_read_timeout`, one stalling
//! or trickling its body gets 408 after `http.body_read_timeout` with nothing published, and others are served
//! meanwhile. Kept-alive connections still serve webhook after webhook, until idle for the header timeout. Neither
//! timeout may be zero.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use stripe_sync_ingest::settings::Settings;
use stripe_sync_ingest::startup::Application;
use stripe_sync_testkit::stripe;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::task::JoinHandle;

use crate::helpers::{event, read_until_closed, signed_request_head, spawn_app, spawn_app_with};

/// Between two bytes of a trickling client: well under every timeout these tests set.
const TRICKLE: Duration = Duration::from_millis(50);

/// Writes `bytes` one at a time, `TRICKLE` apart, then `filler` forever; stops once ingest hangs up.
fn trickle(mut writer: OwnedWriteHalf, bytes: &[u8], filler: u8) -> JoinHandle<()> {
    let bytes = bytes.to_vec();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(TRICKLE);
        for byte in bytes.into_iter().chain(std::iter::repeat(filler)) {
            ticks.tick().await;
            if writer.write_all(&[byte]).await.is_err() {
                return;
            }
        }
    })
}

/// Reads one response (status line, headers, `Content-Length` bytes of body) off a kept-alive connection.
async fn read_response(stream: &mut BufReader<TcpStream>) -> (String, String) {
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut status = String::new();
        stream.read_line(&mut status).await.unwrap();
        let mut length = 0;
        loop {
            let mut line = String::new();
            stream.read_line(&mut line).await.unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        stream.read_exact(&mut body).await.unwrap();
        (
            status.trim_end().to_owned(),
            String::from_utf8_lossy(&body).into_owned(),
        )
    })
    .await
    .expect("a response within 10 s")
}

#[tokio::test]
async fn a_client_trickling_its_headers_is_cut_off_after_the_header_timeout_while_others_are_served()
 {
    let timeout = Duration::from_secs(1);
    let app = spawn_app_with(&[("STRIPE_SYNC__HTTP__HEADER_READ_TIMEOUT", "1s")]).await;
    let opened = Instant::now();
    let (mut reader, writer) = TcpStream::connect(app.socket_address())
        .await
        .unwrap()
        .into_split();
    let writing = trickle(
        writer,
        b"POST /webhooks HTTP/1.1\r\nHost: ingest\r\nX-Padding: ",
        b'a',
    );
    let cut_off = tokio::spawn(async move {
        let answer = read_until_closed(&mut reader).await;
        (opened.elapsed(), answer)
    });

    // A webhook beside it, on a connection of its own.
    let body = event("evt_beside_a_slow_loris");
    let mut other = TcpStream::connect(app.socket_address()).await.unwrap();
    other
        .write_all(&[signed_request_head(&body, true).as_bytes(), &body].concat())
        .await
        .unwrap();
    let response = read_until_closed(&mut other).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let served = opened.elapsed();

    let (closed, answer) = cut_off.await.unwrap();
    writing.abort();
    assert!(
        closed >= timeout,
        "cut off after {closed:?}, before the header timeout: {answer}"
    );
    assert!(
        served < closed,
        "the webhook beside it was answered after {served:?}, only once the slow one was cut off at {closed:?}"
    );
}

#[tokio::test]
async fn a_body_that_stops_arriving_gets_408_and_nothing_is_published() {
    let app = spawn_app_with(&[("STRIPE_SYNC__HTTP__BODY_READ_TIMEOUT", "500ms")]).await;
    let body = event("evt_stalled_body");
    let mut stream = TcpStream::connect(app.socket_address()).await.unwrap();
    stream
        .write_all(signed_request_head(&body, false).as_bytes())
        .await
        .unwrap();
    stream.write_all(&body[..body.len() / 2]).await.unwrap();

    let answer = read_until_closed(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""error":"body_timeout""#), "{answer}");
    assert_eq!(app.stored().await, 0, "nothing is published");
}

#[tokio::test]
async fn a_body_trickling_in_gets_408_once_the_body_timeout_has_passed_in_all() {
    let app = spawn_app_with(&[("STRIPE_SYNC__HTTP__BODY_READ_TIMEOUT", "500ms")]).await;
    let body = event("evt_trickled_body");
    let (mut reader, mut writer) = TcpStream::connect(app.socket_address())
        .await
        .unwrap()
        .into_split();
    writer
        .write_all(signed_request_head(&body, false).as_bytes())
        .await
        .unwrap();
    // A byte every 50 ms: never a pause as long as the timeout, yet the body would take ~35 s in all.
    let writing = trickle(writer, &body, b' ');

    let answer = read_until_closed(&mut reader).await;
    writing.abort();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(app.stored().await, 0, "nothing is published");
}

#[tokio::test]
async fn one_kept_alive_connection_serves_webhook_after_webhook() {
    let app = spawn_app().await;
    let mut stream = BufReader::new(TcpStream::connect(app.socket_address()).await.unwrap());
    for id in ["evt_kept_alive_1", "evt_kept_alive_2"] {
        let body = event(id);
        let request = [signed_request_head(&body, false).as_bytes(), &body].concat();
        stream.get_mut().write_all(&request).await.unwrap();
        let (status, answer) = read_response(&mut stream).await;
        assert_eq!(status, "HTTP/1.1 200 OK", "{id}: {answer}");
    }
    assert_eq!(app.stored().await, 2);
}

#[tokio::test]
async fn a_kept_alive_connection_left_idle_is_closed_after_the_header_timeout() {
    let app = spawn_app_with(&[("STRIPE_SYNC__HTTP__HEADER_READ_TIMEOUT", "500ms")]).await;
    let mut stream = BufReader::new(TcpStream::connect(app.socket_address()).await.unwrap());
    let body = event("evt_then_idle");
    let request = [signed_request_head(&body, false).as_bytes(), &body].concat();
    stream.get_mut().write_all(&request).await.unwrap();
    let (status, answer) = read_response(&mut stream).await;
    assert_eq!(status, "HTTP/1.1 200 OK", "{answer}");

    let after = read_until_closed(&mut stream).await;
    assert_eq!(after, "", "closed without another word");
}

#[tokio::test]
async fn a_zero_timeout_is_refused_at_start() {
    for key in [
        "STRIPE_SYNC__HTTP__HEADER_READ_TIMEOUT",
        "STRIPE_SYNC__HTTP__BODY_READ_TIMEOUT",
    ] {
        let env: HashMap<String, String> = HashMap::from([
            ("STRIPE_WEBHOOK_SECRET".into(), stripe::SECRET.into()),
            ("PORT".into(), "0".into()),
            ("METRICS_PORT".into(), "0".into()),
            (key.into(), "0s".into()),
        ]);
        let settings = Settings::load_from(&env).unwrap();
        let err = Application::build(settings).await.unwrap_err();
        assert!(
            err.to_string().contains("must be above 0"),
            "{key}: {err:#}"
        );
    }
}
