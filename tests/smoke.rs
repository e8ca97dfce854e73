mod common;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::SeqCst;

use common::*;
use grpcgate::pb::echo::EchoRequest;

/// Four sequential calls through round robin over two backends: each backend answers exactly two
/// (by the response, by the backend's own count and by the proxy's metrics, which are read once the
/// proxy has recorded all four: they are updated just after a call's last frame goes out).
#[tokio::test]
async fn unary_through_proxy() {
    let b = backends(2).await;
    let gw = gateway_for(&b).await;
    let mut c = edge_client(&gw).await;
    let mut by_response = BTreeMap::<String, u32>::new();
    for _ in 0..4 {
        let r = bounded(c.unary(EchoRequest {
            payload: b"hi".to_vec(),
            ..Default::default()
        }))
        .await
        .unwrap();
        assert_eq!(r.get_ref().payload, b"hi");
        *by_response.entry(r.into_inner().backend).or_default() += 1;
    }
    let want: BTreeMap<String, u32> = [("b0".into(), 2), ("b1".into(), 2)].into();
    assert_eq!(by_response, want);
    for backend in &b {
        assert_eq!(backend.stats.completed.load(SeqCst), 2);
    }
    let s = wait_settled(&gw, &[("OK", 4)]).await;
    for backend in &b {
        let ep = backend.addr.to_string();
        assert_eq!(
            sample(
                &s,
                "grpcgate_requests_total",
                &[("endpoint", ep.as_str()), ("grpc_status", "OK")]
            ),
            2.0,
            "{ep}"
        );
    }
}
