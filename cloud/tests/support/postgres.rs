//! The PostgreSQL server the tests make their databases on: `SYNESIS_TEST_POSTGRES` (a URL;
//! `scripts/postgres.sh start DIR` makes one, `.ci/run` starts one). Without it a test says it
//! skipped, outside CI; inside CI it fails.

use synesis_cloud::storage::postgres::{Pg, create_database};

/// The server, if one is named.
pub(crate) fn server() -> Option<String> {
    match std::env::var("SYNESIS_TEST_POSTGRES") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            let ci =
                std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "0" && v != "false");
            assert!(
                !ci,
                "CI must run the PostgreSQL tests, but SYNESIS_TEST_POSTGRES names no server (.ci/run starts one)"
            );
            eprintln!("SKIPPED (outside CI): SYNESIS_TEST_POSTGRES names no PostgreSQL server");
            None
        }
    }
}

/// A new database of its own on the test server, with the cloud's schema, and its URL.
#[allow(dead_code)] // not every test file opens one this way
pub(crate) fn fresh_database() -> Option<(Pg, String)> {
    let server = server()?;
    let name = format!("synesis_test_{}", uuid::Uuid::now_v7().simple());
    let url = create_database(&server, &name).expect("a database of the test's own");
    Some((Pg::open(&url).expect("the cloud's schema"), url))
}

/// Runs a scenario on a new SQLite file and on a new PostgreSQL database (when a server is
/// named), and asserts the two came to the same.
#[allow(dead_code)] // not every test file compares the backends this way
pub(crate) fn same_on_both<T: PartialEq + std::fmt::Debug>(
    on_sqlite: impl FnOnce(&mut synesis_cloud::storage::Db) -> T,
    on_postgres: impl FnOnce(&mut Pg) -> T,
) {
    let Some((mut pg, _)) = fresh_database() else {
        return;
    };
    let dir = tempfile::tempdir().expect("a scratch directory");
    let mut db =
        synesis_cloud::storage::Db::open(&dir.path().join("cloud.db")).expect("a SQLite cloud");
    assert_eq!(on_postgres(&mut pg), on_sqlite(&mut db));
}
