//! The join page's HTTP side against a real server: the page and its assets with their
//! security headers, invite links in the administration API, the app-link files, and the
//! loopback-or-HTTPS rule. (The page itself runs in `browser.rs`.)

use anyhow::Result;
use bedside_server::web::{AndroidApp, CSP};
use bedside_tests::{TestServer, test_config};
use reqwest::StatusCode;
use serde_json::{Value, json};

#[tokio::test]
async fn the_page_and_its_assets_are_served_with_a_strict_policy() -> Result<()> {
    let server = TestServer::start().await?;
    let c = server.create_consultation().await?;
    assert_eq!(
        c.invite_url,
        format!("{}/j/{}", server.base_url, c.invite_code)
    );
    for path in [
        format!("/j/{}", c.invite_code),
        "/j".into(),
        "/assets/join.js".into(),
        "/assets/join.css".into(),
    ] {
        let resp = server
            .http()
            .get(format!("{}{path}", server.base_url))
            .send()
            .await?;
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let h = resp.headers();
        assert_eq!(h["content-security-policy"], CSP, "{path}");
        assert_eq!(h["referrer-policy"], "no-referrer", "{path}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["cache-control"], "no-store", "{path}");
    }
    let html = server
        .http()
        .get(format!("{}/j/{}", server.base_url, c.invite_code))
        .send()
        .await?
        .text()
        .await?;
    // Nothing inline and nothing from elsewhere: the policy would refuse it.
    assert!(html.contains(r#"<script src="/assets/join.js" defer></script>"#));
    assert!(!html.contains("<style") && !html.contains(" style=") && !html.contains("http"));
    // Not an invite's shape: said at once.
    let resp = server
        .http()
        .get(format!("{}/j/not%20a%20code", server.base_url))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    Ok(())
}

#[tokio::test]
async fn plain_http_serves_the_page_only_to_a_loopback_host() -> Result<()> {
    // The host is one the server answers to (else the Host check refuses it first, 421): what
    // refuses the page is that it came over plain HTTP.
    let mut config = test_config();
    config.limits.allowed_hosts = vec!["clinic.example.org".into()];
    let server = TestServer::start_with(config).await?;
    let get = |host: &'static str| {
        server
            .http()
            .get(format!("{}/j", server.base_url))
            .header("host", host)
            .send()
    };
    assert_eq!(get("localhost:8443").await?.status(), StatusCode::OK);
    assert_eq!(get("[::1]:8443").await?.status(), StatusCode::OK);
    let refused = get("clinic.example.org").await?;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert!(refused.text().await?.contains("HTTPS"));
    Ok(())
}

#[tokio::test]
async fn invite_links_use_the_public_url_and_app_links_come_from_the_config() -> Result<()> {
    let mut config = test_config();
    config.public_url = "https://clinic.example.org/".into();
    config.web.android_apps = vec![AndroidApp {
        package: "org.example.bedside".into(),
        sha256_cert_fingerprints: vec!["14:6D:E9".into()],
    }];
    config.web.ios_app_ids = vec!["ABCDE12345.org.example.bedside".into()];
    let server = TestServer::start_with(config).await?;
    let c = server.create_consultation().await?;
    assert_eq!(
        c.invite_url,
        format!("https://clinic.example.org/j/{}", c.invite_code)
    );
    let invite: Value = server
        .http()
        .post(server.api(&format!("/consultations/{}/invites", c.consultation_id)))
        .bearer_auth(&server.admin_key)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        invite["invite_url"],
        format!(
            "https://clinic.example.org/j/{}",
            invite["invite_code"].as_str().unwrap()
        )
    );
    // Behind the clinic's HTTPS proxy, any host name gets the page.
    let resp = server
        .http()
        .get(format!("{}/j", server.base_url))
        .header("host", "clinic.example.org")
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);

    let links: Value = server
        .http()
        .get(format!("{}/.well-known/assetlinks.json", server.base_url))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        links,
        json!([{
            "relation": ["delegate_permission/common.handle_all_urls"],
            "target": {
                "namespace": "android_app",
                "package_name": "org.example.bedside",
                "sha256_cert_fingerprints": ["14:6D:E9"],
            }
        }])
    );
    let resp = server
        .http()
        .get(format!(
            "{}/.well-known/apple-app-site-association",
            server.base_url
        ))
        .send()
        .await?;
    assert_eq!(resp.headers()["content-type"], "application/json");
    let apple: Value = resp.json().await?;
    assert_eq!(
        apple["applinks"]["details"][0]["appIDs"],
        json!(["ABCDE12345.org.example.bedside"])
    );
    assert_eq!(
        apple["applinks"]["details"][0]["components"][0]["/"],
        "/j/*"
    );
    Ok(())
}

#[tokio::test]
async fn without_app_ids_there_are_no_app_link_files() -> Result<()> {
    let server = TestServer::start().await?;
    for path in [
        "/.well-known/assetlinks.json",
        "/.well-known/apple-app-site-association",
    ] {
        let resp = server
            .http()
            .get(format!("{}{path}", server.base_url))
            .send()
            .await?;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
    }
    Ok(())
}
