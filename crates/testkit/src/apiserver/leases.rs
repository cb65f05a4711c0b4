//! Leases (coordination.k8s.io/v1) as the test API server serves them to the leader election.

use super::*;

impl State {
    /// Writes to Leases (reads take the common path): `None` when the
    /// request is not one of those.
    pub(super) fn lease_request(
        &mut self,
        r: &Recorded,
        route: &Route,
    ) -> Option<(StatusCode, FakeBody)> {
        let namespace = route.namespace.clone().unwrap_or_default();
        let key = |name: &str| Key {
            resource: "leases".into(),
            namespace: namespace.clone(),
            name: name.to_owned(),
        };
        let manager = r.field_manager().unwrap_or("").to_owned();
        let body = r.body.clone().unwrap_or_default();
        Some(match (r.method.as_str(), &route.name) {
            ("POST", None) => {
                let Some(name) = body["metadata"]["name"].as_str().map(str::to_owned) else {
                    return Some(status_error(
                        422,
                        "Invalid",
                        "metadata.name: Required value",
                    ));
                };
                if self.objects.contains_key(&key(&name)) {
                    return Some(status_error(
                        409,
                        "AlreadyExists",
                        &format!("leases.coordination.k8s.io \"{name}\" already exists"),
                    ));
                }
                let mut v = body.clone();
                v["apiVersion"] = json!("coordination.k8s.io/v1");
                v["kind"] = json!("Lease");
                v["metadata"]["namespace"] = json!(namespace);
                self.uid += 1;
                v["metadata"]["uid"] = json!(format!("00000000-0000-0000-0002-{:012}", self.uid));
                if v["spec"].is_null() {
                    v["spec"] = json!({});
                }
                let owned = spec_fields(&v).map(|f| (f, manager.clone())).collect();
                self.owners.insert(key(&name), owned);
                self.store(key(&name), v, "ADDED");
                (StatusCode::CREATED, full(&self.objects[&key(&name)]))
            }
            ("PUT", Some(name)) => {
                let Some(old) = self.objects.get(&key(name)) else {
                    return Some(not_found("leases", name));
                };
                let want = &body["metadata"]["resourceVersion"];
                if !want.is_null() && *want != old["metadata"]["resourceVersion"] {
                    return Some(status_error(
                        409,
                        "Conflict",
                        "the object has been modified",
                    ));
                }
                let mut v = body.clone();
                v["metadata"]["uid"] = old["metadata"]["uid"].clone();
                v["metadata"]["namespace"] = json!(namespace);
                let owned = spec_fields(&v).map(|f| (f, manager.clone())).collect();
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
                        let conflicts: Vec<String> = patch_spec
                            .iter()
                            .filter(|(f, value)| {
                                owners.get(*f).is_some_and(|o| *o != manager)
                                    && v["spec"][f.as_str()] != **value
                            })
                            .map(|(f, _)| format!("conflict with {:?}: .spec.{f}", owners[f]))
                            .collect();
                        if !conflicts.is_empty() && !force {
                            return Some(status_error(
                                409,
                                "Conflict",
                                &format!(
                                    "Apply failed with {} conflict(s): {}",
                                    conflicts.len(),
                                    conflicts.join(", ")
                                ),
                            ));
                        }
                        for (f, value) in patch_spec {
                            v["spec"][f.as_str()] = value;
                            owners.insert(f, manager.clone());
                        }
                    }
                    Some(
                        "application/strategic-merge-patch+json" | "application/merge-patch+json",
                    ) => {
                        let want = &body["metadata"]["resourceVersion"];
                        if !want.is_null() && *want != v["metadata"]["resourceVersion"] {
                            return Some(status_error(
                                409,
                                "Conflict",
                                "the object has been modified",
                            ));
                        }
                        let mut patch = body.clone();
                        if let Some(m) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
                            m.remove("resourceVersion");
                        }
                        merge(&mut v, &patch);
                        for (f, value) in patch_spec {
                            if value.is_null() {
                                owners.remove(&f);
                            } else {
                                owners.insert(f, manager.clone());
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
            _ => return None,
        })
    }
}
