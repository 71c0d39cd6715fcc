//! Compiles the capture programs (bpf/*.bpf.c) with clang for the BPF target,
//! and generates the C layout of the shared structs (bpf/capture.h) for the
//! test that checks src/layout.rs against it. Nothing prebuilt is committed.

use std::path::PathBuf;
use std::process::Command;

/// One object per attach point.
const PROGRAMS: [&str; 6] = ["sk_lookup", "connect4", "connect6", "sockops", "getsockopt", "splice"];

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let clang = std::env::var("AMBIT_CLANG").unwrap_or_else(|_| "clang".to_string());
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").expect("cargo sets CARGO_CFG_TARGET_ARCH");
    // The kernel's UAPI headers (asm/types.h) live under the multiarch directory.
    let multiarch = format!("-I/usr/include/{arch}-linux-gnu");
    println!("cargo:rerun-if-changed=bpf");
    println!("cargo:rerun-if-env-changed=AMBIT_CLANG");
    for prog in PROGRAMS {
        let src = format!("bpf/{prog}.bpf.c");
        let obj = out.join(format!("{prog}.bpf.o"));
        let args = ["-O2", "-g", "-target", "bpf", "-Wall", "-Werror", &multiarch, "-c", &src, "-o"];
        run(Command::new(&clang).args(args).arg(&obj), &clang);
    }
    // The layout as the C compiler sees it, printed as Rust constants.
    let layout_bin = out.join("layout");
    run(Command::new(&clang).args(["-O0", "-Ibpf", "bpf/layout.c", "-o"]).arg(&layout_bin), &clang);
    let printed = Command::new(&layout_bin).output().expect("run the layout program");
    assert!(printed.status.success(), "the layout program failed");
    std::fs::write(out.join("c_layout.rs"), printed.stdout).expect("write c_layout.rs");
}

fn run(cmd: &mut Command, clang: &str) {
    match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(s) => panic!(
            "ambit-ebpf: `{cmd:?}` failed ({s}); the BPF programs need clang and libbpf's headers \
             (Debian packages clang and libbpf-dev; scripts/install-deps.sh installs them)"
        ),
        Err(e) => panic!(
            "ambit-ebpf: cannot run `{clang}`: {e}; building the eBPF capture programs needs clang \
             (Debian package clang, with libbpf-dev for bpf/bpf_helpers.h; scripts/install-deps.sh installs them)"
        ),
    }
}
