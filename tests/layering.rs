//! The module layering (issue 18): dependencies point one way. Reads the `crate::<module>` paths of
//! every file under src/ and checks that no module imports one that imports it back (directly or
//! through others), that the data plane imports nothing of the control plane or of the config's file
//! loading, and that the config is a leaf that does no I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The data plane: what one call goes through. It must not know who drives it.
const DATA_PLANE: &[&str] = &[
    "listener", "proxy", "upstream", "balancer", "router", "state",
];
/// The control plane: what starts, reloads, checks and reports on the data plane.
const CONTROL_PLANE: &[&str] = &["gateway", "health", "admin", "discovery", "demo", "echo"];
/// The edge: reads the config file and the files it names. The binary and the gateway call it; the
/// data plane gets what it built (a rustls config), never the files.
const EDGE: &[&str] = &["load"];
/// Leaves: protocol facts and plain types that import no other module of the crate but each other
/// as listed.
const LEAVES: &[(&str, &[&str])] = &[
    ("grpc", &[]),
    ("worker", &[]),
    ("tls", &[]),
    ("config", &[]),
    ("metrics", &["grpc"]),
    ("access_log", &["config"]),
];

/// What a module that does no I/O and builds no TLS never names (in code; comments are skipped):
/// the filesystem, sockets, the environment, the runtime, rustls and the crate's TLS module.
const IO_MARKERS: &[&str] = &[
    "std::fs",
    "fs::",
    "File::",
    "OpenOptions",
    "read_to_string",
    "read_dir",
    "std::io",
    "io::Read",
    "TcpStream",
    "TcpListener",
    "UdpSocket",
    "to_socket_addrs",
    "std::env",
    "std::process",
    "tokio",
    "rustls",
    "tls::",
];

/// The module that must stay pure, and the files that hold it.
const PURE: &[&str] = &["config"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every file under src/ with the top-level module it belongs to (`config/files.rs` → `config`).
fn module_files() -> Vec<(String, PathBuf)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files
        .into_iter()
        .map(|file| {
            let module = file
                .strip_prefix(&src)
                .unwrap()
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string();
            (module, file)
        })
        .collect()
}

/// Top-level module → the top-level modules it names as `crate::<name>`.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, file) in module_files() {
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let deps = graph.entry(module.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let name: String = text[i + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `crate::pb` is generated code; `crate::Config` and friends are re-exports.
            if !name.is_empty()
                && name != module
                && name != "pb"
                && name.starts_with(char::is_lowercase)
            {
                deps.insert(name);
            }
        }
    }
    graph
}

/// Every module reachable from `start`.
fn reachable(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![start.to_string()];
    while let Some(m) = todo.pop() {
        for d in graph.get(&m).into_iter().flatten() {
            if seen.insert(d.clone()) {
                todo.push(d.clone());
            }
        }
    }
    seen
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let graph = module_graph();
    for m in graph.keys() {
        assert!(
            !reachable(&graph, m).contains(m),
            "module `{m}` reaches itself through its imports: {graph:#?}"
        );
    }
}

#[test]
fn the_data_plane_imports_nothing_of_the_control_plane() {
    let graph = module_graph();
    for m in DATA_PLANE {
        let reach = reachable(&graph, m);
        for c in CONTROL_PLANE.iter().chain(EDGE) {
            assert!(
                !reach.contains(*c),
                "data-plane module `{m}` depends on control-plane module `{c}`: {:?}",
                graph.get(*m)
            );
        }
    }
}

#[test]
fn leaves_stay_leaves() {
    let graph = module_graph();
    for (m, allowed) in LEAVES {
        let deps = graph.get(*m).cloned().unwrap_or_default();
        let extra: Vec<_> = deps
            .iter()
            .filter(|d| !allowed.contains(&d.as_str()))
            .collect();
        assert!(extra.is_empty(), "leaf `{m}` imports {extra:?}");
    }
}

/// The I/O markers named in `text`'s code, with their line numbers; comment lines are skipped (a doc
/// comment may say which module reads the files).
fn io_markers(text: &str) -> Vec<(usize, &'static str)> {
    let mut found = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("//") {
            continue;
        }
        for m in IO_MARKERS {
            if line.contains(m) {
                found.push((i + 1, *m));
            }
        }
    }
    found
}

#[test]
fn the_io_marker_scan_finds_io() {
    let text = "// std::fs in a comment is fine\nlet t = std::fs::read_to_string(p)?;\nuse crate::tls::TlsConfig;\n";
    assert_eq!(
        io_markers(text),
        vec![
            (2, "std::fs"),
            (2, "fs::"),
            (2, "read_to_string"),
            (3, "tls::")
        ]
    );
    assert!(io_markers("let x = parse(text);\n// File::open\n").is_empty());
}

/// The config is a pure function of its text: it reads no file (not even the certificates it names),
/// opens no socket and builds no TLS; `load` does that at the edge.
#[test]
fn the_config_does_no_io() {
    let mut scanned = 0;
    for (module, file) in module_files() {
        if !PURE.contains(&module.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        scanned += 1;
        let found = io_markers(&text);
        assert!(
            found.is_empty(),
            "{} does I/O or TLS (line, marker): {found:?}; move it to the edge (src/load.rs)",
            file.display()
        );
    }
    assert!(scanned > 0, "no file of {PURE:?} found under src/");
}
