//! Every file of `fuzz/corpus/<target>/` through its fuzz target body
//! ([`callvault::fuzzing`]), on the stable toolchain: the targets stay compiled and the seed
//! corpora (and any crash input added to them after a fix) are regression inputs of every
//! `cargo test`. `cargo fuzz` itself needs nightly; see `fuzz/README.md`.

use std::path::PathBuf;

#[test]
fn fuzz_corpora_pass_their_targets() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (name, target) in callvault::fuzzing::TARGETS {
        let dir = root.join(name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(files.len() >= 3, "{name}: a seed corpus of a few files");
        for f in files {
            let data = std::fs::read(&f).unwrap();
            let run = std::panic::catch_unwind(|| target(&data));
            assert!(run.is_ok(), "{name}: {} panicked", f.display());
        }
    }
}
