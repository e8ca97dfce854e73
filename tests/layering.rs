//! The module layering (issue 18): dependencies point one way. Reads the `crate::<module>` paths of
//! every file under src/ and checks that no module imports one that imports it back (directly or
//! through others), and that the data plane imports nothing of the control plane.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The data plane: what one call goes through. It must not know who drives it.
const DATA_PLANE: &[&str] = &[
    "listener", "proxy", "upstream", "balancer", "router", "state",
];
/// The control plane: what starts, reloads, checks and reports on the data plane.
const CONTROL_PLANE: &[&str] = &["gateway", "health", "admin", "discovery", "demo", "echo"];
/// Leaves: protocol facts and plain types that import no other module of the crate but each other
/// as listed.
const LEAVES: &[(&str, &[&str])] = &[
    ("grpc", &[]),
    ("worker", &[]),
    ("tls", &[]),
    ("config", &["tls"]),
    ("metrics", &["grpc"]),
    ("access_log", &["config"]),
];

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

/// Top-level module → the top-level modules it names as `crate::<name>`.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let module = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
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
        for c in CONTROL_PLANE {
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
