//! The OpenAPI document (docs/openapi.json, served at `GET /openapi.json`) against the real
//! server: schemathesis reads the served document, sends generated requests to every
//! operation of both protocols (RJMetrics and Stitch) with a valid key, and checks that no
//! answer is a server error and that every answer's status code, content type and body are the
//! ones the document lists. Each test runs on SQLite and on PostgreSQL.
//!
//! Schemathesis is a Python tool. It is installed, at the exact versions pinned in
//! tests/python/requirements-schemathesis.txt, into a virtual environment under
//! `target/python/schemathesis-<version>` the first time this test runs, and reused after
//! that. Without `python3` the test says loudly that it was skipped and passes; any other
//! problem (pip cannot install, schemathesis fails) fails it.
//!
//! `INTAKE_SCHEMATHESIS_SEED` and `INTAKE_SCHEMATHESIS_MAX_EXAMPLES` change the seed (fixed by
//! default, so that runs are repeatable) and the number of generated cases per operation.

mod support;

use std::time::{Duration, Instant};

use support::python::{PythonTool, run_to_end};
use support::{Backend, Server, TestDb, both_backends, issue_key};

both_backends!(the_server_conforms_to_its_openapi_document);

/// The document as the repository holds it; the server must serve exactly this.
const DOCUMENT: &str = include_str!("../docs/openapi.json");
/// schemathesis and its pinned dependencies; the environment is rebuilt when they change.
const SCHEMATHESIS: PythonTool = PythonTool {
    package: "schemathesis",
    requirements: include_str!("python/requirements-schemathesis.txt"),
};
/// The client id the document's examples use, so that schemathesis's example phase reaches
/// the success answers (other generated client ids get `403`).
const CLIENT_ID: i64 = 42;
/// Generated cases per operation and phase, unless `INTAKE_SCHEMATHESIS_MAX_EXAMPLES` says
/// otherwise: enough to reach every documented answer, small enough to finish in well under a
/// minute.
const MAX_EXAMPLES: u64 = 40;
const DEFAULT_SEED: u64 = 20_261_126;
/// What is checked on every answer.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_schema_conformance";
/// A schemathesis run that takes longer than this is stopped and fails the test.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);
/// The server's access log would bury schemathesis's report under a thousand lines.
const QUIET: (&str, &str) = ("RUST_LOG", "warn,intake_server=info,intake::access=off");

fn the_server_conforms_to_its_openapi_document(backend: Backend) {
    let Some(venv) = SCHEMATHESIS.environment("the OpenAPI conformance check") else {
        return;
    };

    let db = TestDb::new(backend);
    let server = Server::start(&db, &[QUIET]);
    let (_, key) = issue_key(&db, CLIENT_ID, "schemathesis");

    // The served document is the repository's, byte for byte, so what is checked below is
    // what docs/openapi.json says.
    let served = server.get("/openapi.json");
    served.assert_status(200);
    let content_type = served.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "GET /openapi.json must be JSON, got Content-Type {content_type:?}"
    );
    assert!(
        served.text == DOCUMENT,
        "GET /openapi.json does not serve docs/openapi.json as it is in the repository"
    );

    let seed = env_number("INTAKE_SCHEMATHESIS_SEED", DEFAULT_SEED);
    let max_examples = env_number("INTAKE_SCHEMATHESIS_MAX_EXAMPLES", MAX_EXAMPLES);
    let authorization = format!("Authorization: Bearer {key}");
    let mut cmd = venv.python();
    cmd.args(["-m", "schemathesis.cli", "run"])
        .arg(server.url("/openapi.json"))
        .args(["--url", server.base_url()])
        .args(["--header", &authorization])
        .args(["--checks", CHECKS])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", &max_examples.to_string()])
        .args(["--seed", &seed.to_string()])
        .args(["--workers", "1"])
        // Keys come from --header only: a generated ?apikey= would win over it and make every
        // request a 401.
        .args(["--generation-with-security-parameters", "false"])
        .args(["--generation-database", "none"])
        .args(["--request-timeout", "30"])
        .arg("--no-color");
    // Run in the test's own directory: a schemathesis.toml further up must not change the run.
    cmd.current_dir(db.dir());
    let started = Instant::now();
    let run = run_to_end(cmd, db.dir(), "schemathesis", RUN_TIMEOUT);
    let elapsed = started.elapsed();
    let output = format!("{}{}", run.stdout, run.stderr);
    assert!(
        run.status.is_some(),
        "schemathesis {}; its output:\n{output}",
        run.outcome()
    );
    let success = run.succeeded();
    println!(
        "schemathesis ({backend:?}, seed {seed}, {max_examples} examples per operation) took \
         {:.1} s:\n{output}",
        elapsed.as_secs_f64()
    );
    assert!(
        success,
        "schemathesis found answers that break docs/openapi.json, or could not run \
         ({backend:?}; rerun with INTAKE_SCHEMATHESIS_SEED={seed}); its report is above"
    );
}

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => value
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}={value:?} is not a number: {e}")),
        _ => default,
    }
}
