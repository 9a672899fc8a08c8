//! W8 in its tiny `--smoke` sizes against the real brokers: every phase of every adapter moves
//! every message and gets a rate on both sides.

use factline_bench::{W8Adapter, W8Options, render_w8, run_w8};

#[test]
#[ignore = "needs NATS JetStream, Redis, RabbitMQ, PostgreSQL, Mosquitto and a Kafka broker: set FACTLINE_TEST_NATS_URL, FACTLINE_TEST_REDIS_URL, FACTLINE_TEST_AMQP_URL, FACTLINE_TEST_POSTGRES_URL, FACTLINE_TEST_MQTT_URL and FACTLINE_TEST_KAFKA_URL"]
fn every_w8_adapter_moves_every_message() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut options = W8Options::smoke();
    options.nats_url = std::env::var("FACTLINE_TEST_NATS_URL")?;
    options.redis_url = std::env::var("FACTLINE_TEST_REDIS_URL")?;
    options.amqp_url = std::env::var("FACTLINE_TEST_AMQP_URL")?;
    options.mqtt_url = std::env::var("FACTLINE_TEST_MQTT_URL")?;
    options.postgres_url = std::env::var("FACTLINE_TEST_POSTGRES_URL")?;
    options.kafka_url = std::env::var("FACTLINE_TEST_KAFKA_URL")?;
    let rows = runtime.block_on(run_w8(&options))?;
    eprintln!("{}", render_w8(&rows));
    assert_eq!(rows.len(), W8Adapter::ALL.len() * 2);
    for row in &rows {
        assert!(
            row.factline_per_sec > 0.0 && row.raw_per_sec > 0.0,
            "{row:?}"
        );
        assert_eq!(row.round_ratios.len(), options.rounds);
    }
    Ok(())
}
