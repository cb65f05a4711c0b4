//! The store's writes and watch events, request routes, and the JSON helpers the handlers share.

use super::*;

impl State {
    pub(super) fn store(&mut self, key: Key, mut v: Value, verb: &'static str) {
        self.last_rv += 1;
        v["metadata"]["resourceVersion"] = json!(self.last_rv.to_string());
        self.record(&key, &v, verb);
        self.objects.insert(key, v);
    }

    /// Stores `new` unless it is `old` unchanged (a no-op write changes
    /// nothing: no resourceVersion, no watch event); the object as stored.
    pub(super) fn store_if_changed(&mut self, key: Key, old: &Value, new: Value) -> Value {
        if new == *old {
            return old.clone();
        }
        self.store_or_finish_deletion(key, new)
    }

    /// Stores `v`, or removes it when it is deleted and unfinalized.
    pub(super) fn store_or_finish_deletion(&mut self, key: Key, v: Value) -> Value {
        let deleting = !v["metadata"]["deletionTimestamp"].is_null();
        let finalized = v["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if deleting && !finalized {
            self.last_rv += 1;
            let mut gone = v.clone();
            gone["metadata"]["resourceVersion"] = json!(self.last_rv.to_string());
            self.record(&key, &gone, "DELETED");
            self.objects.remove(&key);
            gone
        } else {
            self.upsert(key.clone(), v);
            self.objects[&key].clone()
        }
    }

    /// Stores `v` as ADDED or MODIFIED, whichever it is.
    pub(super) fn upsert(&mut self, key: Key, v: Value) {
        let verb = if self.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.store(key, v, verb);
    }

    /// Keeps the change for watches to come and sends it to open ones.
    pub(super) fn record(&mut self, key: &Key, v: &Value, verb: &'static str) {
        self.history.push_back(Change {
            rv: self.last_rv,
            key: key.clone(),
            verb,
            object: v.clone(),
        });
        while self.history.len() > HISTORY {
            if let Some(c) = self.history.pop_front() {
                self.floor = c.rv;
            }
        }
        self.watches.retain(|w| {
            if w.resource != key.resource
                || w.namespace.as_ref().is_some_and(|ns| *ns != key.namespace)
            {
                return !w.tx.is_closed();
            }
            w.tx.send(watch_line(verb, v, w.meta_only)).is_ok()
        });
    }
}

#[derive(Debug, Default)]
pub(super) struct Route {
    /// The API group: "" for the core group.
    pub(super) group: String,
    pub(super) resource: Option<String>,
    pub(super) namespace: Option<String>,
    pub(super) name: Option<String>,
    pub(super) subresource: Option<String>,
}

impl Route {
    /// `/api/v1/...` or `/apis/GROUP/VERSION/...`, then
    /// `[namespaces/NS/]RESOURCE[/NAME[/SUB]]`.
    pub(super) fn parse(path: &str) -> Route {
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let (group, rest) = match segs.as_slice() {
            ["api", _, rest @ ..] => (String::new(), rest),
            ["apis", group, _, rest @ ..] => (group.to_string(), rest),
            _ => return Route::default(),
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
            rest => (None, rest),
        };
        Route {
            group,
            resource: rest.first().map(|s| s.to_string()),
            namespace,
            name: rest.get(1).map(|s| s.to_string()),
            subresource: rest.get(2).map(|s| s.to_string()),
        }
    }
}

pub(super) fn meta(v: &Value) -> Value {
    json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadata",
        "metadata": v["metadata"].clone(),
    })
}

/// A BOOKMARK: only the resourceVersion the watch has reached.
pub(super) fn bookmark_line(resource: &str, meta_only: bool, rv: u64) -> Bytes {
    let (api_version, kind) = if meta_only {
        ("meta.k8s.io/v1", "PartialObjectMetadata")
    } else {
        (api_version_of(resource), kind_of(resource))
    };
    let object = json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": { "resourceVersion": rv.to_string() },
    });
    let mut line = serde_json::to_vec(&json!({ "type": "BOOKMARK", "object": object })).unwrap();
    line.push(b'\n');
    Bytes::from(line)
}

pub(super) fn watch_line(verb: &str, v: &Value, meta_only: bool) -> Bytes {
    let object = if meta_only { meta(v) } else { v.clone() };
    let mut line = serde_json::to_vec(&json!({ "type": verb, "object": object })).unwrap();
    line.push(b'\n');
    Bytes::from(line)
}

pub(super) fn kind_of(resource: &str) -> &'static str {
    match resource {
        "usagebackfills" => "UsageBackfill",
        "secrets" => "Secret",
        "leases" => "Lease",
        "configmaps" => "ConfigMap",
        _ => "Event",
    }
}

pub(super) fn api_version_of(resource: &str) -> &'static str {
    match resource {
        "usagebackfills" => UBF_API,
        "secrets" | "configmaps" => "v1",
        "leases" => "coordination.k8s.io/v1",
        _ => "events.k8s.io/v1",
    }
}

pub(super) fn spec_fields(v: &Value) -> impl Iterator<Item = String> + '_ {
    v["spec"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, value)| !value.is_null())
        .map(|(f, _)| f.clone())
}

/// RFC 7386 JSON merge patch.
pub(super) fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// A response: its code and body.
pub(super) type Answer = (StatusCode, FakeBody);

/// A kind whose objects are created under their own name, read by name
/// (the common path of [`FakeApiServer::respond`]) and deleted at once, no
/// finalizers: ConfigMaps and Leases share this shape and differ only in
/// what this names, in their validation and in the fields a manager owns.
pub(super) struct NamedKind {
    /// Plural, as in the URL: `configmaps`.
    pub(super) resource: &'static str,
    /// The API group, `""` for the core group.
    pub(super) group: &'static str,
    pub(super) api_version: &'static str,
    pub(super) kind: &'static str,
    /// The uid's fourth group, which tells the kinds apart in a uid.
    pub(super) uid_tag: u16,
}

impl NamedKind {
    pub(super) fn key(&self, namespace: &str, name: &str) -> Key {
        Key {
            resource: self.resource.into(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// As the apiserver names the resource in a message:
    /// `configmaps`, `leases.coordination.k8s.io`.
    pub(super) fn qualified(&self) -> String {
        match self.group {
            "" => self.resource.to_owned(),
            group => format!("{}.{group}", self.resource),
        }
    }

    /// A Status's `details` naming `name` of this kind, as the
    /// apiserver's NotFound, AlreadyExists and delete answers carry them.
    pub(super) fn details(&self, name: &str) -> Value {
        let mut details = json!({"name": name, "kind": self.resource});
        if !self.group.is_empty() {
            details["group"] = json!(self.group);
        }
        details
    }
}

impl State {
    /// An object of `kind` named `name` from `body`, as stored on creation.
    pub(super) fn new_named(
        &mut self,
        kind: &NamedKind,
        namespace: &str,
        name: &str,
        body: Value,
    ) -> Value {
        let mut v = body;
        v["apiVersion"] = json!(kind.api_version);
        v["kind"] = json!(kind.kind);
        v["metadata"]["name"] = json!(name);
        v["metadata"]["namespace"] = json!(namespace);
        self.uid += 1;
        v["metadata"]["uid"] = json!(format!(
            "00000000-0000-0000-{:04}-{:012}",
            kind.uid_tag, self.uid
        ));
        v["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        v
    }

    /// A create (POST) of `body`: 422 without a name, 409 when the name is
    /// taken, `check`'s refusal when the kind's validation refuses it; else
    /// stored, `manager` owning the fields `owned` lists, and 201.
    pub(super) fn create_named(
        &mut self,
        kind: &NamedKind,
        namespace: &str,
        body: Value,
        manager: &str,
        check: impl FnOnce(&str, &Value) -> Result<(), Answer>,
        owned: impl Fn(&Value) -> Vec<String>,
    ) -> Answer {
        let Some(name) = body["metadata"]["name"].as_str().map(str::to_owned) else {
            let status = invalid_status_of(
                kind.kind,
                kind.group,
                "",
                &[(
                    "metadata.name",
                    "FieldValueRequired",
                    "Required value: name or generateName is required",
                )],
            );
            return (StatusCode::UNPROCESSABLE_ENTITY, full(&status));
        };
        let key = kind.key(namespace, &name);
        if self.objects.contains_key(&key) {
            return already_exists(kind, &name);
        }
        if let Err(refused) = check(&name, &body) {
            return refused;
        }
        let v = self.new_named(kind, namespace, &name, body);
        let fields = owned(&v)
            .into_iter()
            .map(|f| (f, manager.to_owned()))
            .collect();
        self.owners.insert(key.clone(), fields);
        self.store(key.clone(), v, "ADDED");
        (StatusCode::CREATED, full(&self.objects[&key]))
    }

    /// A delete: 404 when missing; else removed at once (there are no
    /// finalizers) and answered with a Status, as the apiserver answers
    /// for kinds that do not return the deleted object.
    pub(super) fn delete_named(&mut self, kind: &NamedKind, namespace: &str, name: &str) -> Answer {
        let key = kind.key(namespace, name);
        let Some(old) = self.objects.remove(&key) else {
            return not_found(kind.resource, name);
        };
        self.owners.remove(&key);
        self.last_rv += 1;
        let mut gone = old.clone();
        gone["metadata"]["resourceVersion"] = json!(self.last_rv.to_string());
        self.record(&key, &gone, "DELETED");
        let mut details = kind.details(name);
        details["uid"] = old["metadata"]["uid"].clone();
        ok(&json!({
            "apiVersion": "v1",
            "kind": "Status",
            "metadata": {},
            "status": "Success",
            "details": details,
        }))
    }
}

/// 409 AlreadyExists, as the apiserver words it.
pub(super) fn already_exists(kind: &NamedKind, name: &str) -> Answer {
    let body = json!({
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "message": format!("{} {name:?} already exists", kind.qualified()),
        "reason": "AlreadyExists",
        "details": kind.details(name),
        "code": 409,
    });
    (StatusCode::CONFLICT, full(&body))
}
