//! Every fuzz target's check, run on its seeds and on every input that once failed it
//! (`fuzz/seeds/TARGET` and `fuzz/regressions/TARGET`), so a finding stays fixed on
//! machines without a nightly toolchain too.

use std::path::Path;

fn inputs(kind: &str, target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).expect("read corpus file");
            (p.display().to_string(), bytes)
        })
        .collect()
}

#[test]
fn every_target_has_seeds_and_passes_them_and_its_regressions() {
    for (target, check) in adi_fuzz::CHECKS {
        let seeds = inputs("seeds", target);
        assert!(!seeds.is_empty(), "fuzz/seeds/{target} holds no seed");
        for (name, bytes) in seeds.iter().chain(&inputs("regressions", target)) {
            let outcome = std::panic::catch_unwind(|| check(bytes));
            assert!(outcome.is_ok(), "{target} fails on {name}");
        }
    }
}
