//! The admission rules of the CRD (`x-kubernetes-validations`), evaluated
//! with a CEL interpreter as the API server would, by the fake API
//! server's own evaluator (`usage_backfill_testkit::apiserver::cel`, which
//! also notes what the interpreter lacks): every rule of the generated
//! schema runs against valid and invalid UsageBackfills (pruned and
//! defaulted first, as the API server does), each invalid object is
//! refused with exactly the expected message, and the controller's
//! `validate()` (the second line of defence) refuses it with the same
//! words.

use serde_json::{Value, json};
use usage_backfill_api::{UsageBackfillSpec, rules};

#[path = "../support/cel_cases.rs"]
mod cel_cases;
use cel_cases::{invalid_specs, valid_specs};
use usage_backfill_testkit::apiserver::cel::{self, Rule};
use usage_backfill_testkit::apiserver::schema::Structural;

fn schema() -> &'static Structural {
    Structural::usage_backfill()
}

fn all_rules() -> &'static [Rule] {
    schema().rules()
}

/// The messages of the rules `object` breaks, on a create.
fn refusals(object: &Value) -> Vec<String> {
    let mut object = object.clone();
    schema().normalize(&mut object);
    // Rules run on an object the schema accepts: each case here breaks
    // rules only.
    let errors = schema().validate(&object);
    assert!(errors.is_empty(), "{object}: {errors:?}");
    cel::broken(all_rules(), &object, None)
        .iter()
        .map(|b| b.rule.message.clone())
        .collect()
}

fn object(spec: Value) -> Value {
    json!({
        "apiVersion": "usage.multica.ai/v1alpha1",
        "kind": "UsageBackfill",
        "metadata": {"name": "upgrade", "namespace": "shop"},
        "spec": spec,
    })
}

/// What the controller says about the same spec.
fn validate(spec: &Value) -> Result<(), String> {
    let spec: UsageBackfillSpec = serde_json::from_value(spec.clone()).unwrap();
    spec.validate().map(|_| ()).map_err(|e| e.to_string())
}

#[test]
fn valid_objects_pass_every_rule_and_validate() {
    for (what, spec) in valid_specs() {
        assert_eq!(
            refusals(&object(spec.clone())),
            Vec::<String>::new(),
            "{what}"
        );
        assert_eq!(validate(&spec), Ok(()), "{what}");
    }
}

#[test]
fn invalid_objects_are_refused_with_the_rules_message_and_validate_agrees() {
    for (what, spec, rule) in invalid_specs() {
        let refused = refusals(&object(spec.clone()));
        // forcePartial in IfLagging also has no monthsBack: two rules speak.
        let expected: Vec<String> = if rule == rules::FORCE_PARTIAL_ONLY_ALWAYS {
            vec![
                rule.message(),
                rules::FORCE_PARTIAL_NEEDS_MONTHS_BACK.message(),
            ]
        } else {
            vec![rule.message()]
        };
        assert_eq!(refused, expected, "{what}");
        assert_eq!(validate(&spec), Err(rule.message()), "{what}");
    }
}

#[test]
fn every_rule_refuses_something_and_is_valid_for_kubernetes_1_26() {
    let found = all_rules();
    let expected: Vec<_> = [rules::SPEC_RULES, rules::DATABASE_RULES, rules::TLS_RULES]
        .concat()
        .iter()
        .map(|r| r.message())
        .collect();
    let mut messages: Vec<_> = found.iter().map(|f| f.message.clone()).collect();
    messages.sort();
    let mut want = expected.clone();
    want.sort();
    assert_eq!(
        messages, want,
        "the CRD carries exactly the rules of api::rules"
    );
    let where_: Vec<_> = found
        .iter()
        .map(|f| f.path.join("."))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(where_, ["spec", "spec.database", "spec.database.tls"]);
    let refused: std::collections::BTreeSet<String> = invalid_specs()
        .into_iter()
        .map(|(_, _, r)| r.message())
        .collect();
    for f in found {
        assert!(
            refused.contains(&f.message),
            "no invalid object breaks: {}",
            f.rule
        );
        // messageExpression and reason need Kubernetes 1.27/1.28; fieldPath
        // (1.28) names the field of a rule on its parent, once the chart's
        // oldest Kubernetes has it (see api::rules).
        let rule = found_rule(&f.rule);
        let node = f.path[1..].join(".");
        let want = rules::validation(&rule, &node, rules::MIN_KUBERNETES_MINOR);
        let keys: Vec<&str> = want
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(f.keys, keys, "{}", f.rule);
        if rules::MIN_KUBERNETES_MINOR < rules::FIELD_PATH_SINCE_MINOR {
            assert!(f.field_path.is_empty(), "{}", f.rule);
        } else {
            assert_eq!(
                f.path
                    .iter()
                    .chain(&f.field_path)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("."),
                format!("spec.{}", rule.field),
                "{}",
                f.rule
            );
        }
        assert!(f.message.len() <= 300, "{}", f.message);
        // Only functions Kubernetes 1.26 and the interpreter share.
        for call in [
            "matches(",
            ".?",
            "find(",
            "split(",
            "lowerAscii",
            "isURL",
            "quantity(",
        ] {
            assert!(!f.rule.contains(call), "{call} in {}", f.rule);
        }
    }
}

/// The rule of api::rules with this CEL expression.
fn found_rule(expression: &str) -> rules::Rule {
    *rules::SPEC_RULES
        .iter()
        .chain(rules::DATABASE_RULES)
        .chain(rules::TLS_RULES)
        .find(|r| r.rule == expression)
        .unwrap_or_else(|| panic!("not a rule of api::rules: {expression}"))
}

#[test]
fn a_duration_rule_reads_strings_of_bounded_length() {
    let schema = schema().schema();
    for field in ["sliceTimeout", "maxSliceDuration"] {
        assert_eq!(
            schema["properties"]["spec"]["properties"][field]["maxLength"], 64,
            "{field}"
        );
    }
}

/// `--max-slice-duration` and `spec.maxSliceDuration` accept exactly the
/// same values, from one rule (`usage_backfill_limits`): the CLI's parser,
/// the controller's `validate()`, and the API server (schema pattern and
/// length, then the CEL rule) agree value by value.
#[test]
fn max_slice_duration_the_cli_and_the_resource_accept_the_same_values() {
    use clap::Parser;
    use usage_backfill::cli::Cli;

    let at_most_long = "1s".repeat(32); // 64 characters: 64 seconds
    let too_long = "1s".repeat(33);
    let cases: &[(&str, bool)] = &[
        // below the minimum
        ("0", false),
        ("0s", false),
        ("150ms", false),
        ("300ms", false),
        ("999ms", false),
        ("999999999ns", false),
        ("0.5s", false),
        // at it
        ("1s", true),
        ("1000ms", true),
        ("1000000us", true),
        ("0.0167m", true),
        // above it; there is no maximum
        ("1.5s", true),
        ("2m30s", true),
        ("1000h", true),
        (&at_most_long, true),
        // too long a string (the bound of the CEL rule's cost)
        (&too_long, false),
        // malformed
        ("", false),
        ("1", false),
        ("1x", false),
        ("1d", false),
        ("1 s", false),
        ("-1s", false),
        ("1.s", false),
        ("s", false),
    ];
    for &(value, accepted) in cases {
        let cli =
            Cli::try_parse_from(["usage-backfill", "backfill", "--max-slice-duration", value]);
        let spec = json!({
            "database": {"secretRef": {"name": "app-db"}},
            "maxSliceDuration": value,
        });
        let mut obj = object(spec.clone());
        schema().normalize(&mut obj);
        let schema_errors = schema().validate(&obj);
        let apiserver = schema_errors.is_empty() && cel::broken(all_rules(), &obj, None).is_empty();
        assert_eq!(
            cli.is_ok(),
            accepted,
            "CLI, {value:?}: {:?}",
            cli.err().map(|e| e.to_string())
        );
        assert_eq!(
            validate(&spec).is_ok(),
            accepted,
            "validate(), {value:?}: {:?}",
            validate(&spec)
        );
        assert_eq!(
            apiserver, accepted,
            "API server, {value:?}: {schema_errors:?}"
        );
    }
}
