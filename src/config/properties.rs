//! Property tests of the pure config parser: durations, and thousands of configs mutated from the
//! shipped and test configs (lines deleted, duplicated, swapped; characters flipped; values and keys
//! inserted). Whatever the text, parsing returns a config or an error naming a line, never panics.

use std::path::Path;
use std::time::Duration;

use proptest::prelude::*;
use proptest::sample::Index;

use super::{parse_duration, Config};

/// Valid configs the mutations start from: the two shipped ones and what the tests write (TLS, DNS,
/// weighted_round_robin, every listener and cluster key).
const SEEDS: &[&str] = &[
    include_str!("../../config/example.toml"),
    include_str!("../../config/demo.toml"),
    r#"
drain_timeout = "5s"
[admin]
listen = "127.0.0.1:9901"

[[listeners]]
name = "edge"
listen = "127.0.0.1:8443"
max_concurrent_streams = 100
max_connection_age = "5m"
proxy_protocol = true

[listeners.tls]
cert = "server.crt"
key = "server.key"
client_ca = "ca.crt"

[[listeners.routes]]
service = "echo.Echo"
method = "Unary"
cluster = "a"
timeout = "250ms"

[[listeners.routes]]
cluster = "b"

[[clusters]]
name = "a"
balancer = "least_request"
endpoints = ["127.0.0.1:50051", { address = "localhost:50052", weight = 3 }]
connect_timeout = "1s"
max_requests = 100

[clusters.health_check]
interval = "1s"
timeout = "500ms"
unhealthy_threshold = 2
healthy_threshold = 1
service = ""
mode = "watch"

[clusters.outlier_detection]
consecutive_failures = 3
base_ejection_time = "1s"
max_ejection_percent = 50

[[clusters]]
name = "b"
balancer = "weighted_round_robin"
endpoints = ["127.0.0.1:50053"]
blackout_period = "0s"
weight_update_period = "200ms"
error_utilization_penalty = 2.5
"#,
    r#"
[dns]
nameservers = ["10.100.0.10:53"]

[[listeners]]
name = "l"
listen = "127.0.0.1:0"

[[listeners.routes]]
cluster = "c"

[[clusters]]
name = "c"
dns = "echo-headless.prod.svc.cluster.local:50051"
dns_refresh = "1s"
slow_start = "30s"
balancer = "peak_ewma"
"#,
];

/// Keys the schema knows, so inserted lines often reach validation rather than "unknown key".
const KEYS: &[&str] = &[
    "name",
    "listen",
    "cluster",
    "service",
    "method",
    "timeout",
    "endpoints",
    "balancer",
    "dns",
    "dns_refresh",
    "slow_start",
    "weight",
    "address",
    "workers",
    "busy_poll",
    "drain_timeout",
    "interval",
    "mode",
    "cert",
    "key",
    "client_ca",
    "nameservers",
    "max_requests",
    "choice_count",
    "panic_threshold",
    "max_header_list_size",
    "max_connection_age",
    "blackout_period",
    "error_utilization_penalty",
    "max_ejection_percent",
    "keepalive_timeout",
];

/// Table headers, inserted as lines of their own.
const HEADERS: &[&str] = &[
    "[admin]",
    "[[listeners]]",
    "[listeners.tls]",
    "[[listeners.routes]]",
    "[[clusters]]",
    "[clusters.health_check]",
    "[clusters.outlier_detection]",
    "[dns]",
    "[listeners]",
    "[[admin]]",
];

/// A TOML value, valid or not: numbers at the edges, durations, addresses, strings of any
/// characters, arrays, inline tables, and fragments.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| f.to_string()),
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("4294967296".to_string()),
        Just("nan".to_string()),
        Just("inf".to_string()),
        Just("true".to_string()),
        "[0-9]{0,12}(\\.[0-9]{0,4})?(ns|us|µs|ms|s|m|h|d|)".prop_map(|d| format!("\"{d}\"")),
        "(127\\.0\\.0\\.1|localhost|::1|\\[::1\\]|[a-z.-]{0,12})(:[0-9]{0,6})?"
            .prop_map(|a| format!("\"{a}\"")),
        any::<String>().prop_map(|s| format!("{s:?}")),
        "[a-z_]{0,10}".prop_map(|s| format!("\"{s}\"")),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("[\"127.0.0.1:1\", \"127.0.0.1:1\"]".to_string()),
        Just("[{ address = \"127.0.0.1:2\", weight = 0 }, 7]".to_string()),
        Just("{ address = 5 }".to_string()),
        Just("\"/dev/zero\"".to_string()),
        Just("\"\"".to_string()),
        Just("\"".to_string()),
        Just("[".to_string()),
        Just(String::new()),
        Just("1979-05-27T07:32:00Z".to_string()),
    ]
}

/// One edit to a config's lines.
#[derive(Debug, Clone)]
enum Mutation {
    Delete(Index),
    Duplicate(Index),
    Swap(Index, Index),
    /// Replace one character of the text.
    Flip(Index, char),
    /// Replace what follows the first `=` of a line.
    SetValue(Index, String),
    /// Insert `key = value` before a line.
    Insert(Index, String, String),
    /// Insert a table header before a line.
    Header(Index, &'static str),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let flip_char = prop_oneof![
        proptest::sample::select(vec![
            '[', ']', '"', '\'', '=', '\n', '{', '}', ',', '.', '#', ' ', '0', '9', 'a', '\\', '-',
            ':', '\t', '\r', 'é', '\0',
        ]),
        any::<char>(),
    ];
    let key = prop_oneof![
        3 => proptest::sample::select(KEYS.to_vec()).prop_map(str::to_string),
        1 => "[a-z_.\"]{1,12}",
    ];
    prop_oneof![
        2 => any::<Index>().prop_map(Mutation::Delete),
        2 => any::<Index>().prop_map(Mutation::Duplicate),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
        3 => (any::<Index>(), flip_char).prop_map(|(i, c)| Mutation::Flip(i, c)),
        4 => (any::<Index>(), value()).prop_map(|(i, v)| Mutation::SetValue(i, v)),
        2 => (any::<Index>(), key, value()).prop_map(|(i, k, v)| Mutation::Insert(i, k, v)),
        1 => (any::<Index>(), proptest::sample::select(HEADERS.to_vec()))
            .prop_map(|(i, h)| Mutation::Header(i, h)),
    ]
}

fn apply(text: &str, mutations: &[Mutation]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for m in mutations {
        let n = lines.len().max(1);
        match m {
            Mutation::Delete(i) if !lines.is_empty() => {
                lines.remove(i.index(n));
            }
            Mutation::Duplicate(i) if !lines.is_empty() => {
                let i = i.index(n);
                lines.insert(i, lines[i].clone());
            }
            Mutation::Swap(a, b) if !lines.is_empty() => lines.swap(a.index(n), b.index(n)),
            Mutation::Flip(i, c) => {
                let mut chars: Vec<char> = lines.join("\n").chars().collect();
                if !chars.is_empty() {
                    let i = i.index(chars.len());
                    chars[i] = *c;
                }
                let joined: String = chars.into_iter().collect();
                lines = joined.split('\n').map(str::to_string).collect();
            }
            Mutation::SetValue(i, v) if !lines.is_empty() => {
                let line = &mut lines[i.index(n)];
                if let Some(eq) = line.find('=') {
                    line.replace_range(eq + 1.., &format!(" {v}"));
                }
            }
            Mutation::Insert(i, k, v) => lines.insert(i.index(n + 1), format!("{k} = {v}")),
            Mutation::Header(i, h) => lines.insert(i.index(n + 1), h.to_string()),
            _ => {}
        }
    }
    lines.join("\n")
}

fn parse(text: &str) -> Result<Config, super::ConfigError> {
    Config::parse(text, "x.toml", Path::new("/etc/grpcgate"))
}

#[test]
fn the_seeds_are_valid() {
    for seed in SEEDS {
        if let Err(e) = parse(seed) {
            panic!("{e}\n{seed}");
        }
    }
}

/// Found by `mutated_configs_fail_at_a_line`: a NUL in a comment got an error from the TOML parser
/// with an empty message, shown as `x.toml:33:59: ` and nothing else.
#[test]
fn a_control_character_in_a_comment_is_named() {
    let text = SEEDS[1].replace(
        "join_shortest_queue) to compare",
        "join_shor\0est_queue) to compare",
    );
    let e = parse(&text).unwrap_err().to_string();
    assert_eq!(e, "x.toml:33:59: invalid TOML: unexpected character '\\0'");
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 3000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Mutated configs: a config or an error naming the file, a line of the text and a column,
    /// never a panic.
    #[test]
    fn mutated_configs_fail_at_a_line(
        seed in proptest::sample::select(SEEDS.to_vec()),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let text = apply(seed, &mutations);
        if let Err(e) = parse(&text) {
            let shown = e.to_string();
            let Some((line, col)) = e.position else {
                return Err(TestCaseError::fail(format!("no line in {shown:?} for:\n{text}")));
            };
            prop_assert!(!e.message.trim().is_empty(), "no message in {shown:?} for:\n{text}");
            prop_assert!(!shown.contains('\n'), "{shown:?}");
            prop_assert!(shown.starts_with(&format!("x.toml:{line}:{col}: ")), "{shown}");
            prop_assert!(line >= 1 && line <= text.lines().count().max(1) + 1, "{shown}");
            prop_assert!(col >= 1, "{shown}");
        }
    }

    /// Any string: a duration or an error, never a panic; what parses is within range.
    #[test]
    fn durations_never_panic(s in "\\PC{0,16}|[0-9.]{0,24}(us|µs|ms|s|m|h|x)?") {
        if let Ok(d) = parse_duration(&s) {
            prop_assert!(d <= Duration::from_secs(1_000_000_000), "{s:?} -> {d:?}");
        }
    }

    /// Whole numbers in every unit give exactly their duration; a bare number is refused.
    #[test]
    fn durations_in_every_unit(n in 0u64..200_000, unit in 0usize..6) {
        let (name, nanos) = [("us", 1_000u64), ("µs", 1_000), ("ms", 1_000_000), ("s", 1_000_000_000), ("m", 60_000_000_000), ("h", 3_600_000_000_000)][unit];
        let want = Duration::from_nanos(n * nanos);
        let got = parse_duration(&format!("{n}{name}")).unwrap();
        // Through f64 seconds: exact to well under a microsecond at these magnitudes.
        let diff = got.abs_diff(want);
        prop_assert!(diff < Duration::from_micros(1), "{n}{name} -> {got:?}, want {want:?}");
        prop_assert!(parse_duration(&n.to_string()).is_err());
    }

    /// Fractions: "1.5s" is 1500 ms.
    #[test]
    fn fractional_durations(whole in 0u64..100_000, frac in 0u64..1000) {
        let got = parse_duration(&format!("{whole}.{frac:03}s")).unwrap();
        let want = Duration::from_millis(whole * 1000 + frac);
        prop_assert!(got.abs_diff(want) < Duration::from_micros(1), "{got:?} vs {want:?}");
    }
}
