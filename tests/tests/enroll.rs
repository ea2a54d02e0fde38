//! Enrollment end to end, with the crash that must not burn a setup token: the cloud has
//! committed the enrollment, and the device dies before it saved its identity.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::time::Duration;

use synesis_e2e::{Cloud, Device, Running, UdpRelay, json_of, signal, wait_for};

/// How long each datagram from the cloud is held on its way to the device. The handshake
/// takes one such trip before the cloud's handshake timeout (5 s); the reply takes another
/// after the commit, which is this long for the test to notice the commit and cut the path.
const REPLY_DELAY: Duration = Duration::from_millis(2_500);

/// Devices the cloud committed so far, read from its database (a read takes milliseconds: a
/// `synesis-cloud admin` process could take most of the delay on a loaded machine).
fn committed_devices(db: &dyn synesis_cloud::storage::Backend) -> usize {
    db.devices().unwrap().len()
}

#[test]
fn login_again_with_the_same_token_after_a_crash_gets_the_device_the_cloud_committed() {
    let cloud = Cloud::start();
    let relay = UdpRelay::start(cloud.addr);
    let token = relay.token_via(&cloud.account_and_token("acme"));
    let device = Device::new();
    let db = cloud.store();

    relay.set_delay(REPLY_DELAY);
    let mut login = Running {
        child: device
            .synesis()
            .args(["--json", "cloud", "login", &token])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    };
    assert!(
        wait_for(Duration::from_secs(30), || committed_devices(&*db) > 0),
        "the cloud never committed the enrollment"
    );
    // The reply is on its way; the device dies before it arrives.
    relay.cut(true);
    assert!(
        login.child.try_wait().unwrap().is_none(),
        "the login finished before the crash"
    );
    signal(login.pid(), "KILL");
    login.wait(Duration::from_secs(20));
    assert!(!device.home().join("data/identity/identity.json").exists());
    let committed = cloud.devices()[0]["device_id"].as_str().unwrap().to_owned();

    relay.cut(false);
    relay.set_delay(Duration::ZERO);
    let again = json_of(device.synesis().args(["--json", "cloud", "login", &token]));
    assert_eq!(again["device_id"], committed.as_str(), "{again}");
    assert_eq!(cloud.devices().len(), 1);

    // The identity works: its key is the one the cloud's certificate is for.
    let _tunnel = device.tunnel("1s");
    assert!(
        wait_for(Duration::from_secs(20), || device.state().as_deref()
            == Some("connected")),
        "never connected:\n{}",
        device.tunnel_log()
    );
}
