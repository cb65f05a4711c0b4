//! Leases (coordination.k8s.io/v1) as the test API server serves them to the leader election.

use super::*;

/// Leases, in the shape they share with ConfigMaps.
const API_VERSION: &str = "coordination.k8s.io/v1";

pub(super) const LEASES: NamedKind = NamedKind {
    resource: "leases",
    group: "coordination.k8s.io",
    api_version: API_VERSION,
    kind: "Lease",
    uid_tag: 2,
};

impl State {
    /// Writes to Leases (reads take the common path): `None` when the
    /// request is not one of those.
    pub(super) fn lease_request(
        &mut self,
        r: &Recorded,
        route: &Route,
    ) -> Option<(StatusCode, FakeBody)> {
        let namespace = route.namespace.clone().unwrap_or_default();
        let key = |name: &str| LEASES.key(&namespace, name);
        let manager = r.field_manager().unwrap_or("").to_owned();
        let body = r.body.clone().unwrap_or_default();
        Some(match (r.method.as_str(), &route.name) {
            ("POST", None) => {
                let mut body = body;
                if body["spec"].is_null() {
                    body["spec"] = json!({});
                }
                self.create_named(
                    &LEASES,
                    &namespace,
                    body,
                    &printed_manager(&manager, false, API_VERSION),
                    |_, _| Ok(()),
                    |v| spec_fields(v).collect(),
                )
            }
            ("PUT", Some(name)) => {
                let Some(old) = self.objects.get(&key(name)) else {
                    return Some(not_found("leases", name));
                };
                let want = &body["metadata"]["resourceVersion"];
                if !want.is_null() && *want != old["metadata"]["resourceVersion"] {
                    return Some(stale("leases", name));
                }
                let mut v = body.clone();
                v["metadata"]["uid"] = old["metadata"]["uid"].clone();
                v["metadata"]["namespace"] = json!(namespace);
                let updater = printed_manager(&manager, false, API_VERSION);
                let owned = spec_fields(&v).map(|f| (f, updater.clone())).collect();
                self.owners.insert(key(name), owned);
                self.store(key(name), v, "MODIFIED");
                ok(&self.objects[&key(name)])
            }
            ("PATCH", Some(name)) => {
                let Some(mut v) = self.objects.get(&key(name)).cloned() else {
                    return Some(not_found("leases", name));
                };
                let patch_spec = body["spec"].as_object().cloned().unwrap_or_default();
                let owners = self.owners.entry(key(name)).or_default();
                match r.content_type.as_deref() {
                    Some("application/apply-patch+yaml") => {
                        if manager.is_empty() {
                            return Some(status_error(
                                422,
                                "Invalid",
                                "PATCH with apply requires a fieldManager",
                            ));
                        }
                        let force = r.query.get("force").map(String::as_str) == Some("true");
                        let applier = printed_manager(&manager, true, API_VERSION);
                        let conflicts: Vec<(String, String)> = patch_spec
                            .iter()
                            .filter(|(f, value)| {
                                owners.get(*f).is_some_and(|o| *o != applier)
                                    && v["spec"][f.as_str()] != **value
                            })
                            .map(|(f, _)| (format!(".spec.{f}"), owners[f].clone()))
                            .collect();
                        if !conflicts.is_empty() && !force {
                            return Some(apply_conflicts(&conflicts));
                        }
                        for (f, value) in patch_spec {
                            v["spec"][f.as_str()] = value;
                            owners.insert(f, applier.clone());
                        }
                    }
                    Some(
                        "application/strategic-merge-patch+json" | "application/merge-patch+json",
                    ) => {
                        let want = &body["metadata"]["resourceVersion"];
                        if !want.is_null() && *want != v["metadata"]["resourceVersion"] {
                            return Some(stale("leases", name));
                        }
                        let mut patch = body.clone();
                        if let Some(m) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
                            m.remove("resourceVersion");
                        }
                        merge(&mut v, &patch);
                        let updater = printed_manager(&manager, false, API_VERSION);
                        for (f, value) in patch_spec {
                            if value.is_null() {
                                owners.remove(&f);
                            } else {
                                owners.insert(f, updater.clone());
                            }
                        }
                    }
                    _ => {
                        return Some(status_error(
                            415,
                            "UnsupportedMediaType",
                            "unsupported patch type",
                        ));
                    }
                }
                self.store(key(name), v, "MODIFIED");
                ok(&self.objects[&key(name)])
            }
            ("DELETE", Some(name)) => self.delete_named(&LEASES, &namespace, name),
            _ => return None,
        })
    }
}
