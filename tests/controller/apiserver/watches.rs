//! Watches and lists: bookmarks, timeouts, 410 Gone, paging.

use super::*;

// ---------------------------------------------------------------------------
// e. Watches and lists
// ---------------------------------------------------------------------------

#[tokio::test]
async fn watches_send_bookmarks_when_asked_and_close_after_their_timeout() {
    let (client, fake) = FakeApiServer::start();
    fake.create(NS, "x", spec());
    let api = ubfs(&client);
    let from = rv(&fake, "x");
    let mut with = api
        .watch(&WatchParams::default().timeout(1), &from)
        .await
        .unwrap()
        .boxed();
    let mut without = api
        .watch(&WatchParams::default().disable_bookmarks(), &from)
        .await
        .unwrap()
        .boxed();
    fake.bookmark();
    match tokio::time::timeout(WAIT, with.try_next())
        .await
        .unwrap()
        .unwrap()
    {
        Some(WatchEvent::Bookmark(b)) => assert_eq!(b.metadata.resource_version, from),
        other => panic!("expected a BOOKMARK, got {other:?}"),
    }
    fake.edit_spec(NS, "x", |s| s.run_id = "2".into());
    match tokio::time::timeout(WAIT, without.try_next())
        .await
        .unwrap()
        .unwrap()
    {
        Some(WatchEvent::Modified(_)) => {}
        other => panic!("no BOOKMARK without allowWatchBookmarks, got {other:?}"),
    }
    // The server ends the first watch after its timeoutSeconds.
    let rest: Vec<_> = tokio::time::timeout(WAIT, with.collect::<Vec<_>>())
        .await
        .expect("the server closes the watch");
    assert!(!rest.is_empty(), "the change, then a last BOOKMARK");
}

#[tokio::test]
async fn a_watch_from_a_compacted_resource_version_is_gone() {
    let (client, fake) = FakeApiServer::start();
    fake.create(NS, "x", spec());
    let api = ubfs(&client);
    let old = rv(&fake, "x");
    fake.edit_spec(NS, "x", |s| s.run_id = "2".into());
    // Within history: the change is replayed as it happened.
    let mut replay = api
        .watch(&WatchParams::default(), &old)
        .await
        .unwrap()
        .boxed();
    match tokio::time::timeout(WAIT, replay.try_next())
        .await
        .unwrap()
        .unwrap()
    {
        Some(WatchEvent::Modified(o)) => assert_eq!(o.spec.run_id, "2"),
        other => panic!("expected the replayed change, got {other:?}"),
    }
    fake.compact();
    let mut gone = api
        .watch(&WatchParams::default(), &old)
        .await
        .unwrap()
        .boxed();
    match tokio::time::timeout(WAIT, gone.try_next())
        .await
        .unwrap()
        .unwrap()
    {
        Some(WatchEvent::Error(e)) => assert_eq!(e.code, 410),
        other => panic!("expected 410 Gone, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(WAIT, gone.try_next())
            .await
            .unwrap()
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn lists_page_and_an_expired_continue_token_is_gone() {
    let (client, fake) = FakeApiServer::start();
    for name in ["a", "b", "c"] {
        fake.create(NS, name, spec());
    }
    let api = ubfs(&client);
    let first = api.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(first.items.len(), 2);
    let token = first.metadata.continue_.clone().expect("a continue token");
    let second = api
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(second.items.len(), 1);
    // The last page's token is empty: a custom resource's list carries it
    // as kube-apiserver sends it, `""`.
    assert_eq!(second.metadata.continue_.as_deref(), Some(""));
    assert_eq!(first.metadata.remaining_item_count, Some(1));
    assert_eq!(
        second.metadata.resource_version,
        first.metadata.resource_version
    );

    // resourceVersion=0 comes from the watch cache, whole, whatever the
    // limit (kube itself never sends the two together).
    let request = http::Request::get(format!(
        "/apis/usage.multica.ai/v1alpha1/namespaces/{NS}/usagebackfills?limit=1&resourceVersion=0"
    ))
    .body(Vec::new())
    .unwrap();
    let cached: kube::core::ObjectList<UsageBackfill> = client.request(request).await.unwrap();
    assert_eq!(cached.items.len(), 3);
    assert_eq!(cached.metadata.continue_.as_deref(), Some(""));

    let first = api.list(&ListParams::default().limit(1)).await.unwrap();
    fake.edit_spec(NS, "a", |s| s.run_id = "2".into());
    fake.compact();
    let e = refusal(
        api.list(
            &ListParams::default()
                .limit(1)
                .continue_token(first.metadata.continue_.as_deref().unwrap()),
        )
        .await,
    );
    assert_eq!((e.code, e.reason.as_str()), (410, "Expired"));
}

/// The controller's watches meet 410 Gone after a compaction; it lists
/// again and carries on reconciling.
#[tokio::test]
async fn the_controller_relists_after_410_gone_and_carries_on() {
    let (client, fake) = FakeApiServer::start();
    let ctx = controller::Context::new(client, settings());
    let cancel = tokio_util::sync::CancellationToken::new();
    let ready = Arc::new(AtomicBool::new(false));
    let run = tokio::spawn(controller::run_controllers(
        ctx,
        Vec::new(),
        2,
        ready.clone(),
        WAIT,
        cancel.clone(),
    ));
    fake.wait_for("the cache to sync", WAIT, |_| {
        ready.load(Ordering::Acquire).then_some(())
    })
    .await;
    // No Secret: the object waits, and the status says for which spec.
    fake.create(NS, "x", spec());
    let observed = |f: &FakeApiServer, g: i64| {
        (f.get(NS, "x")?.status?.observed_generation == g).then_some(())
    };
    fake.wait_for("generation 1 observed", WAIT, |f| observed(f, 1))
        .await;
    let lists_before = list_count(&fake);

    fake.compact();
    fake.close_watches();
    fake.edit_spec(NS, "x", |s| s.run_id = "2".into());
    fake.wait_for("generation 2 observed after a relist", WAIT, |f| {
        observed(f, 2)
    })
    .await;
    let gone = fake
        .requests()
        .into_iter()
        .filter(|r| r.is_watch() && r.resource == "usagebackfills")
        .count();
    assert!(gone >= 2, "the controller watched again");
    assert!(
        list_count(&fake) > lists_before,
        "and listed again after 410 Gone"
    );
    cancel.cancel();
    tokio::time::timeout(WAIT, run).await.unwrap().unwrap();
    assert!(fake.unexpected().is_empty(), "{:?}", fake.unexpected());
}

fn list_count(fake: &FakeApiServer) -> usize {
    fake.requests()
        .into_iter()
        .filter(|r| {
            r.method == "GET" && r.name.is_none() && !r.is_watch() && r.resource == "usagebackfills"
        })
        .count()
}
