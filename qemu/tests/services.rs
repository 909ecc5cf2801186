//! The harness's service helpers against real processes.

use std::time::Duration;

use twinroot_qemu::harness::{free_port, guest_url, start_etcd};

#[test]
fn etcd_starts_on_free_ports_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let (etcd, endpoint) = start_etcd(dir.path()).unwrap();
    let port: u16 = endpoint.rsplit(':').next().unwrap().parse().unwrap();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    etcd.stop().unwrap();
    // Stopped means nothing listens there any more (connect is refused at once).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(std::time::Instant::now() < deadline, "etcd still listening");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn guests_reach_the_host_at_10_0_2_2() {
    let port = free_port().unwrap();
    assert_eq!(
        guest_url(port, "/v1/update/"),
        format!("http://10.0.2.2:{port}/v1/update/")
    );
}
