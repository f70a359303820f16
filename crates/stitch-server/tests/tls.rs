//! The server speaking HTTPS itself (`--tls-cert`/`--tls-key`): a real certificate from a
//! private CA made by `openssl` (stitch-testkit), a real rustls client that trusts it, and the
//! failures an operator will meet.

use std::path::Path;
use std::time::Duration;

use stitch_server::Config;

fn client(ca: Option<&Path>) -> ureq::Agent {
    let mut b = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)));
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).expect("ca");
        let certs: Vec<_> = ureq::tls::parse_pem(&pem)
            .filter_map(|i| match i {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        b = b.tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
                .build(),
        );
    }
    b.build().new_agent()
}

fn config(dir: &Path, cert: &Path, key: &Path) -> Config {
    let mut c = Config::new(dir.join("data"));
    c.listen = "127.0.0.1:0".parse().expect("addr");
    c.tls = Some((dir.join(cert), dir.join(key)));
    c
}

/// GET over a blocking client, off the async runtime.
async fn get(agent: ureq::Agent, url: String) -> Result<(u16, String), ureq::Error> {
    tokio::task::spawn_blocking(move || {
        let mut r = agent.get(&url).call()?;
        let status = r.status().as_u16();
        Ok((status, r.body_mut().read_to_string().unwrap_or_default()))
    })
    .await
    .expect("join")
}

#[tokio::test]
async fn https_server_is_trusted_only_through_its_ca_and_survives_plain_http_on_its_port() {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = stitch_testkit::private_ca(dir.path(), "cert");
    let server = stitch_server::run(config(dir.path(), &pki.cert, &pki.key))
        .await
        .expect("starts with TLS");
    let url = server.url();
    assert!(url.starts_with("https://"), "{url}");
    let ca = pki.ca.clone();

    let (status, body) = get(client(Some(&ca)), format!("{url}/healthz"))
        .await
        .expect("TLS with the CA");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    // A client that does not trust the certificate must not get an answer.
    let e = get(client(None), format!("{url}/healthz"))
        .await
        .expect_err("an untrusted certificate is refused");
    assert!(
        e.to_string().to_lowercase().contains("certificate")
            || e.to_string().to_lowercase().contains("issuer"),
        "{e}"
    );
    // Plain HTTP to the TLS port fails its handshake and is dropped; the server serves on.
    let plain = url.replacen("https://", "http://", 1);
    let _ = get(client(None), format!("{plain}/healthz")).await;
    let (status, _) = get(client(Some(&ca)), format!("{url}/readyz"))
        .await
        .expect("still serving");
    assert_eq!(status, 200);
    server.shutdown().await;
}

#[tokio::test]
async fn unusable_certificate_or_key_stops_the_start_with_its_code() {
    let dir = tempfile::tempdir().expect("tmp");
    stitch_testkit::private_ca(dir.path(), "a");
    stitch_testkit::private_ca(dir.path(), "b");
    std::fs::write(dir.path().join("empty.pem"), "not a certificate\n").expect("write");
    for (cert, key, code) in [
        ("empty.pem", "a-key.pem", "tls.no_certificate"),
        ("a.pem", "empty.pem", "tls.bad_key"),
        ("a.pem", "b-key.pem", "tls.config"),
        ("missing.pem", "a-key.pem", "tls.read"),
    ] {
        match stitch_server::run(config(dir.path(), Path::new(cert), Path::new(key))).await {
            Err(stitch_server::StartError::Tls(e)) => {
                assert_eq!(e.code(), code, "{cert} {key}: {e}")
            }
            Err(e) => panic!("{cert} {key}: wrong error {e}"),
            Ok(s) => {
                s.shutdown().await;
                panic!("{cert} {key}: started with an unusable certificate");
            }
        }
    }
}
