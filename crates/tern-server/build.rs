//! Compiles the PostgreSQL variant of the store suite in only when `TERN_TEST_PG_URL` is set
//! at build time, so `cargo test` lists `store_suite_on_postgres` exactly when it runs it
//! (nothing is skipped silently).

fn main() {
    println!("cargo::rustc-check-cfg=cfg(tern_test_pg)");
    println!("cargo::rerun-if-env-changed=TERN_TEST_PG_URL");
    if std::env::var_os("TERN_TEST_PG_URL").is_some_and(|v| !v.is_empty()) {
        println!("cargo::rustc-cfg=tern_test_pg");
    }
}
