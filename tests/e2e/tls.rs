//! The hub's own TLS, with a CA and certificates made in the test (rcgen): a cocoon over
//! wss and the proxy over https with `--ca-cert`; a hub certificate from a CA the
//! client was not given refused, saying which name and which CAs; a certificate
//! renewed on disk served to new connections while the connected device stays up.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use serde_json::{json, Value};

use crate::harness::{cli, wait_for, Cocoon, Hub};

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Result<Ca> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(Ca { cert, key })
}

/// A certificate for 127.0.0.1 and localhost issued by `ca`, written as `cert.pem` and
/// `key.pem` in `dir` (replacing what is there, each file whole); returns its DER.
fn issue(ca: &Ca, dir: &Path, cn: &str) -> Result<Vec<u8>> {
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
    params.distinguished_name.push(DnType::CommonName, cn);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca.cert, &ca.key)?;
    for (name, pem) in [("key.pem", key.serialize_pem()), ("cert.pem", cert.pem())] {
        let tmp = dir.join(format!("{name}.new"));
        std::fs::write(&tmp, pem)?;
        std::fs::rename(&tmp, dir.join(name))?;
    }
    Ok(cert.der().to_vec())
}

fn client(ca: &Path) -> Result<reqwest::Client> {
    let pem = std::fs::read(ca)?;
    Ok(reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem)?)
        .tls_info(true)
        // Every request on a new connection, so each sees the certificate served now.
        .pool_max_idle_per_host(0)
        .build()?)
}

/// The DER of the certificate the hub presents to a new client (which resumes no
/// earlier TLS session, so the hub sends the certificate it serves now).
async fn served(ca: &Path, hub: &str) -> Result<Vec<u8>> {
    let resp = client(ca)?.get(format!("{hub}/healthz")).send().await?;
    let info = resp
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .map(<[u8]>::to_vec);
    info.ok_or_else(|| anyhow::anyhow!("no peer certificate"))
}

async fn hello() -> Result<u16> {
    let app = axum::Router::new().fallback(|| async { "hello over tls" });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(port)
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[tokio::test]
async fn cocoons_and_clients_reach_a_tls_hub_and_a_renewed_certificate_needs_no_restart(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (trusted, stranger) = (ca("adi test CA")?, ca("some other CA")?);
    let ca_file: PathBuf = dir.path().join("ca.pem");
    std::fs::write(&ca_file, trusted.cert.pem())?;
    let other_ca: PathBuf = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, stranger.cert.pem())?;
    let first = issue(&trusted, dir.path(), "hub one")?;
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let hub = Hub::start_with(&["--tls-cert", &path(&cert), "--tls-key", &path(&key)]).await?;
    assert!(hub.url.starts_with("https://127.0.0.1:"), "{}", hub.url);
    let http = client(&ca_file)?;
    assert_eq!(served(&ca_file, &hub.url).await?, first);

    // Sign in and make a setup token over https.
    let key_alice = hub.add_user("alice")?;
    let signed: Value = http
        .post(format!("{}/api/auth/token", hub.url))
        .json(&json!({ "api_key": key_alice }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let jwt = signed["token"].as_str().unwrap_or_default().to_owned();
    let token = |http: reqwest::Client, jwt: String, hub: String| async move {
        let made: Value = http
            .post(format!("{hub}/api/tokens"))
            .bearer_auth(&jwt)
            .json(&json!({"kind": "setup"}))
            .send()
            .await?
            .json()
            .await?;
        anyhow::Ok(made["token"].as_str().unwrap_or_default().to_owned())
    };

    // A cocoon that trusts the CA connects over wss; its service answers over https.
    let port = hello().await?;
    let web = format!("web:{port}");
    let device = Cocoon::start(
        &hub.url,
        "tls-box",
        Some(&token(http.clone(), jwt.clone(), hub.url.clone()).await?),
        &["--service", &web, "--ca-cert", &path(&ca_file)],
    )?;
    let id = device.device_id().await?;
    let proxied = |http: reqwest::Client| {
        let url = format!("{}/proxy/{id}/web/", hub.url);
        let jwt = jwt.clone();
        async move {
            let resp = http.get(url).bearer_auth(jwt).send().await?;
            anyhow::Ok((resp.status().as_u16(), resp.text().await?))
        }
    };
    assert_eq!(
        proxied(http.clone()).await?,
        (200, "hello over tls".to_owned())
    );

    // The web UI and the install one-liner are served over https, and the script
    // enrols devices at the https address.
    let page = http
        .get(format!("{}/", hub.url))
        .send()
        .await?
        .text()
        .await?;
    assert!(page.contains("<script>"), "the web UI");
    let script = http
        .get(format!("{}/install.sh", hub.url))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        script.contains(&format!("HUB=\"{}\"", hub.url)) && script.contains("ADI_CA_CERT"),
        "{script}"
    );

    // One that does not trust it is refused, saying which name and which CAs, and
    // retries rather than give up; so is the CLI, with the CA it was given named.
    let untrusting = Cocoon::start(
        &hub.url,
        "no-ca",
        Some(&token(http.clone(), jwt.clone(), hub.url.clone()).await?),
        &[],
    )?;
    let said = untrusting
        .proc
        .wait_line("the certificate the hub presented", Duration::from_secs(20))
        .await?;
    assert!(
        said.contains("for 127.0.0.1 was not issued by a CA this side trusts")
            && said.contains("public roots only"),
        "{said}"
    );
    let cfg = tempfile::tempdir()?;
    let login = |ca: Option<&Path>| {
        let mut args = vec!["login", "--hub", &hub.url, "--api-key", &key_alice];
        let ca = ca.map(path);
        if let Some(ca) = &ca {
            args.extend(["--ca-cert", ca.as_str()]);
        }
        cli(cfg.path(), &args, &[])
    };
    let (code, _, err) = login(None)?;
    assert_ne!(code, 0);
    assert!(
        err.contains("for 127.0.0.1 was not issued by a CA"),
        "{err}"
    );
    let (code, _, err) = login(Some(&other_ca))?;
    assert_ne!(code, 0);
    assert!(
        err.contains("other-ca.pem"),
        "names the CA file tried: {err}"
    );
    let (code, out, err) = login(Some(&ca_file))?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("logged in"), "{out}");
    // The CA is remembered with the session.
    let (code, list, err) = cli(cfg.path(), &["cocoon", "list"], &[])?;
    assert_eq!(code, 0, "{err}");
    assert!(list.contains("tls-box"), "{list}");

    // Renewed on disk: new connections get the new certificate within a few seconds,
    // the device stays connected, and the proxy keeps working.
    let renewed = issue(&trusted, dir.path(), "hub two")?;
    wait_for(
        "the renewed certificate served",
        Duration::from_secs(10),
        || async { Ok((served(&ca_file, &hub.url).await? == renewed).then_some(())) },
    )
    .await?;
    assert_eq!(
        proxied(http.clone()).await?,
        (200, "hello over tls".to_owned())
    );
    let connects = device.proc.output().matches("connected to hub").count();
    assert_eq!(
        connects,
        1,
        "the device never reconnected:\n{}",
        device.proc.output()
    );
    assert!(
        hub.proc.output().contains("TLS certificate reloaded"),
        "{}",
        hub.proc.output()
    );

    // A broken pair on disk is not served: the renewed one stays.
    std::fs::write(&cert, "not a certificate")?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(served(&ca_file, &hub.url).await?, renewed);
    assert!(hub.proc.output().contains("TLS certificate not reloaded"));
    drop((device, untrusting));
    Ok(())
}
