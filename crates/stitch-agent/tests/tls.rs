//! The agent against a server that speaks HTTPS itself with a certificate from a private CA:
//! `ca_file` is what makes the agent trust it, and without it the agent must refuse the
//! server (and say why) rather than enroll.

use std::path::Path;
use std::time::Duration;

use stitch_agent::AgentAction;

use crate::harness::*;

#[test]
fn agent_enrolls_over_https_only_when_ca_file_trusts_the_servers_private_ca() {
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = stitch_testkit::private_ca(d, "srv");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut c = stitch_server::Config::new(d.join("server"));
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.tls = Some((pki.cert.clone(), pki.key.clone()));
    c.trusted_keys.insert(vendor_key().public());
    let server = rt.block_on(stitch_server::run(c)).expect("HTTPS server");
    let url = server.url();
    assert!(url.starts_with("https://"));
    let creds = rt
        .block_on(stitch_server::bootstrap(
            &server.store,
            &stitch_server::BootstrapSpec {
                org: "acme".into(),
                plan: stitch_server::model::Plan::Paid,
                admin: None,
            },
        ))
        .unwrap();
    let configure = |name: &str, ca: Option<&Path>| {
        let a_dir = d.join(name);
        std::fs::create_dir_all(&a_dir).unwrap();
        let a = Agent::configure(
            &a_dir,
            &AgentOpts {
                server: Some(&url),
                enroll: Some(&creds.enrollment_token),
                ..Default::default()
            },
        );
        if let Some(ca) = ca {
            // Top-level keys come before the config's [tables].
            let text = std::fs::read_to_string(&a.config).unwrap();
            std::fs::write(&a.config, format!("ca_file = {ca:?}\n{text}")).unwrap();
        }
        a
    };

    // Without the CA: the agent stays offline, says it is the certificate, and never enrolls.
    let mut untrusting = configure("untrusting", None);
    untrusting.start();
    let err = untrusting.until("a TLS refusal", Duration::from_secs(30), || {
        let s = untrusting.ask(AgentAction::Status);
        let e = s["server"]["last_error"].as_str()?.to_lowercase();
        (s["server"]["state"] != "online").then_some(e)
    });
    assert!(
        err.contains("certificate") || err.contains("issuer"),
        "the error names the certificate problem: {err}"
    );
    untrusting.stop();

    // With ca_file: enrolled and online, and the server knows the computer.
    let mut trusting = configure("trusting", Some(&pki.ca));
    trusting.start();
    trusting.until("online over HTTPS", Duration::from_secs(30), || {
        (trusting.ask(AgentAction::Status)["server"]["state"] == "online").then_some(())
    });
    trusting.stop();
    let page = rt
        .block_on(server.store.computers(
            creds.org_id,
            &stitch_server::model::ComputerQuery {
                limit: 10,
                ..Default::default()
            },
        ))
        .unwrap();
    assert_eq!(page.total, 1, "only the agent that trusted the CA enrolled");
    rt.block_on(server.shutdown());
}
