//! The CRD's `x-kubernetes-validations` (CEL rules), found by walking the
//! schema and evaluated as the apiextensions-apiserver does
//! (`pkg/apiserver/schema/cel/validation.go`), after defaulting, on every
//! create, update, patch and apply, of the main resource and of `status`:
//! - a rule runs on its node when the node is present and not null, with
//!   the node as `self`;
//! - a transition rule (one that reads `oldSelf`) runs only on an update
//!   whose old object has the node, with the old node as `oldSelf`;
//! - on an update, a broken rule that is not a transition rule is
//!   ratcheted (not reported) when its node equals the old one
//!   (CRDValidationRatcheting, on by default since Kubernetes 1.30; older
//!   servers refuse even an untouched node, e.g. a status write to an
//!   object stored before a rule existed);
//! - a broken rule is a `FieldValueInvalid` cause at the node's path, or
//!   at the field its `fieldPath` names below the node, whose message is
//!   `Invalid value: <message>` (the value itself is omitted for objects
//!   and lists), as kube-apiserver 1.37 words it. Not modelled: 1.34
//!   shows the node's schema type there instead (`Invalid value:
//!   "object": <message>`); `tests/control_plane/cluster.rs` knows.
//!
//! The interpreter (cel-interpreter) is not Kubernetes' CEL: it lacks the
//! optional syntax (`self.?x`), the Kubernetes string, list, regex and URL
//! libraries, and `µs` in `duration()`, and it does not type-check. So
//! whatever it cannot do fails loudly, never passes: a rule that does not
//! parse, reads a variable other than `self`/`oldSelf`, carries a key
//! other than `rule`, `message` and `fieldPath` (only `.a.b` paths), sits at the resource root or in a
//! list's items or a map's values (not modelled here), fails to evaluate
//! or gives something other than a bool panics (in the test server, that
//! is the test).

use cel_interpreter::{Context, Program, Value as Cel};
use serde_json::Value;

use super::schema::FieldError;

/// One rule of the schema, compiled.
#[derive(Debug)]
pub struct Rule {
    /// Property names from the object's root to the node the rule is on.
    pub path: Vec<String>,
    pub rule: String,
    /// The message as the apiserver shows it (`failed rule: <rule>` when
    /// the CRD gives none).
    pub message: String,
    /// Keys of the validation entry, as the CRD states it.
    pub keys: Vec<String>,
    /// Property names from the node to the field the rule is about
    /// (`fieldPath`), when given.
    pub field_path: Vec<String>,
    /// Reads `oldSelf`.
    pub transition: bool,
    program: Program,
}

/// A rule an object breaks, and where.
#[derive(Debug)]
pub struct Broken<'a> {
    pub rule: &'a Rule,
    /// `spec.database`.
    pub field: String,
    /// The node, for the cause's message.
    value: Value,
}

impl Broken<'_> {
    /// As a 422's cause.
    pub fn field_error(&self) -> FieldError {
        let shown = match &self.value {
            Value::Object(_) | Value::Array(_) => String::new(),
            scalar => format!(": {scalar}"),
        };
        FieldError {
            field: self.field.clone(),
            reason: "FieldValueInvalid",
            message: format!("Invalid value{shown}: {}", self.rule.message),
            blocks_rules: false,
        }
    }
}

/// Every rule of `schema`, in the apiserver's order: a node's own rules,
/// then those of its properties.
pub fn rules(schema: &Value) -> Vec<Rule> {
    let mut out = Vec::new();
    collect(schema, &mut Vec::new(), &mut out);
    out
}

fn collect(node: &Value, path: &mut Vec<String>, out: &mut Vec<Rule>) {
    for entry in node
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        out.push(compile(entry, path));
    }
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        for (name, prop) in props {
            path.push(name.clone());
            collect(prop, path, out);
            path.pop();
        }
    }
    for nested in ["items", "additionalProperties"] {
        assert!(
            !node.get(nested).is_some_and(has_rules),
            "the fake API server does not evaluate CEL rules in {nested} (at {path:?}); teach it before adding one"
        );
    }
}

fn has_rules(node: &Value) -> bool {
    node.get("x-kubernetes-validations").is_some()
        || node
            .get("properties")
            .and_then(Value::as_object)
            .is_some_and(|p| p.values().any(has_rules))
        || node.get("items").is_some_and(has_rules)
        || node.get("additionalProperties").is_some_and(has_rules)
}

fn compile(entry: &Value, path: &[String]) -> Rule {
    let keys: Vec<String> = entry
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k.clone())
        .collect();
    let rule = entry["rule"]
        .as_str()
        .unwrap_or_else(|| panic!("a validation without a rule at {path:?}: {entry}"))
        .to_owned();
    for key in &keys {
        assert!(
            ["rule", "message", "fieldPath"].contains(&key.as_str()),
            "the fake API server does not implement {key} of a CEL rule: {rule}"
        );
    }
    let field_path: Vec<String> = match entry["fieldPath"].as_str() {
        None => Vec::new(),
        Some(p) => {
            assert!(
                p.starts_with('.') && !p.contains(['[', ']', '\'']),
                "the fake API server reads only .a.b field paths: {p}"
            );
            p[1..].split('.').map(str::to_owned).collect()
        }
    };
    // At the root, `self` would be the object with only apiVersion, kind,
    // metadata.name and metadata.generateName: not modelled here.
    assert!(
        !path.is_empty(),
        "the fake API server does not evaluate CEL rules at the resource root: {rule}"
    );
    let program = Program::compile(&rule)
        .unwrap_or_else(|e| panic!("the CEL rule {rule:?} does not compile: {e}"));
    let references = program.references();
    for variable in references.variables() {
        assert!(
            ["self", "oldSelf"].contains(&variable),
            "the CEL rule {rule:?} reads {variable}, which the apiserver does not declare"
        );
    }
    let message = match entry["message"].as_str().map(str::trim) {
        Some(m) if !m.is_empty() => m.to_owned(),
        _ => format!("failed rule: {}", rule.trim()),
    };
    Rule {
        path: path.to_vec(),
        transition: references.has_variable("oldSelf"),
        rule,
        message,
        keys,
        field_path,
        program,
    }
}

/// The rules `obj` breaks (`old`: the stored object, on an update), in
/// the order of `rules`.
pub fn broken<'a>(rules: &'a [Rule], obj: &Value, old: Option<&Value>) -> Vec<Broken<'a>> {
    let mut out = Vec::new();
    for rule in rules {
        let Some(node) = node_at(obj, &rule.path) else {
            continue;
        };
        let old_node = old.and_then(|o| node_at(o, &rule.path));
        if rule.transition && old_node.is_none() {
            continue;
        }
        if evaluate(rule, node, old_node) {
            continue;
        }
        if !rule.transition && old_node == Some(node) {
            continue;
        }
        out.push(Broken {
            rule,
            field: rule
                .path
                .iter()
                .chain(&rule.field_path)
                .cloned()
                .collect::<Vec<_>>()
                .join("."),
            value: node.clone(),
        });
    }
    out
}

/// The node at `path`, when present and not null (rules see no nulls).
fn node_at<'v>(v: &'v Value, path: &[String]) -> Option<&'v Value> {
    path.iter()
        .try_fold(v, |n, p| n.get(p))
        .filter(|n| !n.is_null())
}

fn evaluate(rule: &Rule, node: &Value, old: Option<&Value>) -> bool {
    let mut ctx = Context::default();
    let cel = |v: &Value| {
        cel_interpreter::to_value(v.clone())
            .unwrap_or_else(|e| panic!("{v} is not a CEL value: {e}"))
    };
    ctx.add_variable_from_value("self", cel(node));
    if let Some(old) = old {
        ctx.add_variable_from_value("oldSelf", cel(old));
    }
    match rule.program.execute(&ctx) {
        Ok(Cel::Bool(ok)) => ok,
        other => panic!(
            "the CEL rule {:?} on {node} gave {other:?}: the interpreter cannot say what the apiserver would",
            rule.rule
        ),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn schema(validations: Value) -> Value {
        json!({
            "type": "object",
            "properties": {
                "spec": {
                    "type": "object",
                    "properties": {"x": {"type": "string"}, "y": {"type": "integer"}},
                    "x-kubernetes-validations": validations,
                },
            },
        })
    }

    fn messages(rules: &[Rule], obj: &Value, old: Option<&Value>) -> Vec<String> {
        broken(rules, obj, old)
            .iter()
            .map(|b| b.field_error().message)
            .collect()
    }

    #[test]
    fn a_transition_rule_runs_only_on_an_update_with_an_old_node() {
        let rules = rules(&schema(
            json!([{"rule": "self.x == oldSelf.x", "message": "x is immutable"}]),
        ));
        assert!(rules[0].transition);
        let (a, b) = (json!({"spec": {"x": "a"}}), json!({"spec": {"x": "b"}}));
        assert!(messages(&rules, &b, None).is_empty(), "create");
        assert!(
            messages(&rules, &b, Some(&json!({}))).is_empty(),
            "no old node"
        );
        assert!(messages(&rules, &a, Some(&a)).is_empty(), "unchanged");
        assert_eq!(
            messages(&rules, &b, Some(&a)),
            ["Invalid value: x is immutable"]
        );
    }

    #[test]
    fn an_untouched_node_is_ratcheted_and_a_changed_one_is_not() {
        let rules = rules(&schema(json!([{"rule": "!has(self.y) || self.y > 0"}])));
        let bad = json!({"spec": {"y": -1}});
        let worse = json!({"spec": {"y": -2}});
        assert_eq!(
            messages(&rules, &bad, None),
            ["Invalid value: failed rule: !has(self.y) || self.y > 0"]
        );
        assert!(messages(&rules, &bad, Some(&bad)).is_empty());
        assert_eq!(messages(&rules, &worse, Some(&bad)).len(), 1);
    }

    #[test]
    fn a_field_path_moves_the_cause_to_the_field() {
        let rules = rules(&schema(json!([{
            "rule": "!has(self.y) || has(self.x)",
            "message": "y needs x",
            "fieldPath": ".y",
        }])));
        let broken = broken(&rules, &json!({"spec": {"y": 1}}), None);
        let e = broken[0].field_error();
        assert_eq!(e.field, "spec.y");
        // The value is the node's (an object: not shown), not the field's.
        assert_eq!(e.message, "Invalid value: y needs x");
    }

    #[test]
    #[should_panic(expected = "does not compile")]
    fn a_rule_the_interpreter_cannot_parse_panics() {
        rules(&schema(json!([{"rule": "self.?x.orValue('') == ''"}])));
    }

    #[test]
    #[should_panic(expected = "cannot say what the apiserver would")]
    fn a_rule_the_interpreter_cannot_evaluate_panics() {
        let rules = rules(&schema(json!([{"rule": "self.x.lowerAscii() == 'a'"}])));
        broken(&rules, &json!({"spec": {"x": "A"}}), None);
    }

    #[test]
    #[should_panic(expected = "at the resource root")]
    fn a_rule_at_the_root_panics() {
        rules(&json!({
            "type": "object",
            "x-kubernetes-validations": [{"rule": "self.metadata.name != ''"}],
        }));
    }

    #[test]
    #[should_panic(expected = "does not evaluate CEL rules in items")]
    fn a_rule_in_list_items_panics() {
        rules(&json!({
            "type": "object",
            "properties": {"list": {
                "type": "array",
                "items": {"type": "string", "x-kubernetes-validations": [{"rule": "self != ''"}]},
            }},
        }));
    }
}
