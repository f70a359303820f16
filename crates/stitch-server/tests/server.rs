//! stitch-server integration tests: a real server on loopback, each test against SQLite and
//! PostgreSQL (PostgreSQL tests skip without STITCH_TEST_DATABASE_URL, and fail in CI).
//! Test names say the hazard they guard against.

mod common;
mod dashboard;
mod tls;

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use stitch_format::{Bundle, Tier};
use stitch_server::manifest::{ManifestPayload, SignedManifest};
use stitch_server::model::{Plan, Role};

async fn manifest(t: &TestServer, a: &Agent) -> ManifestPayload {
    let r = t.get(&a.cred, "/api/v1/agent/manifest").await;
    assert_eq!(r.status(), StatusCode::OK);
    let m: SignedManifest = r.json().await.expect("manifest json");
    stitch_server::manifest::verify(&m, &a.server_key, &a.id, 0, stitch_server::now())
        .expect("manifest verifies")
}

async fn json_of(r: reqwest::Response) -> Value {
    let s = r.status();
    let text = r.text().await.unwrap_or_default();
    assert!(s.is_success(), "{s}: {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

both!(
    agent_gets_signed_manifest_and_downloads_immutable_bundle,
    |t| {
        let org = t.org("acme", Plan::Paid).await;
        let bytes = signed_bundle(
            patch("ST-2026-0001", 1, Tier::Free, "libdemo1", "1.0-1"),
            &vendor_key(),
        );
        let r = t.upload(&org.api, bytes.clone()).await;
        assert_eq!(r.status(), StatusCode::CREATED);
        let a = t
            .agent(&org, "web-1", &[("libdemo1", "1.0-1"), ("bash", "5.2")])
            .await;
        let m = manifest(&t, &a).await;
        assert_eq!(m.patches.len(), 1);
        assert!(m.patches[0].enabled);
        assert!(m.version >= 1);
        assert!(m.expires_at > m.issued_at);
        let ca = &m.patches[0].content_address;
        let r = t.get(&a.cred, &format!("/api/v1/bundles/{ca}")).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(
            r.headers()["cache-control"]
                .to_str()
                .unwrap_or("")
                .contains("immutable")
        );
        let etag = r.headers()["etag"].to_str().unwrap_or("").to_string();
        let body = r.bytes().await.expect("body");
        assert_eq!(body.as_ref(), bytes.as_slice());
        let mut keys = stitch_format::TrustedKeys::new();
        keys.insert(vendor_key().public());
        let vb = Bundle::decode_verified(&body, &keys).expect("downloaded bundle verifies");
        assert_eq!(hex::encode(vb.bundle().content_address()), *ca);
        let r = t
            .http
            .get(t.u(&format!("/api/v1/bundles/{ca}")))
            .bearer_auth(&a.cred)
            .header("if-none-match", etag)
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
        // Same content again: same version.
        assert_eq!(manifest(&t, &a).await.version, m.version);
        // An agent without the package still gets the patch: agents match modules by
        // SHA-256, and the file may come from no package they can list (a wheel, a copy).
        let b = t.agent(&org, "db-1", &[("postgresql", "15")]).await;
        assert_eq!(manifest(&t, &b).await.patches.len(), 1);
        t.stop().await;
    }
);

both!(other_org_cannot_read_computer, |t| {
    let a_org = t.org("alpha", Plan::Paid).await;
    let b_org = t.org("beta", Plan::Paid).await;
    let a = t
        .agent(&a_org, "alpha-secret-host", &[("bash", "5.2")])
        .await;
    assert_error(
        t.get(&b_org.api, &format!("/api/v1/computers/{}", a.id))
            .await,
        StatusCode::NOT_FOUND,
        "computer.unknown",
    )
    .await;
    let v = json_of(t.get(&b_org.api, "/api/v1/computers").await).await;
    assert_eq!(v["computers"].as_array().map(Vec::len), Some(0));
    let v = json_of(t.get(&b_org.api, "/api/v1/computers?q=alpha").await).await;
    assert_eq!(v["computers"].as_array().map(Vec::len), Some(0));
    // The owner sees it.
    let v = json_of(
        t.get(&a_org.api, &format!("/api/v1/computers/{}", a.id))
            .await,
    )
    .await;
    assert_eq!(v["computer"]["hostname"], "alpha-secret-host");
    t.stop().await;
});

both!(
    other_org_gets_not_found_on_every_endpoint_that_names_an_id,
    |t| {
        let a_org = t.org("alpha", Plan::Paid).await;
        let b_org = t.org("beta", Plan::Paid).await;
        let bytes = signed_bundle(
            patch("ST-2026-0001", 1, Tier::Free, "libdemo1", "1.0-1"),
            &vendor_key(),
        );
        assert_eq!(
            t.upload(&a_org.api, bytes).await.status(),
            StatusCode::CREATED
        );
        let a = t.agent(&a_org, "a1", &[("libdemo1", "1.0-1")]).await;
        let b = t.agent(&b_org, "b1", &[("libdemo1", "1.0-1")]).await;
        let groups = json_of(t.get(&a_org.api, "/api/v1/groups").await).await;
        let a_group = groups["groups"][0]["id"].as_i64().expect("group id");
        let tokens = json_of(t.get(&a_org.api, "/api/v1/enrollment-tokens").await).await;
        let a_token = tokens["enrollment_tokens"][0]["id"]
            .as_i64()
            .expect("token id");
        let ca = manifest(&t, &a).await.patches[0].content_address.clone();

        let bt = &b_org.api;
        assert_error(
            t.get(bt, &format!("/api/v1/computers/{}", a.id)).await,
            StatusCode::NOT_FOUND,
            "computer.unknown",
        )
        .await;
        assert_error(
            t.post(
                bt,
                &format!("/api/v1/computers/{}/revoke", a.id),
                &json!({}),
            )
            .await,
            StatusCode::NOT_FOUND,
            "computer.unknown",
        )
        .await;
        assert_error(
            t.put(
                bt,
                &format!("/api/v1/computers/{}/group", a.id),
                &json!({"group_id": a_group}),
            )
            .await,
            StatusCode::NOT_FOUND,
            "computer.unknown",
        )
        .await;
        // B's computer into A's group: refused too.
        assert_error(
            t.put(
                bt,
                &format!("/api/v1/computers/{}/group", b.id),
                &json!({"group_id": a_group}),
            )
            .await,
            StatusCode::NOT_FOUND,
            "computer.unknown",
        )
        .await;
        assert_error(
            t.get(bt, "/api/v1/catalog/patches/ST-2026-0001").await,
            StatusCode::NOT_FOUND,
            "patch.unknown",
        )
        .await;
        assert_error(
            t.post(
                bt,
                "/api/v1/catalog/patches/ST-2026-0001/promote",
                &json!({"ring": 1}),
            )
            .await,
            StatusCode::NOT_FOUND,
            "patch.unknown",
        )
        .await;
        assert_error(
            t.put(
                bt,
                &format!("/api/v1/groups/{a_group}"),
                &json!({"ring": 3, "default_mode": "approval"}),
            )
            .await,
            StatusCode::NOT_FOUND,
            "group.unknown",
        )
        .await;
        assert_error(
            t.put(
                bt,
                &format!("/api/v1/groups/{a_group}/policies/ST-2026-0001"),
                &json!({"enabled": false}),
            )
            .await,
            StatusCode::NOT_FOUND,
            "group.unknown",
        )
        .await;
        assert_error(
            t.post(
                bt,
                &format!("/api/v1/groups/{a_group}/approvals/ST-2026-0001"),
                &json!({}),
            )
            .await,
            StatusCode::NOT_FOUND,
            "group.unknown",
        )
        .await;
        assert_error(
            t.delete(bt, &format!("/api/v1/enrollment-tokens/{a_token}"))
                .await,
            StatusCode::NOT_FOUND,
            "enrollment_token.unknown",
        )
        .await;
        assert_error(
            t.post(
                bt,
                "/api/v1/enrollment-tokens",
                &json!({"name": "x", "group_id": a_group}),
            )
            .await,
            StatusCode::NOT_FOUND,
            "group.unknown",
        )
        .await;
        // B's agent cannot fetch A's bundle even though it has the package.
        assert_error(
            t.get(&b.cred, &format!("/api/v1/bundles/{ca}")).await,
            StatusCode::NOT_FOUND,
            "bundle.unknown",
        )
        .await;
        assert!(manifest(&t, &b).await.patches.is_empty());
        // Lists show nothing of A.
        for path in ["/api/v1/computers", "/api/v1/catalog/patches"] {
            let text = t.get(bt, path).await.text().await.unwrap_or_default();
            assert!(
                !text.contains(&a.id) && !text.contains("ST-2026-0001"),
                "{path}: {text}"
            );
        }
        let v = json_of(t.get(bt, "/api/v1/enrollment-tokens").await).await;
        assert!(
            v["enrollment_tokens"]
                .as_array()
                .expect("list")
                .iter()
                .all(|x| x["id"].as_i64() != Some(a_token))
        );
        let v = json_of(t.get(bt, "/api/v1/groups").await).await;
        assert!(
            v["groups"]
                .as_array()
                .expect("list")
                .iter()
                .all(|x| x["id"].as_i64() != Some(a_group))
        );
        // And nothing of A changed.
        let v = json_of(
            t.get(&a_org.api, &format!("/api/v1/computers/{}", a.id))
                .await,
        )
        .await;
        assert_eq!(v["computer"]["revoked"], false);
        assert_eq!(manifest(&t, &a).await.patches.len(), 1);
        t.stop().await;
    }
);

both!(
    bundle_with_bad_signature_is_rejected_and_nothing_stored,
    |t| {
        let org = t.org("acme", Plan::Paid).await;
        let mut bytes = signed_bundle(
            patch("ST-2026-0001", 1, Tier::Free, "libdemo1", "1.0-1"),
            &vendor_key(),
        );
        let last = bytes.len() - 1;
        bytes[last] ^= 1; // inside the signature
        assert_error(
            t.upload(&org.api, bytes).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "bundle.bad_signature",
        )
        .await;
        let rogue = signed_bundle(
            patch("ST-2026-0002", 1, Tier::Free, "libdemo1", "1.0-1"),
            &rogue_key(),
        );
        assert_error(
            t.upload(&org.api, rogue).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "bundle.untrusted_key",
        )
        .await;
        let unsigned = Bundle::new(patch("ST-2026-0003", 1, Tier::Free, "libdemo1", "1.0-1"))
            .expect("bundle")
            .encode();
        assert_error(
            t.upload(&org.api, unsigned).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "bundle.missing_signature",
        )
        .await;
        assert_error(
            t.upload(&org.api, b"not a bundle".to_vec()).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "bundle.bad_magic",
        )
        .await;
        let v = json_of(t.get(&org.api, "/api/v1/catalog/patches").await).await;
        assert_eq!(v["patches"].as_array().map(Vec::len), Some(0));
        t.stop().await;
    }
);

both!(
    catalog_upload_needs_an_admin_token_and_revisions_are_immutable,
    |t| {
        let org = t.org("acme", Plan::Paid).await;
        let bytes = signed_bundle(
            patch("ST-2026-0001", 1, Tier::Free, "libdemo1", "1.0-1"),
            &vendor_key(),
        );
        assert_error(
            t.upload("", bytes.clone()).await,
            StatusCode::UNAUTHORIZED,
            "auth.malformed",
        )
        .await;
        assert_error(
            t.upload("stk_0000", bytes.clone()).await,
            StatusCode::UNAUTHORIZED,
            "auth.invalid_token",
        )
        .await;
        let auditor = stitch_server::auth::new_token("stk_");
        t.store()
            .create_api_token(
                org.id,
                "audit",
                Role::Auditor,
                &stitch_server::auth::token_hash(&auditor),
                0,
            )
            .await
            .expect("token");
        assert_error(
            t.upload(&auditor, bytes.clone()).await,
            StatusCode::FORBIDDEN,
            "auth.read_only",
        )
        .await;
        // The auditor can read.
        assert_eq!(
            t.get(&auditor, "/api/v1/catalog/patches").await.status(),
            StatusCode::OK
        );
        assert_eq!(
            t.upload(&org.api, bytes.clone()).await.status(),
            StatusCode::CREATED
        );
        assert_eq!(t.upload(&org.api, bytes).await.status(), StatusCode::OK);
        let mut other = patch("ST-2026-0001", 1, Tier::Free, "libdemo1", "1.0-1");
        other.title = "Different content, same revision".into();
        assert_error(
            t.upload(&org.api, signed_bundle(other, &vendor_key()))
                .await,
            StatusCode::CONFLICT,
            "catalog.revision_conflict",
        )
        .await;
        let v = json_of(
            t.get(&org.api, "/api/v1/catalog/patches/ST-2026-0001")
                .await,
        )
        .await;
        assert_eq!(v["title"], "Fix for libdemo1");
        assert_eq!(v["cves"][0], "CVE-2026-12345");
        assert_eq!(v["package_name"], "libdemo1");
        // A new revision supersedes.
        assert_eq!(
            t.upload(
                &org.api,
                signed_bundle(
                    patch("ST-2026-0001", 2, Tier::Free, "libdemo1", "1.0-1"),
                    &vendor_key()
                )
            )
            .await
            .status(),
            StatusCode::CREATED
        );
        let v = json_of(t.get(&org.api, "/api/v1/catalog/patches").await).await;
        assert_eq!(v["patches"].as_array().map(Vec::len), Some(1));
        assert_eq!(v["patches"][0]["revision"], 2);
        t.stop().await;
    }
);

both!(stale_agent_credential_is_refused, |t| {
    let org = t.org("acme", Plan::Paid).await;
    let a = t.agent(&org, "web-1", &[("bash", "5.2")]).await;
    let v = json_of(
        t.post(&a.cred, "/api/v1/agent/credential", &json!({}))
            .await,
    )
    .await;
    let fresh = v["credential"].as_str().expect("cred").to_string();
    assert_error(
        t.post(
            &a.cred,
            "/api/v1/agent/heartbeat",
            &heartbeat("web-1", &[], &[]),
        )
        .await,
        StatusCode::UNAUTHORIZED,
        "auth.invalid_credential",
    )
    .await;
    assert_error(
        t.get(&a.cred, "/api/v1/agent/manifest").await,
        StatusCode::UNAUTHORIZED,
        "auth.invalid_credential",
    )
    .await;
    assert_eq!(
        t.post(
            &fresh,
            "/api/v1/agent/heartbeat",
            &heartbeat("web-1", &[], &[])
        )
        .await
        .status(),
        StatusCode::OK
    );
    t.stop().await;
});

both!(revoked_or_unknown_agent_is_refused, |t| {
    let org = t.org("acme", Plan::Paid).await;
    let a = t.agent(&org, "web-1", &[("bash", "5.2")]).await;
    assert_eq!(
        t.post(
            &org.api,
            &format!("/api/v1/computers/{}/revoke", a.id),
            &json!({})
        )
        .await
        .status(),
        StatusCode::OK
    );
    assert_error(
        t.post(
            &a.cred,
            "/api/v1/agent/heartbeat",
            &heartbeat("web-1", &[], &[]),
        )
        .await,
        StatusCode::FORBIDDEN,
        "agent.revoked",
    )
    .await;
    let fake = format!("sta_{}_{}", "ab".repeat(16), "cd".repeat(32));
    assert_error(
        t.get(&fake, "/api/v1/agent/manifest").await,
        StatusCode::UNAUTHORIZED,
        "agent.unknown",
    )
    .await;
    assert_error(
        t.get("garbage", "/api/v1/agent/manifest").await,
        StatusCode::UNAUTHORIZED,
        "auth.malformed",
    )
    .await;
    assert_error(
        t.get(&org.api, "/api/v1/agent/manifest").await,
        StatusCode::UNAUTHORIZED,
        "auth.malformed",
    )
    .await;
    let r = t
        .http
        .get(t.u("/api/v1/agent/manifest"))
        .send()
        .await
        .expect("get");
    assert_error(r, StatusCode::UNAUTHORIZED, "auth.missing").await;
    t.stop().await;
});

both!(revoked_enrollment_token_cannot_enroll, |t| {
    let org = t.org("acme", Plan::Paid).await;
    let v = json_of(t.get(&org.api, "/api/v1/enrollment-tokens").await).await;
    let id = v["enrollment_tokens"][0]["id"].as_i64().expect("id");
    assert_eq!(
        t.delete(&org.api, &format!("/api/v1/enrollment-tokens/{id}"))
            .await
            .status(),
        StatusCode::OK
    );
    assert_error(
        t.post(
            "",
            "/api/v1/enroll",
            &json!({"enrollment_token": org.enroll}),
        )
        .await,
        StatusCode::UNAUTHORIZED,
        "enroll.invalid_token",
    )
    .await;
    assert_error(
        t.post(
            "",
            "/api/v1/enroll",
            &json!({"enrollment_token": "ste_nope"}),
        )
        .await,
        StatusCode::UNAUTHORIZED,
        "enroll.invalid_token",
    )
    .await;
    let v = json_of(t.get(&org.api, "/api/v1/computers").await).await;
    assert_eq!(v["computers"].as_array().map(Vec::len), Some(0));
    t.stop().await;
});

both!(malformed_heartbeat_is_rejected_and_nothing_changes, |t| {
    let org = t.org("acme", Plan::Paid).await;
    let a = t.agent(&org, "web-1", &[("bash", "5.2")]).await;
    let send_raw = |body: &'static str| {
        t.http
            .post(t.u("/api/v1/agent/heartbeat"))
            .bearer_auth(&a.cred)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    assert_error(
        send_raw("{\"hostname\": ").await.expect("send"),
        StatusCode::BAD_REQUEST,
        "request.malformed_json",
    )
    .await;
    assert_error(
        send_raw("{\"hostname\": 5}").await.expect("send"),
        StatusCode::BAD_REQUEST,
        "request.invalid_fields",
    )
    .await;
    let r = t
        .http
        .post(t.u("/api/v1/agent/heartbeat"))
        .bearer_auth(&a.cred)
        .body("{}")
        .send()
        .await
        .expect("send");
    assert_error(
        r,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "request.content_type",
    )
    .await;
    let bad_state = heartbeat("evil", &[], &[("ST-2026-0001", "exploded")]);
    assert_error(
        t.post(&a.cred, "/api/v1/agent/heartbeat", &bad_state).await,
        StatusCode::BAD_REQUEST,
        "heartbeat.invalid_state",
    )
    .await;
    let mut bad_ip = heartbeat("evil", &[], &[]);
    bad_ip["ip_addresses"] = json!(["not-an-ip"]);
    assert_error(
        t.post(&a.cred, "/api/v1/agent/heartbeat", &bad_ip).await,
        StatusCode::BAD_REQUEST,
        "request.invalid_field",
    )
    .await;
    let mut bad_hash = heartbeat("evil", &[("bash", "5.2")], &[]);
    bad_hash["packages_hash"] = json!("00".repeat(32));
    assert_error(
        t.post(&a.cred, "/api/v1/agent/heartbeat", &bad_hash).await,
        StatusCode::BAD_REQUEST,
        "heartbeat.packages_hash_mismatch",
    )
    .await;
    let v = json_of(
        t.get(&org.api, &format!("/api/v1/computers/{}", a.id))
            .await,
    )
    .await;
    assert_eq!(v["computer"]["hostname"], "web-1");
    assert_eq!(v["packages"].as_array().map(Vec::len), Some(1));
    t.stop().await;
});

both!(oversize_bodies_are_rejected, |t| {
    let org = t.org("acme", Plan::Paid).await;
    let a = t.agent(&org, "web-1", &[("bash", "5.2")]).await;
    let big = format!("{{\"hostname\": \"{}\"}}", "x".repeat(5 << 20));
    let r = t
        .http
        .post(t.u("/api/v1/agent/heartbeat"))
        .bearer_auth(&a.cred)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .expect("send");
    assert_error(r, StatusCode::PAYLOAD_TOO_LARGE, "request.too_large").await;
    assert_error(
        t.upload(&org.api, vec![0u8; (4 << 20) + 10]).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "request.too_large",
    )
    .await;
    let r = t
        .http
        .post(t.u("/api/v1/groups"))
        .bearer_auth(&org.api)
        .header("content-type", "application/json")
        .body(format!("{{\"name\": \"{}\"}}", "g".repeat(100 << 10)))
        .send()
        .await
        .expect("send");
    assert_error(r, StatusCode::PAYLOAD_TOO_LARGE, "request.too_large").await;
    t.stop().await;
});

both!(events_are_idempotent_by_client_event_id, |t| {
    let org = t.org("acme", Plan::Paid).await;
    let a = t.agent(&org, "web-1", &[("bash", "5.2")]).await;
    let batch = json!({"events": [
        {"id": "e-1", "occurred_at": 1700000000, "kind": "agent_started"},
        {"id": "e-2", "occurred_at": 1700000001, "kind": "exploit_blocked", "patch_id": "ST-2026-0001", "pid": 4242, "exe": "/usr/sbin/demo", "count": 3},
        {"id": "e-3", "occurred_at": 1700000002, "kind": "patch_failed", "patch_id": "ST-2026-0001", "revision": 1, "code": "engine.unexpected_bytes"},
        {"id": "e-4", "occurred_at": 1700000003, "kind": "patched_process_crashed", "patch_id": "ST-2026-0001", "signal": 11},
    ]});
    let v = json_of(t.post(&a.cred, "/api/v1/agent/events", &batch).await).await;
    assert_eq!(v["accepted"], 4);
    let v = json_of(t.post(&a.cred, "/api/v1/agent/events", &batch).await).await;
    assert_eq!(v["accepted"], 0);
    assert_eq!(v["duplicates"], 4);
    let bad = json!({"events": [{"id": "e-9", "occurred_at": 1, "kind": "exploit_blocked", "patch_id": "ST-2026-0001"}]});
    assert_error(
        t.post(&a.cred, "/api/v1/agent/events", &bad).await,
        StatusCode::BAD_REQUEST,
        "events.invalid",
    )
    .await;
    let bad = json!({"events": [{"id": "e-9", "occurred_at": 1, "kind": "teleported"}]});
    assert_error(
        t.post(&a.cred, "/api/v1/agent/events", &bad).await,
        StatusCode::BAD_REQUEST,
        "events.invalid",
    )
    .await;
    let v = json_of(
        t.get(&org.api, &format!("/api/v1/computers/{}", a.id))
            .await,
    )
    .await;
    let events = v["events"].as_array().expect("events");
    assert_eq!(events.len(), 4);
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "exploit_blocked" && e["data"]["pid"] == 4242)
    );
    t.stop().await;
});

both!(inventory_is_sent_only_when_its_hash_is_unknown, |t| {
    let org = t.org("acme", Plan::Paid).await;
    let pk = [("bash", "5.2"), ("libdemo1", "1.0-1")];
    let a = t.agent(&org, "web-1", &pk).await;
    let mut list: Vec<stitch_server::model::InstalledPackage> = pk
        .iter()
        .map(|(n, v)| stitch_server::model::InstalledPackage {
            ecosystem: "deb".into(),
            name: (*n).into(),
            version: (*v).into(),
        })
        .collect();
    list.sort();
    let hash = stitch_server::api::packages_hash(&list);
    // A second computer with the same inventory only sends the hash.
    let r = t
        .post(
            "",
            "/api/v1/enroll",
            &json!({"enrollment_token": org.enroll}),
        )
        .await;
    let v: Value = r.json().await.expect("json");
    let cred = v["credential"].as_str().expect("cred").to_string();
    let mut hb = heartbeat("web-2", &[], &[]);
    hb.as_object_mut().expect("obj").remove("packages");
    hb["packages_hash"] = json!(hash);
    let v = json_of(t.post(&cred, "/api/v1/agent/heartbeat", &hb).await).await;
    assert_eq!(v["inventory_required"], false);
    // An unknown hash asks for the list.
    hb["packages_hash"] = json!("ab".repeat(32));
    let v = json_of(t.post(&cred, "/api/v1/agent/heartbeat", &hb).await).await;
    assert_eq!(v["inventory_required"], true);
    let v = json_of(t.get(&org.api, "/api/v1/computers?q=web-2").await).await;
    assert_eq!(v["computers"].as_array().map(Vec::len), Some(1));
    let _ = a;
    t.stop().await;
});

both!(
    long_poll_wakes_on_policy_change_and_times_out_otherwise,
    |t| {
        let org = t.org("acme", Plan::Paid).await;
        assert_eq!(
            t.upload(
                &org.api,
                signed_bundle(
                    patch("ST-2026-0001", 1, Tier::Free, "libdemo1", "1.0-1"),
                    &vendor_key()
                )
            )
            .await
            .status(),
            StatusCode::CREATED
        );
        let a = t.agent(&org, "web-1", &[("libdemo1", "1.0-1")]).await;
        let m = manifest(&t, &a).await;
        let r = t
            .get(
                &a.cred,
                &format!(
                    "/api/v1/agent/manifest/poll?version={}&timeout_s=1",
                    m.version
                ),
            )
            .await;
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        let poll = t
            .http
            .get(t.u(&format!(
                "/api/v1/agent/manifest/poll?version={}&timeout_s=5",
                m.version
            )))
            .bearer_auth(&a.cred)
            .send();
        let change = async {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let groups = json_of(t.get(&org.api, "/api/v1/groups").await).await;
            let g = groups["groups"][0]["id"].as_i64().expect("id");
            let r = t
                .put(
                    &org.api,
                    &format!("/api/v1/groups/{g}/policies/ST-2026-0001"),
                    &json!({"enabled": false}),
                )
                .await;
            assert_eq!(r.status(), StatusCode::OK);
            std::time::Instant::now()
        };
        let started = std::time::Instant::now();
        let (r, _) = tokio::join!(poll, change);
        let r = r.expect("poll");
        assert_eq!(r.status(), StatusCode::OK);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(4),
            "woke by the change, not the timeout"
        );
        let sm: SignedManifest = r.json().await.expect("json");
        let p = stitch_server::manifest::verify(
            &sm,
            &a.server_key,
            &a.id,
            m.version,
            stitch_server::now(),
        )
        .expect("verifies");
        assert_eq!(p.version, m.version + 1);
        assert!(!p.patches[0].enabled);
        assert_error(
            t.get(&a.cred, "/api/v1/agent/manifest/poll?version=abc")
                .await,
            StatusCode::BAD_REQUEST,
            "request.invalid_query",
        )
        .await;
        t.stop().await;
    }
);

both!(
    free_plan_gets_only_free_patches_and_no_groups_or_approvals,
    |t| {
        let org = t.org("small", Plan::Free).await;
        assert_eq!(
            t.upload(
                &org.api,
                signed_bundle(
                    patch("ST-2026-0001", 1, Tier::Free, "libdemo1", "1.0-1"),
                    &vendor_key()
                )
            )
            .await
            .status(),
            StatusCode::CREATED
        );
        assert_eq!(
            t.upload(
                &org.api,
                signed_bundle(
                    patch("ST-2026-0002", 1, Tier::Pro, "libdemo1", "1.0-1"),
                    &vendor_key()
                )
            )
            .await
            .status(),
            StatusCode::CREATED
        );
        let a = t.agent(&org, "web-1", &[("libdemo1", "1.0-1")]).await;
        let m = manifest(&t, &a).await;
        assert_eq!(
            m.patches
                .iter()
                .map(|p| p.patch_id.as_str())
                .collect::<Vec<_>>(),
            ["ST-2026-0001"]
        );
        assert_error(
            t.post(&org.api, "/api/v1/groups", &json!({"name": "canary"}))
                .await,
            StatusCode::FORBIDDEN,
            "plan.feature_unavailable",
        )
        .await;
        let groups = json_of(t.get(&org.api, "/api/v1/groups").await).await;
        let g = groups["groups"][0]["id"].as_i64().expect("id");
        assert_error(
            t.post(
                &org.api,
                &format!("/api/v1/groups/{g}/approvals/ST-2026-0001"),
                &json!({}),
            )
            .await,
            StatusCode::FORBIDDEN,
            "plan.feature_unavailable",
        )
        .await;
        assert_error(
            t.put(
                &org.api,
                &format!("/api/v1/groups/{g}/policies/ST-2026-0001"),
                &json!({"mode": "approval"}),
            )
            .await,
            StatusCode::FORBIDDEN,
            "plan.feature_unavailable",
        )
        .await;
        // Upgrading the plan brings the pro patch.
        t.store().set_plan(org.id, Plan::Paid).await.expect("plan");
        assert_eq!(manifest(&t, &a).await.patches.len(), 2);
        t.stop().await;
    }
);

both!(
    canary_ring_gets_patch_first_and_approval_mode_waits_for_approval,
    |t| {
        let org = t.org("big", Plan::Paid).await;
        assert_eq!(
            t.upload(
                &org.api,
                signed_bundle(
                    patch("ST-2026-0001", 1, Tier::Pro, "libdemo1", "1.0-1"),
                    &vendor_key()
                )
            )
            .await
            .status(),
            StatusCode::CREATED
        );
        let prod = json_of(
            t.post(
                &org.api,
                "/api/v1/groups",
                &json!({"name": "production", "ring": 1}),
            )
            .await,
        )
        .await;
        let prod_id = prod["id"].as_i64().expect("id");
        let canary_host = t.agent(&org, "canary-1", &[("libdemo1", "1.0-1")]).await;
        let prod_host = t.agent(&org, "prod-1", &[("libdemo1", "1.0-1")]).await;
        assert_eq!(
            t.put(
                &org.api,
                &format!("/api/v1/computers/{}/group", prod_host.id),
                &json!({"group_id": prod_id})
            )
            .await
            .status(),
            StatusCode::OK
        );
        assert_eq!(manifest(&t, &canary_host).await.patches.len(), 1);
        assert!(
            manifest(&t, &prod_host).await.patches.is_empty(),
            "ring 1 waits for promotion"
        );
        assert_eq!(
            t.post(
                &org.api,
                "/api/v1/catalog/patches/ST-2026-0001/promote",
                &json!({"ring": 1})
            )
            .await
            .status(),
            StatusCode::OK
        );
        assert_eq!(manifest(&t, &prod_host).await.patches.len(), 1);
        // Switch production to approval-required: the patch leaves until approved.
        assert_eq!(
            t.put(
                &org.api,
                &format!("/api/v1/groups/{prod_id}"),
                &json!({"ring": 1, "default_mode": "approval"})
            )
            .await
            .status(),
            StatusCode::OK
        );
        assert!(manifest(&t, &prod_host).await.patches.is_empty());
        assert_eq!(
            t.post(
                &org.api,
                &format!("/api/v1/groups/{prod_id}/approvals/ST-2026-0001"),
                &json!({})
            )
            .await
            .status(),
            StatusCode::OK
        );
        assert_eq!(manifest(&t, &prod_host).await.patches.len(), 1);
        // An enrollment token for the production group enrolls straight into it.
        let v = json_of(
            t.post(
                &org.api,
                "/api/v1/enrollment-tokens",
                &json!({"name": "prod", "group_id": prod_id}),
            )
            .await,
        )
        .await;
        let tok = v["token"].as_str().expect("token");
        let v = json_of(
            t.post("", "/api/v1/enroll", &json!({"enrollment_token": tok}))
                .await,
        )
        .await;
        let id = v["agent_id"].as_str().expect("id");
        let v = json_of(t.get(&org.api, &format!("/api/v1/computers/{id}")).await).await;
        assert_eq!(v["computer"]["group_name"], "production");
        t.stop().await;
    }
);

both!(computer_list_shows_applied_and_missing_patches, |t| {
    let org = t.org("acme", Plan::Paid).await;
    for (id, pkg) in [("ST-2026-0001", "libdemo1"), ("ST-2026-0002", "openssl")] {
        assert_eq!(
            t.upload(
                &org.api,
                signed_bundle(patch(id, 1, Tier::Free, pkg, "1.0-1"), &vendor_key())
            )
            .await
            .status(),
            StatusCode::CREATED
        );
    }
    let a = t
        .agent(
            &org,
            "web-1",
            &[("libdemo1", "1.0-1"), ("openssl", "1.0-1")],
        )
        .await;
    let hb = heartbeat(
        "web-1",
        &[("libdemo1", "1.0-1"), ("openssl", "1.0-1")],
        &[("ST-2026-0001", "applied")],
    );
    assert_eq!(
        t.post(&a.cred, "/api/v1/agent/heartbeat", &hb)
            .await
            .status(),
        StatusCode::OK
    );
    let v = json_of(t.get(&org.api, "/api/v1/computers").await).await;
    assert_eq!(v["computers"][0]["patches_applied"], 1);
    assert_eq!(v["computers"][0]["relevant_missing"], 1);
    assert_eq!(
        v["computers"][0]["os_name"],
        "Debian GNU/Linux 12 (bookworm)"
    );
    let v = json_of(t.get(&org.api, "/api/v1/catalog/patches").await).await;
    let p1 = v["patches"]
        .as_array()
        .expect("patches")
        .iter()
        .find(|p| p["patch_id"] == "ST-2026-0001")
        .cloned()
        .expect("p1");
    assert_eq!(p1["computers_affected"], 1);
    assert_eq!(p1["computers_applied"], 1);
    t.stop().await;
});

#[tokio::test]
async fn health_metrics_and_openapi_are_served() {
    let t = TestServer::start(Backend::Sqlite).await.expect("server");
    let org = t.org("acme", Plan::Paid).await;
    let _a = t.agent(&org, "web-1", &[("bash", "5.2")]).await;
    assert_eq!(
        t.http
            .get(t.u("/healthz"))
            .send()
            .await
            .expect("get")
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        t.http
            .get(t.u("/readyz"))
            .send()
            .await
            .expect("get")
            .status(),
        StatusCode::OK
    );
    let m = t
        .http
        .get(t.u("/metrics"))
        .send()
        .await
        .expect("get")
        .text()
        .await
        .expect("text");
    assert!(m.contains("stitch_heartbeats_total 1"), "{m}");
    assert!(m.contains("stitch_agents_online 1"), "{m}");
    assert!(
        m.contains("stitch_http_request_duration_seconds_bucket{route=\"/api/v1/agent/heartbeat\""),
        "{m}"
    );
    let o = t
        .http
        .get(t.u("/openapi.yaml"))
        .send()
        .await
        .expect("get")
        .text()
        .await
        .expect("text");
    assert!(o.contains("openapi:"));
    assert_error(
        t.http.get(t.u("/api/v1/nope")).send().await.expect("get"),
        StatusCode::NOT_FOUND,
        "request.not_found",
    )
    .await;
    t.stop().await;
}

#[tokio::test]
async fn long_poll_on_one_replica_wakes_for_a_change_made_on_another() {
    let Some(url) = pg_schema_url().await else {
        return;
    };
    let a = TestServer::start_on(Some(url.clone()), None).await;
    let b = TestServer::start_on(Some(url), Some(a.dir().join("server.key"))).await;
    let org = a.org("acme", Plan::Paid).await;
    let agent = a.agent(&org, "web-1", &[("libdemo1", "1.0-1")]).await;
    let m = manifest(&b, &agent).await; // replica B serves A's agent with the same key
    assert!(m.patches.is_empty());
    let poll = b
        .http
        .get(b.u(&format!(
            "/api/v1/agent/manifest/poll?version={}&timeout_s=5",
            m.version
        )))
        .bearer_auth(&agent.cred)
        .send();
    let change = async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let bytes = signed_bundle(
            patch("ST-2026-0001", 1, Tier::Free, "libdemo1", "1.0-1"),
            &vendor_key(),
        );
        assert_eq!(
            a.upload(&org.api, bytes).await.status(),
            StatusCode::CREATED
        );
    };
    let started = std::time::Instant::now();
    let (r, ()) = tokio::join!(poll, change);
    let r = r.expect("poll");
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "woken by NOTIFY, not by the timeout"
    );
    let sm: SignedManifest = r.json().await.expect("json");
    let p = stitch_server::manifest::verify(
        &sm,
        &agent.server_key,
        &agent.id,
        m.version,
        stitch_server::now(),
    )
    .expect("verifies");
    assert_eq!(p.patches.len(), 1);
    a.stop().await;
    b.stop().await;
}

both!(
    computer_list_cursor_stays_put_when_the_last_computer_shown_is_renamed,
    |t| {
        // The next page starts after the last computer shown as it was shown: its agent
        // reporting a new host name in between must not move the cursor (here back to the
        // start of the list, which would show a-1 … again; forward would skip computers).
        let org = t.org("acme", Plan::Paid).await;
        let mut creds = Vec::new();
        for name in ["a-1", "b-1", "c-1", "d-1", "e-1"] {
            creds.push(t.agent(&org, name, &[("bash", "5.2")]).await.cred);
        }
        let names = |v: &Value| -> Vec<String> {
            v["computers"]
                .as_array()
                .expect("computers")
                .iter()
                .map(|c| c["hostname"].as_str().unwrap_or("").to_string())
                .collect()
        };
        let v = json_of(t.get(&org.api, "/api/v1/computers?limit=2").await).await;
        assert_eq!(names(&v), ["a-1", "b-1"]);
        let next = v["next"].as_str().expect("next").to_string();
        let b_id = v["computers"][1]["id"].as_str().expect("id").to_string();
        let r = t
            .post(
                &creds[1],
                "/api/v1/agent/heartbeat",
                &heartbeat("0-renamed", &[("bash", "5.2")], &[]),
            )
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        let v = json_of(
            t.get(&org.api, &format!("/api/v1/computers?limit=2&after={next}"))
                .await,
        )
        .await;
        assert_eq!(names(&v), ["c-1", "d-1"]);
        // A bare id (a cursor of an older server) still works, from the computer's new name.
        let v = json_of(
            t.get(&org.api, &format!("/api/v1/computers?limit=2&after={b_id}"))
                .await,
        )
        .await;
        assert_eq!(names(&v), ["a-1", "c-1"]);
        t.stop().await;
    }
);

both!(
    computer_list_pages_through_every_computer_once_in_name_order,
    |t| {
        // A fleet is listed page by page (keyset on host name, then id): no computer may be
        // skipped or shown twice, even when two share a host name, and another org's
        // computers never appear.
        let org = t.org("acme", Plan::Paid).await;
        let other = t.org("other", Plan::Paid).await;
        let mut want = Vec::new();
        for name in [
            "web-3", "db-1", "web-1", "web-1", "cache-9", "web-2", "db-2",
        ] {
            let a = t.agent(&org, name, &[("bash", "5.2")]).await;
            want.push((name.to_string(), a.id));
        }
        t.agent(&other, "web-0", &[("bash", "5.2")]).await;
        want.sort();
        let mut got = Vec::new();
        let mut after = String::new();
        let mut pages = 0;
        loop {
            let v = json_of(
                t.get(
                    &org.api,
                    &format!("/api/v1/computers?limit=3&after={after}"),
                )
                .await,
            )
            .await;
            pages += 1;
            assert_eq!(v["total"], 7);
            let page = v["computers"].as_array().expect("computers");
            assert!(page.len() <= 3);
            for c in page {
                got.push((
                    c["hostname"].as_str().unwrap_or("").to_string(),
                    c["id"].as_str().unwrap_or("").to_string(),
                ));
            }
            match v["next"].as_str() {
                Some(n) => after = n.to_string(),
                None => break,
            }
            assert!(pages < 10, "pagination does not end");
        }
        assert_eq!(pages, 3);
        assert_eq!(got, want);

        // Search and state filters narrow the list; every computer here just sent a heartbeat.
        let v = json_of(t.get(&org.api, "/api/v1/computers?q=WEB").await).await;
        assert_eq!(v["computers"].as_array().map(Vec::len), Some(4));
        let v = json_of(t.get(&org.api, "/api/v1/computers?show=online").await).await;
        assert_eq!(v["computers"].as_array().map(Vec::len), Some(7));
        let v = json_of(t.get(&org.api, "/api/v1/computers?show=offline").await).await;
        assert_eq!(v["computers"].as_array().map(Vec::len), Some(0));
        assert!(v["next"].is_null());
        // The dashboard's count of a filtered list is of what the filter keeps (`total` above
        // is before `show`).
        let count = |search: &str, show: &str| {
            let q = stitch_server::model::ComputerQuery {
                search: search.into(),
                show: show.into(),
                online_since: stitch_server::now() - 300,
                ..Default::default()
            };
            let store = t.store();
            async move { store.count_computers(org.id, &q).await.expect("count") }
        };
        assert_eq!(count("", "online").await, 7);
        assert_eq!(count("WEB", "online").await, 4);
        assert_eq!(count("", "offline").await, 0);
        assert_eq!(count("", "missing").await, 0);
        // Out-of-range limits are clamped, not errors; an unknown filter is.
        let v = json_of(t.get(&org.api, "/api/v1/computers?limit=0").await).await;
        assert_eq!(v["computers"].as_array().map(Vec::len), Some(1));
        assert_error(
            t.get(&org.api, "/api/v1/computers?show=sideways").await,
            StatusCode::BAD_REQUEST,
            "request.invalid_query",
        )
        .await;
        t.stop().await;
    }
);

both!(
    people_and_api_tokens_are_managed_by_owners_only_and_revocation_is_immediate,
    |t| {
        let org = t.org("acme", Plan::Paid).await;
        let other = t.org("globex", Plan::Paid).await;
        // The bootstrap API token is an admin's: it manages patches, not people.
        assert_error(
            t.post(
                &org.api,
                "/api/v1/users",
                &json!({ "username": "alice", "password": "long enough pass", "role": "admin" }),
            )
            .await,
            StatusCode::FORBIDDEN,
            "auth.owner_only",
        )
        .await;
        assert_error(
            t.post(
                &org.api,
                "/api/v1/api-tokens",
                &json!({ "name": "ci", "role": "admin" }),
            )
            .await,
            StatusCode::FORBIDDEN,
            "auth.owner_only",
        )
        .await;
        let (owner, other_owner) = ("stk_owner-of-acme", "stk_owner-of-globex");
        for (org_id, secret) in [(org.id, owner), (other.id, other_owner)] {
            t.store()
                .create_api_token(
                    org_id,
                    "owner",
                    Role::Owner,
                    &stitch_server::auth::token_hash(secret),
                    0,
                )
                .await
                .expect("token");
        }

        assert_error(
            t.post(
                owner,
                "/api/v1/users",
                &json!({ "username": "alice", "password": "short", "role": "admin" }),
            )
            .await,
            StatusCode::BAD_REQUEST,
            "user.weak_password",
        )
        .await;
        let body = json!({ "username": "alice", "password": "long enough pass", "role": "admin" });
        let alice = json_of(t.post(owner, "/api/v1/users", &body).await).await["id"]
            .as_i64()
            .expect("id");
        assert_error(
            t.post(owner, "/api/v1/users", &body).await,
            StatusCode::CONFLICT,
            "user.taken",
        )
        .await;
        let users = json_of(t.get(owner, "/api/v1/users").await).await;
        let names: Vec<&str> = users["users"]
            .as_array()
            .expect("users")
            .iter()
            .filter_map(|u| u["username"].as_str())
            .collect();
        assert_eq!(names, ["acme-admin", "alice"]);
        assert!(
            !users.to_string().contains("argon2"),
            "no password hash is ever listed"
        );

        // A token works at once, with its role, and stops working the moment it is revoked.
        let v = json_of(
            t.post(
                owner,
                "/api/v1/api-tokens",
                &json!({ "name": "ci", "role": "auditor" }),
            )
            .await,
        )
        .await;
        let (ci_id, ci) = (
            v["id"].as_i64().expect("id"),
            v["token"].as_str().expect("token"),
        );
        assert_eq!(
            t.get(ci, "/api/v1/computers").await.status(),
            StatusCode::OK
        );
        assert_error(
            t.post(ci, "/api/v1/groups", &json!({ "name": "web" }))
                .await,
            StatusCode::FORBIDDEN,
            "auth.read_only",
        )
        .await;
        let listed = json_of(t.get(owner, "/api/v1/api-tokens").await).await;
        assert!(!listed.to_string().contains(ci), "secrets are never listed");
        // Another org's owner cannot touch this org's tokens or people.
        assert_error(
            t.post(
                other_owner,
                &format!("/api/v1/api-tokens/{ci_id}/revoke"),
                &json!({}),
            )
            .await,
            StatusCode::NOT_FOUND,
            "api_token.unknown",
        )
        .await;
        assert_error(
            t.delete(other_owner, &format!("/api/v1/users/{alice}"))
                .await,
            StatusCode::NOT_FOUND,
            "user.unknown",
        )
        .await;
        json_of(
            t.post(
                owner,
                &format!("/api/v1/api-tokens/{ci_id}/revoke"),
                &json!({}),
            )
            .await,
        )
        .await;
        assert_error(
            t.get(ci, "/api/v1/computers").await,
            StatusCode::UNAUTHORIZED,
            "auth.invalid_token",
        )
        .await;

        json_of(t.delete(owner, &format!("/api/v1/users/{alice}")).await).await;
        let owner_id = users["users"][0]["id"].as_i64().expect("id");
        assert_error(
            t.delete(owner, &format!("/api/v1/users/{owner_id}")).await,
            StatusCode::BAD_REQUEST,
            "user.last_owner",
        )
        .await;
        t.stop().await;
    }
);
