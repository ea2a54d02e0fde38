//! Several devices side by side on one machine, each in its own SYNESIS_HOME.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)] // test code

use synesis_e2e::{Device, json_of};

#[test]
fn devices_side_by_side_never_share_a_directory() {
    let devices: Vec<Device> = (0..3).map(|_| Device::new()).collect();
    let mut seen = std::collections::HashSet::new();
    for d in &devices {
        let v = json_of(d.synesis().args(["paths", "--json"]));
        for key in ["config", "data", "runtime"] {
            let path = v[key]["path"].as_str().unwrap().to_owned();
            assert!(path.starts_with(d.home().to_str().unwrap()), "{path}");
            assert!(seen.insert(path), "two devices share a directory");
        }
    }
}
