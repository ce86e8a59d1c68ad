//! The catalog conformance suite: every [`Catalog`] behaviour the hub relies on, written
//! once against `Arc<dyn Catalog>` and run against both backends.
//!
//! SQLite runs on a real file in a temporary directory, PostgreSQL on a fresh database
//! per test, both from `adi_storage::test_database`, which also says what happens when
//! the PostgreSQL server is unreachable (a failure in CI, a loud skip elsewhere).

use std::future::Future;
use std::sync::Arc;

use adi_protocol::{CapabilityOffer, DeviceId, GpuModel, Hardware, Role, Scope, ServiceInfo};
use adi_storage::conformance::run_then_close;
use adi_storage::test_database::{with_postgres, TestSqlite};
use sqlx::Connection;

use super::{
    ApiKeyRecord, AuditEvent, AuditQuery, Catalog, CatalogError, ChangeKind, DeviceConfig, Member,
    Orphans, PgCatalog, SqliteCatalog, TokenKind, TokenRecord, User, UserId,
};

/// The suite's name in the line that says a PostgreSQL test was skipped.
const SUITE: &str = "catalog";

/// The `now` the token tests run at; tokens expire an hour after it.
const NOW: i64 = 1_700_000_000;
const HOUR: i64 = 3600;

// ---------------------------------------------------------------------------------------
// Harnesses
// ---------------------------------------------------------------------------------------

/// Runs `test` against a fresh SQLite catalog file.
async fn on_sqlite<F, Fut>(test: F)
where
    F: FnOnce(Arc<dyn Catalog>) -> Fut,
    Fut: Future<Output = ()>,
{
    // A nested path, so `open` has to create the parent directories.
    let file = TestSqlite::new("data/catalog.db");
    let catalog = SqliteCatalog::open(file.path())
        .await
        .expect("open SQLite catalog");
    run_then_close(
        Arc::new(catalog),
        |c| test(c),
        |c| async move { c.close().await },
    )
    .await;
}

/// Runs `test` against a PostgreSQL catalog in a fresh database, then drops it (also
/// when the test panics).
async fn on_postgres<F, Fut>(test: F)
where
    F: FnOnce(Arc<dyn Catalog>) -> Fut,
    Fut: Future<Output = ()>,
{
    with_postgres(SUITE, |options| async move {
        let catalog = PgCatalog::connect_with(options)
            .await
            .expect("connect PostgreSQL catalog");
        run_then_close(
            Arc::new(catalog),
            |c| test(c),
            |c| async move { c.close().await },
        )
        .await;
    })
    .await;
}

adi_storage::conformance_tests!(
    ping_works,
    write_probes_commit,
    hub_secrets_are_read_and_removed,
    hub_secret_is_stored_once,
    hub_secret_concurrent_callers_agree,
    users_round_trip,
    duplicate_user_name_conflicts,
    api_keys_round_trip,
    tokens_round_trip,
    revoked_sessions_are_kept_until_they_expire,
    tokens_are_listed_by_creator_and_revoked_only_unused,
    enrol_creates_device_owned_by_token_creator,
    enrol_twice_with_same_token_is_refused,
    enrol_with_expired_or_unknown_token_is_refused,
    enrol_with_share_token_is_refused,
    enrol_existing_device_conflicts_and_keeps_token,
    concurrent_enrols_with_one_token_one_wins,
    claim_share_adds_co_owner,
    claim_share_twice_is_refused,
    claim_share_with_setup_or_expired_token_is_refused,
    owner_claiming_own_share_adds_no_duplicate,
    concurrent_claims_with_one_token_one_wins,
    devices_of_is_ordered_and_isolated,
    is_owner_reports_ownership,
    share_tokens_grant_their_role_and_raise_never_lower,
    members_are_removed_but_never_the_last_owner,
    roles_change_in_place_but_never_leave_a_device_without_an_owner,
    deleted_devices_are_forgotten_and_remembered_as_removed,
    api_keys_are_named_scoped_listed_and_revoked,
    users_are_disabled_enabled_and_removed_without_orphaning_devices,
    every_access_change_is_in_the_feed_in_order,
    audit_events_are_read_by_actor_target_and_owner_only,
    update_device_rewrites_config,
    update_unknown_device_is_not_found,
);

// ---------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------

/// A random, well-formed device id.
fn new_device_id() -> DeviceId {
    DeviceId::from_mac(uuid::Uuid::new_v4().as_bytes())
}

fn config(id: &DeviceId, name: &str) -> DeviceConfig {
    DeviceConfig {
        id: id.clone(),
        name: name.to_owned(),
        services: vec![
            ServiceInfo {
                name: "web".into(),
                port: 8080,
                health_path: Some("/healthz".into()),
                kind: adi_protocol::ServiceKind::Http,
                models: Vec::new(),
            },
            ServiceInfo {
                name: "ssh".into(),
                port: 22,
                health_path: None,
                kind: adi_protocol::ServiceKind::Http,
                models: Vec::new(),
            },
        ],
        capabilities: vec![offer("proxy:1.0.0"), offer("exec:2.1.0")],
        location: Some("kitchen".into()),
        hardware: None,
    }
}

fn offer(s: &str) -> CapabilityOffer {
    s.parse().expect("valid capability")
}

fn token_record(id: &str, kind: TokenKind, by: UserId, device: Option<&DeviceId>) -> TokenRecord {
    TokenRecord {
        id: id.to_owned(),
        kind,
        secret_hash: format!("hash of {id}").into_bytes(),
        created_by: by,
        device_id: device.cloned(),
        role: None,
        created_at: NOW - 60,
        expires_at: NOW + HOUR,
        used_at: None,
        revoked_at: None,
    }
}

/// Stores an unused setup token made by `by`, valid for an hour after [`NOW`].
async fn setup_token(c: &dyn Catalog, id: &str, by: UserId) -> String {
    c.insert_token(&token_record(id, TokenKind::Setup, by, None))
        .await
        .expect("insert setup token");
    id.to_owned()
}

/// Stores an unused share token for `device` made by `by`.
async fn share_token(c: &dyn Catalog, id: &str, by: UserId, device: &DeviceId) -> String {
    c.insert_token(&token_record(id, TokenKind::Share, by, Some(device)))
        .await
        .expect("insert share token");
    id.to_owned()
}

/// Stores an unused share token for `device` made by `by`, granting `role`.
async fn role_token(c: &dyn Catalog, by: UserId, device: &DeviceId, role: Role) -> String {
    let id = format!("share-{}", uuid::Uuid::new_v4());
    let mut record = token_record(&id, TokenKind::Share, by, Some(device));
    record.role = Some(role);
    c.insert_token(&record).await.expect("insert share token");
    id
}

async fn user(c: &dyn Catalog, name: &str) -> User {
    c.create_user(name).await.expect("create user")
}

/// Enrols a device named `name` owned by `owner`, through a fresh setup token.
async fn enrolled(c: &dyn Catalog, owner: &User, name: &str) -> DeviceId {
    let id = new_device_id();
    let token = setup_token(c, &format!("setup-{}", uuid::Uuid::new_v4()), owner.id).await;
    c.enrol_device(&token, NOW, &config(&id, name))
        .await
        .expect("enrol device");
    id
}

fn owner(u: &User) -> Member {
    Member {
        id: u.id,
        name: u.name.clone(),
        role: Role::Owner,
    }
}

fn plain_user(u: &User) -> Member {
    Member {
        id: u.id,
        name: u.name.clone(),
        role: Role::User,
    }
}

/// Whether `user` is an owner of `device`.
async fn owns(c: &dyn Catalog, device: &DeviceId, user: UserId) -> bool {
    c.role_of(device, user).await.expect("role_of") == Some(Role::Owner)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
        .try_into()
        .expect("seconds fit i64")
}

// ---------------------------------------------------------------------------------------
// The suite
// ---------------------------------------------------------------------------------------

async fn ping_works(c: Arc<dyn Catalog>) {
    c.ping().await.expect("ping");
}

async fn write_probes_commit(c: Arc<dyn Catalog>) {
    c.probe_write(NOW).await.expect("first probe");
    c.probe_write(NOW + 1)
        .await
        .expect("a probe rewrites the same row");
}

async fn hub_secrets_are_read_and_removed(c: Arc<dyn Catalog>) {
    assert_eq!(c.hub_secret("k").await.expect("read"), None);
    c.hub_secret_or_insert("k", b"v").await.expect("insert");
    c.hub_secret_or_insert("j", b"w").await.expect("insert");
    assert_eq!(c.hub_secret("k").await.expect("read"), Some(b"v".to_vec()));
    c.remove_hub_secrets(&["k", "never stored"])
        .await
        .expect("remove");
    assert_eq!(c.hub_secret("k").await.expect("read"), None);
    assert_eq!(c.hub_secret("j").await.expect("read"), Some(b"w".to_vec()));
}

async fn hub_secret_is_stored_once(c: Arc<dyn Catalog>) {
    let first = c
        .hub_secret_or_insert("device_id_key", b"first candidate")
        .await
        .expect("first call");
    assert_eq!(first, b"first candidate");
    let again = c
        .hub_secret_or_insert("device_id_key", b"second candidate")
        .await
        .expect("second call");
    assert_eq!(again, b"first candidate", "the first stored value wins");
    let other = c
        .hub_secret_or_insert("jwt_key", &[0, 1, 2, 255])
        .await
        .expect("another name");
    assert_eq!(
        other,
        vec![0, 1, 2, 255],
        "names are independent, bytes exact"
    );
}

async fn hub_secret_concurrent_callers_agree(c: Arc<dyn Catalog>) {
    let tasks: Vec<_> = (0u8..8)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { c.hub_secret_or_insert("shared", &[i; 32]).await })
        })
        .collect();
    let mut values = Vec::new();
    for task in tasks {
        values.push(task.await.expect("task").expect("hub_secret_or_insert"));
    }
    let first = values[0].clone();
    assert!(
        values.iter().all(|v| *v == first),
        "every caller gets one value: {values:?}"
    );
    assert!(
        (0u8..8).any(|i| first == [i; 32]),
        "it is one of the candidates"
    );
    let later = c
        .hub_secret_or_insert("shared", b"late")
        .await
        .expect("later call");
    assert_eq!(later, first);
}

async fn users_round_trip(c: Arc<dyn Catalog>) {
    let before = unix_now();
    let alice = user(&*c, "alice").await;
    let after = unix_now();
    assert_eq!(alice.name, "alice");
    assert_eq!(alice.id.0.get_version_num(), 4, "user ids are uuid v4");
    assert!(
        (before..=after).contains(&alice.created_at),
        "created_at {} is now ({before}..={after})",
        alice.created_at
    );
    let bob = user(&*c, "bob").await;
    assert_ne!(alice.id, bob.id);

    let by_name = c.user_by_name("alice").await.expect("user_by_name");
    assert_eq!(by_name, Some(alice.clone()));
    let by_id = c.user(alice.id).await.expect("user");
    assert_eq!(by_id, Some(alice.clone()));
    assert_eq!(c.user(bob.id).await.expect("user"), Some(bob));

    assert_eq!(c.user_by_name("carol").await.expect("unknown name"), None);
    assert_eq!(c.user_by_name("Alice").await.expect("case differs"), None);
    let nobody = UserId(uuid::Uuid::new_v4());
    assert_eq!(c.user(nobody).await.expect("unknown id"), None);
}

async fn duplicate_user_name_conflicts(c: Arc<dyn Catalog>) {
    let alice = user(&*c, "alice").await;
    let err = c.create_user("alice").await.expect_err("name is taken");
    assert!(matches!(err, CatalogError::Conflict(_)), "got {err:?}");
    assert_eq!(
        c.user_by_name("alice").await.expect("lookup"),
        Some(alice),
        "the first user is untouched"
    );
}

async fn api_keys_round_trip(c: Arc<dyn Catalog>) {
    let alice = user(&*c, "alice").await;
    let key = ApiKeyRecord::unlimited("ak_0123456789".into(), alice.id, (0u8..=255).collect(), NOW);
    c.insert_api_key(&key).await.expect("insert api key");
    assert_eq!(
        c.api_key("ak_0123456789").await.expect("api_key"),
        Some(key.clone())
    );
    assert_eq!(c.api_key("ak_unknown").await.expect("unknown key"), None);
    let err = c.insert_api_key(&key).await.expect_err("same key id twice");
    assert!(matches!(err, CatalogError::Conflict(_)), "got {err:?}");
}

async fn tokens_round_trip(c: Arc<dyn Catalog>) {
    let alice = user(&*c, "alice").await;
    let setup = token_record("st_1", TokenKind::Setup, alice.id, None);
    c.insert_token(&setup).await.expect("insert setup token");
    assert_eq!(c.token("st_1").await.expect("token"), Some(setup.clone()));

    let device = enrolled(&*c, &alice, "pi").await;
    let mut share = token_record("sh_1", TokenKind::Share, alice.id, Some(&device));
    share.secret_hash = vec![0, 0, 7, 255];
    share.expires_at = NOW + 7 * 24 * HOUR;
    c.insert_token(&share).await.expect("insert share token");
    assert_eq!(c.token("sh_1").await.expect("token"), Some(share.clone()));

    assert_eq!(c.token("nope").await.expect("unknown token"), None);
    let err = c
        .insert_token(&setup)
        .await
        .expect_err("same token id twice");
    assert!(matches!(err, CatalogError::Conflict(_)), "got {err:?}");
}

async fn revoked_sessions_are_kept_until_they_expire(c: Arc<dyn Catalog>) {
    c.revoke_session("s1", NOW + 60, NOW).await.expect("revoke");
    c.revoke_session("s2", NOW + 10, NOW).await.expect("revoke");
    c.revoke_session("s1", NOW + 60, NOW)
        .await
        .expect("revoking twice is fine");
    let mut kept = c.revoked_sessions(NOW).await.expect("list");
    kept.sort();
    assert_eq!(
        kept,
        vec![("s1".to_owned(), NOW + 60), ("s2".to_owned(), NOW + 10)]
    );
    assert_eq!(
        c.revoked_sessions(NOW + 10).await.expect("list"),
        vec![("s1".to_owned(), NOW + 60)],
        "a session past its expiry needs no revocation"
    );
    // Revoking prunes what has expired.
    c.revoke_session("s3", NOW + 90, NOW + 61)
        .await
        .expect("revoke");
    assert_eq!(
        c.revoked_sessions(NOW).await.expect("list"),
        vec![("s3".to_owned(), NOW + 90)]
    );
}

async fn tokens_are_listed_by_creator_and_revoked_only_unused(c: Arc<dyn Catalog>) {
    let alice = user(&*c, "alice").await;
    let bob = user(&*c, "bob").await;
    let device = enrolled(&*c, &alice, "nas").await;
    let mut older = token_record("st_old", TokenKind::Setup, alice.id, None);
    older.created_at = NOW - 120;
    c.insert_token(&older).await.expect("insert");
    let mut newer = token_record("sh_new", TokenKind::Share, alice.id, Some(&device));
    newer.created_at = NOW - 30;
    c.insert_token(&newer).await.expect("insert");
    let share = newer.id;
    setup_token(&*c, "st_bob", bob.id).await;
    let listed: Vec<String> = c
        .tokens_created_by(alice.id, 10)
        .await
        .expect("list")
        .into_iter()
        .map(|t| t.id)
        .collect();
    // Newest first: the share token, enrolled()'s spent setup token, the oldest.
    assert_eq!(listed.first().map(String::as_str), Some("sh_new"));
    assert_eq!(listed.last().map(String::as_str), Some("st_old"));
    assert!(!listed.iter().any(|t| t == "st_bob"), "{listed:?}");
    assert_eq!(
        c.tokens_created_by(alice.id, 1).await.expect("list").len(),
        1
    );

    // Someone else's token: nothing to revoke, and it stays usable.
    assert_eq!(
        c.revoke_token("st_bob", alice.id, NOW)
            .await
            .expect("revoke"),
        None
    );
    let revoked = c
        .revoke_token(&share, alice.id, NOW)
        .await
        .expect("revoke")
        .expect("alice's token");
    assert_eq!(revoked.revoked_at, Some(NOW));
    let again = c
        .revoke_token(&share, alice.id, NOW + 5)
        .await
        .expect("revoke again")
        .expect("still there");
    assert_eq!(again.revoked_at, Some(NOW), "the first revocation stands");
    let err = c
        .claim_share(&share, NOW + 6, bob.id)
        .await
        .expect_err("a revoked token is spent");
    assert!(matches!(err, CatalogError::TokenUnavailable), "got {err:?}");
    assert!(!owns(c.as_ref(), &device, bob.id).await);

    // A used token cannot be revoked: the record says it was used.
    let used = c
        .tokens_created_by(alice.id, 10)
        .await
        .expect("list")
        .into_iter()
        .find(|t| t.used_at.is_some())
        .expect("enrolled() used a setup token");
    let after = c
        .revoke_token(&used.id, alice.id, NOW)
        .await
        .expect("revoke")
        .expect("alice's token");
    assert_eq!((after.used_at, after.revoked_at), (used.used_at, None));

    let revoked_setup = setup_token(&*c, "st_rev", alice.id).await;
    c.revoke_token(&revoked_setup, alice.id, NOW)
        .await
        .expect("revoke");
    let err = c
        .enrol_device(&revoked_setup, NOW + 1, &config(&new_device_id(), "x"))
        .await
        .expect_err("a revoked setup token enrols nothing");
    assert!(matches!(err, CatalogError::TokenUnavailable), "got {err:?}");
}

async fn enrol_creates_device_owned_by_token_creator(c: Arc<dyn Catalog>) {
    let alice = user(&*c, "alice").await;
    let token = setup_token(&*c, "st_enrol", alice.id).await;
    let id = new_device_id();
    let cfg = config(&id, "kitchen-pi");
    let record = c
        .enrol_device(&token, NOW, &cfg)
        .await
        .expect("enrol device");
    assert_eq!(record.id, id);
    assert_eq!(record.name, "kitchen-pi");
    assert_eq!(record.services, cfg.services);
    assert_eq!(record.capabilities, cfg.capabilities);
    assert_eq!(record.location.as_deref(), Some("kitchen"));
    assert_eq!(record.created_at, NOW);
    assert_eq!(record.members, vec![owner(&alice)]);

    assert_eq!(c.device(&id).await.expect("device"), Some(record.clone()));
    assert_eq!(
        c.devices_of(alice.id).await.expect("devices_of"),
        vec![record]
    );
    assert!(owns(c.as_ref(), &id, alice.id).await);
    let used = c.token(&token).await.expect("token").expect("token exists");
    assert_eq!(used.used_at, Some(NOW), "the token is marked used");
}

async fn enrol_twice_with_same_token_is_refused(c: Arc<dyn Catalog>) {
    let alice = user(&*c, "alice").await;
    let token = setup_token(&*c, "st_once", alice.id).await;
    let first = new_device_id();
    c.enrol_device(&token, NOW, &config(&first, "one"))
        .await
        .expect("first enrol");
    let second = new_device_id();
    let err = c
        .enrol_device(&token, NOW + 1, &config(&second, "two"))
        .await
        .expect_err("token already used");
    assert!(matches!(err, CatalogError::TokenUnavailable), "got {err:?}");
    assert_eq!(c.device(&second).await.expect("device"), None);
    let used = c.token(&token).await.expect("token").expect("token exists");
    assert_eq!(used.used_at, Some(NOW), "the first use is kept");
}

async fn enrol_with_expired_or_unknown_token_is_refused(c: Arc<dyn Catalog>) {
    let alice = user(&*c, "alice").await;
    let mut expired = token_record("st_old", TokenKind::Setup, alice.id, None);
    expired.expires_at = NOW;
    c.insert_token(&expired).await.expect("insert token");
    let id = new_device_id();

    // `expires_at` itself is already too late.
    let err = c
        .enrol_device("st_old", NOW, &config(&id, "late"))
        .await
        .expect_err("expired token");
    assert!(matches!(err, CatalogError::TokenUnavailable), "got {err:?}");
    let err = c
        .enrol_device("st_old", NOW + HOUR, &config(&id, "later"))
        .await
        .expect_err("expired token");
    assert!(matches!(err, CatalogError::TokenUnavailable), "got {err:?}");
    let err = c
        .enrol_device("st_missing", NOW, &config(&id, "nobody's"))
        .await
        .expect_err("unknown token");
    assert!(matches!(err, CatalogError::TokenUnavailable), "got {err:?}");

    assert_eq!(
        c.device(&id).await.expect("device"),
        None,
        "nothing created"
    );
    assert!(c.devices_of(alice.id).await.expect("devices_of").is_empty());
    let token = c.token("st_old").await.expect("token").expect("exists");
    assert_eq!(token.used_at, None, "a refused token is not marked used");

    // One second before expiry still works.
    let fresh = setup_token(&*c, "st_edge", alice.id).await;
    c.enrol_device(&fresh, NOW + HOUR - 1, &config(&id, "just in time"))
        .await
        .expect("enrol just before expiry");
}

async fn enrol_with_share_token_is_refused(c: Arc<dyn Catalog>) {
    let alice = user(&*c, "alice").await;
    let device = enrolled(&*c, &alice, "pi").await;
    let share = share_token(&*c, "sh_not_setup", alice.id, &device).await;
    let id = new_device_id();
    let err = c
        .enrol_device(&share, NOW, &config(&id, "sneaky"))
        .await
        .expect_err("a share token does not enrol");
    assert!(matches!(err, CatalogError::TokenUnavailable), "got {err:?}");
    assert_eq!(c.device(&id).await.expect("device"), None);
    let token = c.token(&share).await.expect("token").expect("exists");
    assert_eq!(token.used_at, None);
}

async fn enrol_existing_device_conflicts_and_keeps_token(c: Arc<dyn Catalog>) {
    let alice = user(&*c, "alice").await;
    let bob = user(&*c, "bob").await;
    let id = enrolled(&*c, &alice, "original").await;

    let token = setup_token(&*c, "st_bob", bob.id).await;
    let err = c
        .enrol_device(&token, NOW, &config(&id, "impostor"))
        .await
        .expect_err("device exists");
    assert!(matches!(err, CatalogError::Conflict(_)), "got {err:?}");

    let token_after = c.token(&token).await.expect("token").expect("exists");
    assert_eq!(
        token_after.used_at, None,
        "the token update was rolled back"
    );
    let device = c.device(&id).await.expect("device").expect("exists");
    assert_eq!(device.name, "original", "the device is untouched");
    assert_eq!(
        device.members,
        vec![owner(&alice)],
        "bob did not become an owner"
    );
    assert!(!owns(c.as_ref(), &id, bob.id).await);

    // The token is still good for another device.
    let other = new_device_id();
    c.enrol_device(&token, NOW, &config(&other, "bob's"))
        .await
        .expect("token still usable");
}

async fn concurrent_enrols_with_one_token_one_wins(c: Arc<dyn Catalog>) {
    let alice = user(&*c, "alice").await;
    let token = setup_token(&*c, "st_race", alice.id).await;
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let c = c.clone();
            let token = token.clone();
            tokio::spawn(async move {
                let cfg = config(&new_device_id(), &format!("racer-{i}"));
                c.enrol_device(&token, NOW, &cfg).await
            })
        })
        .collect();
    let mut wins = 0;
    for task in tasks {
        match task.await.expect("task") {
            Ok(_) => wins += 1,
            Err(CatalogError::TokenUnavailable) => {}
            Err(e) => panic!("unexpected error from a losing enrol: {e:?}"),
        }
    }
    assert_eq!(wins, 1, "exactly one enrol succeeds");
    let devices = c.devices_of(alice.id).await.expect("devices_of");
    assert_eq!(devices.len(), 1, "exactly one device exists: {devices:?}");
}

async fn claim_share_adds_co_owner(c: Arc<dyn Catalog>) {
    // Named so that the co-owner sorts first.
    let zoe = user(&*c, "zoe").await;
    let bob = user(&*c, "bob").await;
    let id = enrolled(&*c, &zoe, "nas").await;
    let token = share_token(&*c, "sh_nas", zoe.id, &id).await;

    assert!(!owns(c.as_ref(), &id, bob.id).await);
    let claimed = c.claim_share(&token, NOW, bob.id).await.expect("claim");
    assert_eq!(claimed, id);

    let device = c.device(&id).await.expect("device").expect("exists");
    assert_eq!(
        device.members,
        vec![owner(&bob), owner(&zoe)],
        "ordered by name"
    );
    let bobs = c.devices_of(bob.id).await.expect("devices_of");
    assert_eq!(bobs, vec![device.clone()]);
    assert_eq!(
        c.devices_of(zoe.id).await.expect("devices_of"),
        vec![device]
    );
    assert!(owns(c.as_ref(), &id, bob.id).await);
    let used = c.token(&token).await.expect("token").expect("exists");
    assert_eq!(used.used_at, Some(NOW));
}

async fn claim_share_twice_is_refused(c: Arc<dyn Catalog>) {
    let alice = user(&*c, "alice").await;
    let bob = user(&*c, "bob").await;
    let carol = user(&*c, "carol").await;
    let id = enrolled(&*c, &alice, "nas").await;
    let token = share_token(&*c, "sh_once", alice.id, &id).await;
    c.claim_share(&token, NOW, bob.id)
        .await
        .expect("first claim");
    let err = c
        .claim_share(&token, NOW + 1, carol.id)
        .await
        .expect_err("token already used");
    assert!(matches!(err, CatalogError::TokenUnavailable), "got {err:?}");
    assert!(!owns(c.as_ref(), &id, carol.id).await);
    let err = c
        .claim_share(&token, NOW + 2, bob.id)
        .await
        .expect_err("not even by the same user");
    assert!(matches!(err, CatalogError::TokenUnavailable), "got {err:?}");
}

async fn claim_share_with_setup_or_expired_token_is_refused(c: Arc<dyn Catalog>) {
    let alice = user(&*c, "alice").await;
    let bob = user(&*c, "bob").await;
    let id = enrolled(&*c, &alice, "nas").await;

    let setup = setup_token(&*c, "st_not_share", alice.id).await;
    let err = c
        .claim_share(&setup, NOW, bob.id)
        .await
        .expect_err("a setup token does not share");
    assert!(matches!(err, CatalogError::TokenUnavailable), "got {err:?}");
    let token = c.token(&setup).await.expect("token").expect("exists");
    assert_eq!(token.used_at, None, "the setup token is not consumed");

    let mut expired = token_record("sh_old", TokenKind::Share, alice.id, Some(&id));
    expired.expires_at = NOW;
    c.insert_token(&expired).await.expect("insert token");
    let err = c
        .claim_share("sh_old", NOW, bob.id)
        .await
        .expect_err("expired token");
    assert!(matches!(err, CatalogError::TokenUnavailable), "got {err:?}");
    let err = c
        .claim_share("sh_missing", NOW, bob.id)
        .await
        .expect_err("unknown token");
    assert!(matches!(err, CatalogError::TokenUnavailable), "got {err:?}");

    assert!(!owns(c.as_ref(), &id, bob.id).await);
    assert!(c.devices_of(bob.id).await.expect("devices_of").is_empty());
}

async fn owner_claiming_own_share_adds_no_duplicate(c: Arc<dyn Catalog>) {
    let alice = user(&*c, "alice").await;
    let id = enrolled(&*c, &alice, "nas").await;
    let token = share_token(&*c, "sh_self", alice.id, &id).await;
    let claimed = c
        .claim_share(&token, NOW, alice.id)
        .await
        .expect("claiming one's own share is allowed");
    assert_eq!(claimed, id);
    let device = c.device(&id).await.expect("device").expect("exists");
    assert_eq!(device.members, vec![owner(&alice)], "no duplicate owner");
    let devices = c.devices_of(alice.id).await.expect("devices_of");
    assert_eq!(devices.len(), 1, "listed once: {devices:?}");
}

async fn concurrent_claims_with_one_token_one_wins(c: Arc<dyn Catalog>) {
    let alice = user(&*c, "alice").await;
    let id = enrolled(&*c, &alice, "nas").await;
    let token = share_token(&*c, "sh_race", alice.id, &id).await;
    let mut claimants = Vec::new();
    for i in 0..4 {
        claimants.push(user(&*c, &format!("claimant-{i}")).await);
    }
    let tasks: Vec<_> = claimants
        .iter()
        .map(|u| {
            let c = c.clone();
            let token = token.clone();
            let who = u.id;
            tokio::spawn(async move { c.claim_share(&token, NOW, who).await })
        })
        .collect();
    let mut wins = 0;
    for task in tasks {
        match task.await.expect("task") {
            Ok(got) => {
                assert_eq!(got, id);
                wins += 1;
            }
            Err(CatalogError::TokenUnavailable) => {}
            Err(e) => panic!("unexpected error from a losing claim: {e:?}"),
        }
    }
    assert_eq!(wins, 1, "exactly one claim succeeds");
    let device = c.device(&id).await.expect("device").expect("exists");
    assert_eq!(
        device.members.len(),
        2,
        "alice and one claimant: {device:?}"
    );
}

async fn devices_of_is_ordered_and_isolated(c: Arc<dyn Catalog>) {
    let alice = user(&*c, "alice").await;
    let bob = user(&*c, "bob").await;
    let zeta = enrolled(&*c, &alice, "zeta").await;
    let alpha = enrolled(&*c, &alice, "alpha").await;
    let twin_a = enrolled(&*c, &alice, "twin").await;
    let twin_b = enrolled(&*c, &alice, "twin").await;
    let bobs = enrolled(&*c, &bob, "bobs-box").await;

    let mut twins = [twin_a, twin_b];
    twins.sort();
    let expected = vec![alpha.clone(), twins[0].clone(), twins[1].clone(), zeta];
    let listed: Vec<DeviceId> = c
        .devices_of(alice.id)
        .await
        .expect("devices_of")
        .into_iter()
        .map(|d| {
            assert_eq!(d.members, vec![owner(&alice)]);
            d.id
        })
        .collect();
    assert_eq!(listed, expected, "ordered by name, then id");

    let bob_list = c.devices_of(bob.id).await.expect("devices_of");
    assert_eq!(bob_list.len(), 1);
    assert_eq!(bob_list[0].id, bobs);
    assert_eq!(bob_list[0].members, vec![owner(&bob)]);

    // After sharing one device, each list carries the full owner list of that device.
    let token = share_token(&*c, "sh_alpha", alice.id, &alpha).await;
    c.claim_share(&token, NOW, bob.id).await.expect("claim");
    let bob_list = c.devices_of(bob.id).await.expect("devices_of");
    let names: Vec<&str> = bob_list.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["alpha", "bobs-box"]);
    assert_eq!(bob_list[0].members, vec![owner(&alice), owner(&bob)]);
    assert_eq!(bob_list[1].members, vec![owner(&bob)]);
    let alice_list = c.devices_of(alice.id).await.expect("devices_of");
    assert_eq!(alice_list.len(), 4, "bob's own device is not alice's");
    assert_eq!(alice_list[0].members, vec![owner(&alice), owner(&bob)]);

    let nobody = UserId(uuid::Uuid::new_v4());
    assert!(c.devices_of(nobody).await.expect("devices_of").is_empty());
}

async fn is_owner_reports_ownership(c: Arc<dyn Catalog>) {
    let alice = user(&*c, "alice").await;
    let bob = user(&*c, "bob").await;
    let id = enrolled(&*c, &alice, "pi").await;
    assert!(owns(c.as_ref(), &id, alice.id).await);
    assert!(!owns(c.as_ref(), &id, bob.id).await);
    let unknown = new_device_id();
    assert!(!owns(c.as_ref(), &unknown, alice.id).await);
    assert_eq!(c.device(&unknown).await.expect("device"), None);
}

async fn update_device_rewrites_config(c: Arc<dyn Catalog>) {
    let alice = user(&*c, "alice").await;
    let id = enrolled(&*c, &alice, "old-name").await;
    let before = c.device(&id).await.expect("device").expect("exists");

    let new = DeviceConfig {
        id: id.clone(),
        name: "new-name".into(),
        services: vec![ServiceInfo {
            name: "grafana".into(),
            port: 3000,
            health_path: Some("/api/health?full=1".into()),
            kind: adi_protocol::ServiceKind::Http,
            models: Vec::new(),
        }],
        capabilities: vec![CapabilityOffer {
            idempotent: true,
            ..offer("embeddings:1.2.0")
        }],
        location: None,
        hardware: Some(Hardware {
            cpu_count: 16,
            ram_total_bytes: 64 << 30,
            gpus: vec![GpuModel {
                name: "NVIDIA H200".into(),
                uuid: "GPU-1".into(),
                memory_total_bytes: 141 << 30,
            }],
        }),
    };
    c.update_device(&new).await.expect("update_device");
    let after = c.device(&id).await.expect("device").expect("exists");
    assert_eq!(after.name, "new-name");
    assert_eq!(
        after.services, new.services,
        "services round-trip, health_path too"
    );
    assert_eq!(after.capabilities, new.capabilities, "idempotent flag too");
    assert_eq!(after.location, None, "location can be cleared");
    assert_eq!(after.hardware, new.hardware, "hardware round-trips");
    assert_eq!(after.created_at, before.created_at, "created_at is kept");
    assert_eq!(after.members, before.members, "owners are kept");

    let empty = DeviceConfig {
        id: id.clone(),
        name: "bare".into(),
        services: Vec::new(),
        capabilities: Vec::new(),
        location: None,
        hardware: None,
    };
    c.update_device(&empty).await.expect("update_device");
    let bare = c.device(&id).await.expect("device").expect("exists");
    assert!(bare.services.is_empty() && bare.capabilities.is_empty());
}

async fn update_unknown_device_is_not_found(c: Arc<dyn Catalog>) {
    let unknown = new_device_id();
    let err = c
        .update_device(&config(&unknown, "ghost"))
        .await
        .expect_err("not enrolled");
    assert!(matches!(err, CatalogError::NotFound(_)), "got {err:?}");
    assert_eq!(c.device(&unknown).await.expect("device"), None);
}

// ---------------------------------------------------------------------------------------
// Backend-specific: data and schema survive a reopen
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn sqlite_reopen_keeps_data() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("catalog.db");
    let first = SqliteCatalog::open(&path).await.expect("open");
    let alice = first.create_user("alice").await.expect("create user");
    let secret = first
        .hub_secret_or_insert("k", b"v1")
        .await
        .expect("secret");
    first.close().await;

    let second = SqliteCatalog::open(&path)
        .await
        .expect("reopen runs migrations again");
    assert_eq!(
        second.user_by_name("alice").await.expect("lookup"),
        Some(alice)
    );
    assert_eq!(
        second
            .hub_secret_or_insert("k", b"v2")
            .await
            .expect("secret"),
        secret
    );
    second.close().await;
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test]
async fn sqlite_catalog_files_are_owner_only_and_loose_ones_tightened() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temporary directory");
    let data = dir.path().join("data");
    let path = data.join("catalog.db");
    let files = ["catalog.db", "catalog.db-wal", "catalog.db-shm"].map(|f| data.join(f));
    let catalog = SqliteCatalog::open(&path).await.expect("open");
    catalog.create_user("alice").await.expect("a write");
    assert_eq!(mode(&data), 0o700);
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    for f in &files {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    let again = SqliteCatalog::open(&path).await.expect("reopen");
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    again.close().await;
    catalog.close().await;
}

/// Opens the catalog at `path`, expecting a refusal; the file must be left as it was.
async fn refused(path: &std::path::Path) -> CatalogError {
    let before = std::fs::read(path).expect("read");
    let err = SqliteCatalog::open(path).await.expect_err("refused");
    assert!(
        std::fs::read(path).expect("read") == before,
        "the file changed"
    );
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    err
}

#[tokio::test]
async fn sqlite_refuses_an_empty_or_foreign_file_without_replacing_it() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("catalog.db");
    std::fs::write(&path, b"").expect("write");
    let err = refused(&path).await;
    assert!(err.to_string().contains("empty"), "{err}");

    std::fs::write(&path, b"not a database at all").expect("write");
    let err = refused(&path).await;
    assert!(err.to_string().contains("not an SQLite database"), "{err}");

    std::fs::remove_file(&path).expect("remove");
    let url = format!("sqlite:{}?mode=rwc", path.display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.expect("create");
    sqlx::query("CREATE TABLE notes (body TEXT)")
        .execute(&mut conn)
        .await
        .expect("table");
    conn.close().await.expect("close");
    let err = refused(&path).await;
    assert!(matches!(err, CatalogError::NotACatalog { .. }), "{err}");
}

#[tokio::test]
async fn sqlite_refuses_a_damaged_catalog_naming_the_first_error() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("catalog.db");
    let catalog = SqliteCatalog::open(&path).await.expect("open");
    catalog.create_user("alice").await.expect("user");
    // Everything into the main file, and its WAL gone, before the damage.
    catalog.close().await;
    let url = format!("sqlite:{}", path.display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.expect("open");
    let root: i64 = sqlx::query_scalar("SELECT rootpage FROM sqlite_schema WHERE name = 'users'")
        .fetch_one(&mut conn)
        .await
        .expect("root page");
    // Whatever the pool's closing left in the WAL goes into the main file, and the WAL
    // goes, so the damage below is what SQLite reads.
    sqlx::query("PRAGMA journal_mode = DELETE")
        .execute(&mut conn)
        .await
        .expect("out of WAL mode");
    conn.close().await.expect("close");
    let mut bytes = std::fs::read(&path).expect("read");
    let page_size = usize::from(u16::from_be_bytes([bytes[16], bytes[17]]));
    bytes[(usize::try_from(root).expect("page") - 1) * page_size] = 0;
    std::fs::write(&path, &bytes).expect("write");
    let err = refused(&path).await;
    match &err {
        CatalogError::Damaged { first_error, .. } => assert!(
            first_error.contains("users"),
            "the first error names what is broken: {err}"
        ),
        other => panic!("not refused as damaged: {other}"),
    }
    assert!(err.to_string().contains("integrity check"), "{err}");
}

#[tokio::test]
async fn sqlite_refuses_a_log_without_its_database() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("catalog.db");
    std::fs::write(dir.path().join("catalog.db-wal"), b"frames").expect("write");
    let err = SqliteCatalog::open(&path).await.expect_err("refused");
    assert!(matches!(err, CatalogError::NotACatalog { .. }), "{err}");
    assert!(!path.exists(), "no new catalog was made");
}

#[tokio::test]
async fn sqlite_creation_leaves_nothing_half_made_and_racers_share_one_file() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("catalog.db");
    let (a, b) = tokio::join!(SqliteCatalog::open(&path), SqliteCatalog::open(&path));
    let (a, b) = (a.expect("first"), b.expect("second"));
    let alice = a.create_user("alice").await.expect("user");
    assert_eq!(
        b.user_by_name("alice").await.expect("lookup"),
        Some(alice),
        "one file"
    );
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["catalog.db", "catalog.db-shm", "catalog.db-wal"]);
    a.close().await;
    b.close().await;
}

#[tokio::test]
async fn postgres_reconnect_keeps_data() {
    with_postgres(SUITE, |options| async move {
        let first = PgCatalog::connect_with(options.clone())
            .await
            .expect("connect");
        let alice = first.create_user("alice").await.expect("create user");
        first.close().await;
        // Two hubs starting at once both run the migrator; it must not fail.
        let (a, b) = tokio::join!(
            PgCatalog::connect_with(options.clone()),
            PgCatalog::connect_with(options)
        );
        let (a, b) = (a.expect("second hub"), b.expect("third hub"));
        assert_eq!(a.user_by_name("alice").await.expect("lookup"), Some(alice));
        b.ping().await.expect("ping");
        a.close().await;
        b.close().await;
    })
    .await;
}

async fn share_tokens_grant_their_role_and_raise_never_lower(c: Arc<dyn Catalog>) {
    let alice = user(&*c, "alice").await;
    let bob = user(&*c, "bob").await;
    let id = enrolled(&*c, &alice, "pi").await;
    let as_user = role_token(&*c, alice.id, &id, Role::User).await;
    assert_eq!(
        c.token(&as_user)
            .await
            .expect("token")
            .expect("stored")
            .role,
        Some(Role::User)
    );
    c.claim_share(&as_user, NOW, bob.id).await.expect("claim");
    let device = c.device(&id).await.expect("device").expect("exists");
    assert_eq!(device.members, vec![owner(&alice), plain_user(&bob)]);
    assert_eq!(device.role_of(bob.id), Some(Role::User));
    assert_eq!(
        c.role_of(&id, bob.id).await.expect("role_of"),
        Some(Role::User)
    );
    assert_eq!(
        c.devices_of(bob.id).await.expect("devices_of")[0].members,
        vec![owner(&alice), plain_user(&bob)],
        "a user sees the device and its members"
    );

    let as_owner = role_token(&*c, alice.id, &id, Role::Owner).await;
    c.claim_share(&as_owner, NOW, bob.id).await.expect("claim");
    assert!(owns(c.as_ref(), &id, bob.id).await, "raised to owner");

    let again = role_token(&*c, alice.id, &id, Role::User).await;
    c.claim_share(&again, NOW, bob.id).await.expect("claim");
    assert!(owns(c.as_ref(), &id, bob.id).await, "never lowered");
}

async fn members_are_removed_but_never_the_last_owner(c: Arc<dyn Catalog>) {
    let alice = user(&*c, "alice").await;
    let bob = user(&*c, "bob").await;
    let carol = user(&*c, "carol").await;
    let id = enrolled(&*c, &alice, "pi").await;
    let token = role_token(&*c, alice.id, &id, Role::User).await;
    c.claim_share(&token, NOW, bob.id).await.expect("claim");

    match c.remove_member(&id, alice.id, NOW).await {
        Err(CatalogError::LastOwner(name)) => assert_eq!(name, "alice"),
        other => panic!("the last owner cannot go: {other:?}"),
    }
    assert!(matches!(
        c.remove_member(&id, carol.id, NOW).await,
        Err(CatalogError::NotFound(_))
    ));
    let left = c.remove_member(&id, bob.id, NOW).await.expect("remove bob");
    assert_eq!(left, vec![owner(&alice)]);
    assert_eq!(c.role_of(&id, bob.id).await.expect("role_of"), None);
    assert!(c.devices_of(bob.id).await.expect("devices_of").is_empty());

    // An owner removed takes the share tokens they made, unused, with them.
    let to_owner = role_token(&*c, alice.id, &id, Role::Owner).await;
    c.claim_share(&to_owner, NOW, carol.id)
        .await
        .expect("claim");
    let carols = role_token(&*c, carol.id, &id, Role::User).await;
    let alices = role_token(&*c, alice.id, &id, Role::User).await;
    let left = c
        .remove_member(&id, alice.id, NOW + 5)
        .await
        .expect("remove alice");
    assert_eq!(left, vec![owner(&carol)], "another owner is left");
    let revoked = c.token(&alices).await.expect("token").expect("kept");
    assert_eq!(revoked.revoked_at, Some(NOW + 5));
    let kept = c.token(&carols).await.expect("token").expect("kept");
    assert_eq!(kept.revoked_at, None, "other owners' tokens stay");
}

async fn roles_change_in_place_but_never_leave_a_device_without_an_owner(c: Arc<dyn Catalog>) {
    let alice = user(&*c, "alice").await;
    let bob = user(&*c, "bob").await;
    let carol = user(&*c, "carol").await;
    let id = enrolled(&*c, &alice, "pi").await;
    let other = enrolled(&*c, &alice, "other").await;
    let token = role_token(&*c, alice.id, &id, Role::User).await;
    c.claim_share(&token, NOW, bob.id).await.expect("claim");
    let alices = role_token(&*c, alice.id, &id, Role::Owner).await;

    match c.set_role(&id, alice.id, Role::User, NOW).await {
        Err(CatalogError::LastOwner(name)) => assert_eq!(name, "alice"),
        other => panic!("the last owner stays one: {other:?}"),
    }
    assert!(matches!(
        c.set_role(&id, carol.id, Role::Owner, NOW).await,
        Err(CatalogError::NotFound(_))
    ));
    assert!(matches!(
        c.set_role(&other, bob.id, Role::Owner, NOW).await,
        Err(CatalogError::NotFound(_))
    ));

    let before = c.last_change().await.expect("last change");
    let members = c
        .set_role(&id, bob.id, Role::Owner, NOW)
        .await
        .expect("raise bob");
    assert_eq!(members, vec![owner(&alice), owner(&bob)]);
    assert_eq!(
        c.role_of(&id, bob.id).await.expect("role_of"),
        Some(Role::Owner)
    );
    assert_eq!(
        c.role_of(&other, bob.id).await.expect("role_of"),
        None,
        "only that device"
    );
    let changed: Vec<(ChangeKind, String)> = c
        .changes_since(before, 100)
        .await
        .expect("changes")
        .into_iter()
        .map(|ch| (ch.kind, ch.subject))
        .collect();
    assert_eq!(changed, vec![(ChangeKind::Device, id.to_string())]);

    // Now either may step down, but not both; an owner who does takes the share tokens
    // they made, unused, with them (a user may not share).
    let bobs = role_token(&*c, bob.id, &id, Role::User).await;
    let members = c
        .set_role(&id, alice.id, Role::User, NOW + 1)
        .await
        .expect("alice steps down");
    assert_eq!(members, vec![owner(&bob), plain_user(&alice)]);
    match c.set_role(&id, bob.id, Role::User, NOW + 2).await {
        Err(CatalogError::LastOwner(name)) => assert_eq!(name, "bob"),
        other => panic!("bob is the last owner now: {other:?}"),
    }
    // Giving a member the role they have changes nothing.
    let same = c
        .set_role(&id, bob.id, Role::Owner, NOW + 3)
        .await
        .expect("same role");
    assert_eq!(same, vec![owner(&bob), plain_user(&alice)]);
    let listed = c.devices_of(alice.id).await.expect("devices_of");
    let pi = listed.iter().find(|d| d.id == id).expect("listed");
    assert_eq!(
        pi.members,
        vec![owner(&bob), plain_user(&alice)],
        "the device's members everywhere"
    );
    let revoked = c.token(&alices).await.expect("token").expect("kept");
    assert_eq!(revoked.revoked_at, Some(NOW + 1));
    let kept = c.token(&bobs).await.expect("token").expect("kept");
    assert_eq!(kept.revoked_at, None, "other owners' tokens stay");
}

async fn deleted_devices_are_forgotten_and_remembered_as_removed(c: Arc<dyn Catalog>) {
    let alice = user(&*c, "alice").await;
    let bob = user(&*c, "bob").await;
    let id = enrolled(&*c, &alice, "pi").await;
    let other = enrolled(&*c, &alice, "other").await;
    let claimed = role_token(&*c, alice.id, &id, Role::User).await;
    c.claim_share(&claimed, NOW, bob.id).await.expect("claim");
    let outstanding = role_token(&*c, alice.id, &id, Role::User).await;
    assert!(!c.is_removed(&id).await.expect("is_removed"));

    assert!(c.delete_device(&id, NOW).await.expect("delete"));
    assert_eq!(c.device(&id).await.expect("device"), None);
    assert!(c.is_removed(&id).await.expect("is_removed"));
    assert_eq!(c.token(&outstanding).await.expect("token"), None);
    assert_eq!(c.role_of(&id, bob.id).await.expect("role_of"), None);
    assert!(c.devices_of(bob.id).await.expect("devices_of").is_empty());
    let alices: Vec<DeviceId> = c
        .devices_of(alice.id)
        .await
        .expect("devices_of")
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(alices, vec![other.clone()], "only that device went");
    assert!(!c.is_removed(&other).await.expect("is_removed"));
    assert!(!c.delete_device(&id, NOW).await.expect("delete again"));

    // A new setup token enrols it again, as a new device of whoever made the token.
    let token = setup_token(&*c, "setup-again", bob.id).await;
    let record = c
        .enrol_device(&token, NOW, &config(&id, "pi"))
        .await
        .expect("enrol again");
    assert_eq!(record.members, vec![owner(&bob)]);
    assert!(!c.is_removed(&id).await.expect("is_removed"));
}

fn named_key(id: &str, user: UserId, name: &str, created_at: i64) -> ApiKeyRecord {
    let mut key = ApiKeyRecord::unlimited(id.into(), user, vec![1, 2, 3], created_at);
    key.name = Some(name.into());
    key
}

async fn api_keys_are_named_scoped_listed_and_revoked(c: Arc<dyn Catalog>) {
    let alice = user(&*c, "alice").await;
    let bob = user(&*c, "bob").await;
    let device = enrolled(&*c, &alice, "pi").await;
    let mut narrow = named_key("k_narrow", alice.id, "ci", NOW);
    narrow.scopes = Some(vec![Scope::DevicesRead, Scope::Proxy]);
    narrow.devices = Some(vec![device.clone()]);
    narrow.expires_at = Some(NOW + HOUR);
    c.insert_api_key(&narrow).await.expect("insert");
    assert_eq!(
        c.api_key("k_narrow").await.expect("api_key"),
        Some(narrow.clone())
    );
    let wide = named_key("k_wide", alice.id, "laptop", NOW + 1);
    c.insert_api_key(&wide).await.expect("insert");
    match c
        .insert_api_key(&named_key("k_again", alice.id, "ci", NOW + 2))
        .await
    {
        Err(CatalogError::Conflict(what)) => assert!(what.contains("\"ci\""), "{what}"),
        other => panic!("a live name is taken: {other:?}"),
    }
    c.insert_api_key(&named_key("k_bobs", bob.id, "ci", NOW))
        .await
        .expect("names are per user");
    let ids = |keys: Vec<ApiKeyRecord>| keys.into_iter().map(|k| k.key_id).collect::<Vec<_>>();
    assert_eq!(
        ids(c.api_keys_of(alice.id).await.expect("list")),
        vec!["k_wide", "k_narrow"],
        "newest first, only hers"
    );

    assert_eq!(
        c.revoke_api_key(bob.id, "k_narrow", NOW + 5)
            .await
            .expect("revoke"),
        None,
        "nobody revokes another user's key"
    );
    let revoked = c
        .revoke_api_key(alice.id, "k_narrow", NOW + 5)
        .await
        .expect("revoke")
        .expect("hers");
    assert_eq!(revoked.revoked_at, Some(NOW + 5));
    let again = c
        .revoke_api_key(alice.id, "k_narrow", NOW + 9)
        .await
        .expect("revoke")
        .expect("hers");
    assert_eq!(again.revoked_at, Some(NOW + 5), "revoked once");
    assert_eq!(
        c.revoked_api_keys().await.expect("revoked"),
        vec!["k_narrow"]
    );
    c.insert_api_key(&named_key("k_ci2", alice.id, "ci", NOW + 10))
        .await
        .expect("a revoked key's name is free again");
    let keys: Vec<ChangeKind> = c
        .changes_since(0, 100)
        .await
        .expect("changes")
        .into_iter()
        .filter(|ch| ch.subject == "k_narrow")
        .map(|ch| ch.kind)
        .collect();
    assert_eq!(
        keys,
        vec![ChangeKind::Key],
        "one change, for the one revocation"
    );
}

async fn users_are_disabled_enabled_and_removed_without_orphaning_devices(c: Arc<dyn Catalog>) {
    let alice = user(&*c, "alice").await;
    let bob = user(&*c, "bob").await;
    let carol = user(&*c, "carol").await;
    let names: Vec<String> = c
        .users()
        .await
        .expect("users")
        .into_iter()
        .map(|u| u.name)
        .collect();
    assert_eq!(names, vec!["alice", "bob", "carol"]);

    assert!(c
        .set_user_disabled(bob.id, Some(NOW), NOW)
        .await
        .expect("disable"));
    let found = c.user(bob.id).await.expect("user").expect("exists");
    assert_eq!(found.disabled_at, Some(NOW));
    assert!(c
        .set_user_disabled(bob.id, None, NOW)
        .await
        .expect("enable"));
    assert_eq!(
        c.user(bob.id)
            .await
            .expect("user")
            .expect("exists")
            .disabled_at,
        None
    );
    let nobody = UserId(uuid::Uuid::new_v4());
    assert!(!c
        .set_user_disabled(nobody, Some(NOW), NOW)
        .await
        .expect("disable nobody"));

    // Bob alone owns "solo"; alice and bob own "shared"; bob uses alice's "hers".
    let solo = enrolled(&*c, &bob, "solo").await;
    let shared = enrolled(&*c, &alice, "shared").await;
    let t = role_token(&*c, alice.id, &shared, Role::Owner).await;
    c.claim_share(&t, NOW, bob.id).await.expect("claim");
    let hers = enrolled(&*c, &alice, "hers").await;
    let t = role_token(&*c, alice.id, &hers, Role::User).await;
    c.claim_share(&t, NOW, bob.id).await.expect("claim");
    c.insert_api_key(&named_key("k_bob", bob.id, "main", NOW))
        .await
        .expect("key");
    setup_token(&*c, "bobs-setup", bob.id).await;

    match c.remove_user(bob.id, Orphans::Refuse, NOW).await {
        Err(CatalogError::WouldOrphan(devices)) => {
            assert_eq!(devices, vec![(solo.clone(), "solo".to_owned())])
        }
        other => panic!("bob is solo's last owner: {other:?}"),
    }
    assert!(
        c.user(bob.id).await.expect("user").is_some(),
        "nothing removed"
    );
    assert!(matches!(
        c.remove_user(bob.id, Orphans::TransferTo(bob.id), NOW)
            .await,
        Err(CatalogError::NotFound(_))
    ));

    let seq = c.last_change().await.expect("last");
    let orphaned = c
        .remove_user(bob.id, Orphans::TransferTo(carol.id), NOW)
        .await
        .expect("remove bob");
    assert_eq!(orphaned, vec![(solo.clone(), "solo".to_owned())]);
    assert_eq!(c.user(bob.id).await.expect("user"), None);
    assert_eq!(c.api_key("k_bob").await.expect("key"), None);
    assert_eq!(c.token("bobs-setup").await.expect("token"), None);
    let solo_now = c.device(&solo).await.expect("device").expect("kept");
    assert_eq!(solo_now.members, vec![owner(&carol)]);
    assert_eq!(
        c.device(&shared)
            .await
            .expect("device")
            .expect("kept")
            .members,
        vec![owner(&alice)]
    );
    assert_eq!(
        c.device(&hers)
            .await
            .expect("device")
            .expect("kept")
            .members,
        vec![owner(&alice)]
    );
    let mut changed: Vec<(ChangeKind, String)> = c
        .changes_since(seq, 100)
        .await
        .expect("changes")
        .into_iter()
        .map(|ch| (ch.kind, ch.subject))
        .collect();
    changed.sort_by(|a, b| a.1.cmp(&b.1));
    let mut expected = vec![
        (ChangeKind::Device, solo.to_string()),
        (ChangeKind::Device, shared.to_string()),
        (ChangeKind::Device, hers.to_string()),
        (ChangeKind::User, bob.id.to_string()),
    ];
    expected.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(changed, expected);

    // Carol, removed with her devices deleted: "solo" goes and is remembered as removed.
    let gone = c
        .remove_user(carol.id, Orphans::Delete, NOW)
        .await
        .expect("remove carol");
    assert_eq!(gone, vec![(solo.clone(), "solo".to_owned())]);
    assert_eq!(c.device(&solo).await.expect("device"), None);
    assert!(c.is_removed(&solo).await.expect("is_removed"));
    assert!(matches!(
        c.remove_user(carol.id, Orphans::Delete, NOW).await,
        Err(CatalogError::NotFound(_))
    ));
}

async fn every_access_change_is_in_the_feed_in_order(c: Arc<dyn Catalog>) {
    assert_eq!(
        c.last_change().await.expect("last"),
        0,
        "a new catalog has none"
    );
    let alice = user(&*c, "alice").await;
    let bob = user(&*c, "bob").await;
    let device = enrolled(&*c, &alice, "pi").await;
    c.revoke_session("s1", NOW + HOUR, NOW)
        .await
        .expect("revoke");
    let first = c.last_change().await.expect("last");
    let t = role_token(&*c, alice.id, &device, Role::User).await;
    c.claim_share(&t, NOW, bob.id).await.expect("claim");
    c.remove_member(&device, bob.id, NOW).await.expect("remove");
    c.set_user_disabled(bob.id, Some(NOW), NOW)
        .await
        .expect("disable");
    c.delete_device(&device, NOW).await.expect("delete");

    let all = c.changes_since(0, 100).await.expect("changes");
    let seen: Vec<(ChangeKind, String)> =
        all.iter().map(|ch| (ch.kind, ch.subject.clone())).collect();
    let d = device.to_string();
    assert_eq!(
        seen,
        vec![
            (ChangeKind::Session, "s1".to_owned()),
            (ChangeKind::Device, d.clone()),
            (ChangeKind::Device, d.clone()),
            (ChangeKind::User, bob.id.to_string()),
            (ChangeKind::Device, d),
        ]
    );
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq), "in order");
    assert_eq!(all[0].seq, first);
    let later = c.changes_since(first, 2).await.expect("changes");
    assert_eq!(later.len(), 2, "limited");
    assert_eq!(later[0].seq, all[1].seq, "only what came after");
    assert_eq!(c.last_change().await.expect("last"), all[4].seq);
    // Entries older than the feed keeps are pruned when the next is written.
    let later = NOW + super::CHANGES_KEPT_SECS + 1;
    c.revoke_session("s2", later + HOUR, later)
        .await
        .expect("revoke");
    let kept = c.changes_since(0, 100).await.expect("changes");
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0].subject, "s2");
}

async fn audit_events_are_read_by_actor_target_and_owner_only(c: Arc<dyn Catalog>) {
    let alice = user(&*c, "alice").await;
    let bob = user(&*c, "bob").await;
    let carol = user(&*c, "carol").await;
    let hers = enrolled(&*c, &alice, "hers").await;
    let t = role_token(&*c, alice.id, &hers, Role::User).await;
    c.claim_share(&t, NOW, bob.id).await.expect("claim");
    let keep = 30 * 86_400;
    let event = |at: i64, kind: &str| AuditEvent {
        at,
        kind: kind.to_owned(),
        ..AuditEvent::default()
    };
    let mut made = event(NOW, "token_created");
    made.actor_user = Some(alice.id);
    made.actor_key = Some("k_alice".into());
    made.device = Some(hers.clone());
    made.source = Some("10.0.0.1".into());
    made.detail = Some("share token abc, role user".into());
    c.record_audit(&made, keep).await.expect("record");
    let mut task = event(NOW + 1, "task_created");
    task.actor_user = Some(bob.id);
    task.device = Some(hers.clone());
    c.record_audit(&task, keep).await.expect("record");
    let mut failed = event(NOW + 2, "sign_in_failed");
    failed.target_user = Some(carol.id);
    failed.actor_key = Some("adi_key_0123".into());
    c.record_audit(&failed, keep).await.expect("record");
    let mut elsewhere = event(NOW + 3, "key_created");
    elsewhere.actor_user = Some(carol.id);
    c.record_audit(&elsewhere, keep).await.expect("record");

    let read = |viewer: UserId, device: Option<DeviceId>, since: i64, limit: u32| {
        let c = c.clone();
        async move {
            c.audit_events(&AuditQuery {
                viewer,
                device,
                since,
                limit,
            })
            .await
            .expect("audit")
            .into_iter()
            .map(|e| e.kind)
            .collect::<Vec<_>>()
        }
    };
    // Alice owns the device: its events, whoever acted; not carol's.
    assert_eq!(
        read(alice.id, None, 0, 100).await,
        vec!["task_created", "token_created"]
    );
    // Bob only uses it: his own actions only.
    assert_eq!(read(bob.id, None, 0, 100).await, vec!["task_created"]);
    // Carol: what she did and what was done to her.
    assert_eq!(
        read(carol.id, None, 0, 100).await,
        vec!["key_created", "sign_in_failed"]
    );
    assert_eq!(
        read(alice.id, None, NOW + 1, 100).await,
        vec!["task_created"]
    );
    assert_eq!(read(alice.id, None, 0, 1).await, vec!["task_created"]);
    let other = new_device_id();
    assert!(read(alice.id, Some(other), 0, 100).await.is_empty());
    let full = c
        .audit_events(&AuditQuery {
            viewer: alice.id,
            device: Some(hers.clone()),
            since: 0,
            limit: 100,
        })
        .await
        .expect("audit");
    let first = full.last().expect("the token event");
    assert_eq!(first.actor_name.as_deref(), Some("alice"));
    assert_eq!(first.actor_key.as_deref(), Some("k_alice"));
    assert_eq!(first.source.as_deref(), Some("10.0.0.1"));
    assert_eq!(first.device.as_ref(), Some(&hers));
    assert!(full[0].seq > first.seq);
    let carols = c
        .audit_events(&AuditQuery {
            viewer: carol.id,
            device: None,
            since: 0,
            limit: 100,
        })
        .await
        .expect("audit");
    assert_eq!(carols[1].target_name.as_deref(), Some("carol"));

    // Retention: a later event prunes what is older than it keeps.
    c.record_audit(&event(NOW + keep + 3, "user_disabled"), keep)
        .await
        .expect("record");
    assert_eq!(read(carol.id, None, 0, 100).await, vec!["key_created"]);
}
