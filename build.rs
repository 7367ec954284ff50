//! Compiles the tc eBPF program `bpf/rtp_fwd.bpf.c` with clang (`-target bpf`) into OUT_DIR,
//! where `src/media/kernel` embeds it. No prebuilt object is checked in.
//!
//! Without clang (or the libbpf headers) the build still succeeds with an empty object and a
//! warning: callvault then reports the kernel path as unavailable and relays in user space.
//! `CALLVAULT_REQUIRE_TOOLS=1` (CI) makes a failed compile an error instead.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "bpf/rtp_fwd.bpf.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=CALLVAULT_REQUIRE_TOOLS");
    println!("cargo:rerun-if-env-changed=CLANG");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default()).join("rtp_fwd.bpf.o");
    let arch = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("aarch64") => "aarch64-linux-gnu",
        Ok("x86") => "i386-linux-gnu",
        _ => "x86_64-linux-gnu",
    };
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let result = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        // <asm/types.h> of the target lives under the multiarch include directory on Debian.
        .arg(format!("-I/usr/include/{arch}"))
        .args(["-c", src, "-o"])
        .arg(&out)
        .status();
    let ok = matches!(&result, Ok(st) if st.success());
    if !ok {
        let why = match result {
            Ok(st) => format!("{clang} failed ({st})"),
            Err(e) => format!("cannot run {clang}: {e}"),
        };
        if std::env::var("CALLVAULT_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("compiling {src}: {why} (install clang and libbpf-dev)");
        }
        println!("cargo:warning=kernel fast path not built: {why}");
        // An empty object: the loader reports the path as unavailable at run time.
        if let Err(e) = std::fs::write(&out, b"") {
            panic!("writing {}: {e}", out.display());
        }
    }
}
