mod common;
use common::*;
use grpcgate::pb::echo::EchoRequest;

#[tokio::test]
async fn unary_through_proxy() {
    let b = backends(2).await;
    let gw = gateway_for(&b).await;
    let mut c = edge_client(&gw).await;
    for _ in 0..4 {
        let r = bounded(c.unary(EchoRequest {
            payload: b"hi".to_vec(),
            ..Default::default()
        }))
        .await
        .unwrap();
        assert_eq!(r.get_ref().payload, b"hi");
        println!("{}", r.get_ref().backend);
    }
    let s = scrape(&gw).await;
    assert_eq!(
        sample(&s, "grpcgate_requests_total", &[("grpc_status", "OK")]),
        4.0
    );
}
