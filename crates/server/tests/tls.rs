//! HTTPS with rustls: a server given a certificate and key answers over TLS only, a failed
//! handshake does not stop it, and bad certificate files are clear errors at start.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code reports by panicking

use std::sync::Arc;

use factline_core::InMemoryStore;
use factline_server::{ServeError, Server, ServerOptions, TlsConfig, TlsConfigError};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_rustls::rustls::{self, pki_types::ServerName};

struct Files {
    _dir: tempfile::TempDir,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    cert_der: rustls::pki_types::CertificateDer<'static>,
}

fn self_signed() -> Files {
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key_pair.serialize_pem()).unwrap();
    Files {
        _dir: dir,
        cert: cert_path,
        key: key_path,
        cert_der: cert.der().clone(),
    }
}

async fn https_get(addr: std::net::SocketAddr, files: &Files, path: &str) -> String {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(files.cert_der.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut response = String::new();
    tls.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_the_api_and_survives_bad_handshakes() {
    let files = self_signed();
    let options = ServerOptions::default()
        .listen("127.0.0.1:0".parse().unwrap())
        .tls(TlsConfig::new(&files.cert, &files.key));
    let server = Server::bind(Arc::new(InMemoryStore::new()), options)
        .await
        .unwrap();
    let addr = server.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));

    let response = https_get(addr, &files, "/health").await;
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(response.contains(r#"{"status":"ok"}"#), "{response}");

    // Plain HTTP on the TLS port gets no HTTP answer, and a client that connects and never
    // speaks does not hold the server up.
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer).await;
    assert!(!String::from_utf8_lossy(&answer).contains("200 OK"));
    let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();

    let response = https_get(addr, &files, "/info").await;
    assert!(response.contains(r#""server":"factline""#), "{response}");

    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn bad_certificate_files_are_clear_errors_at_start() {
    let files = self_signed();
    let bind = |tls: TlsConfig| {
        Server::bind(
            Arc::new(InMemoryStore::new()),
            ServerOptions::default()
                .listen("127.0.0.1:0".parse().unwrap())
                .tls(tls),
        )
    };
    let missing = bind(TlsConfig::new("/nonexistent/cert.pem", &files.key)).await;
    assert!(
        matches!(
            missing,
            Err(ServeError::Tls(TlsConfigError::Pem {
                what: "certificate",
                ..
            }))
        ),
        "{missing:?}"
    );
    // The key file given as the certificate: no CERTIFICATE block in it.
    let swapped = bind(TlsConfig::new(&files.key, &files.key)).await;
    let message = swapped.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.contains("certificate") && message.contains("key.pem"),
        "{message}"
    );
    // A key that is not the certificate's.
    let other = self_signed();
    let mismatched = bind(TlsConfig::new(&files.cert, &other.key)).await;
    assert!(
        matches!(
            mismatched,
            Err(ServeError::Tls(TlsConfigError::Rustls { .. }))
        ),
        "{mismatched:?}"
    );
}
