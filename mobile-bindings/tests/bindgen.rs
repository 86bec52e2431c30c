//! Runs only with `--features bindgen` (uniffi_bindgen is slow to compile):
//! - the checked-in Python bindings match what uniffi generates from the built library now;
//! - the Swift bindings generate, and their C header compiles with gcc and links against the
//!   `.so`, every declared function existing in its dynamic symbol table (no Swift toolchain
//!   here: this is as far as Swift can be checked on Linux);
//! - the Kotlin bindings generate.

mod common;

use std::path::Path;
use std::process::Command;

use common::cdylib;

fn generate(language: &str, out: &Path) {
    let so = cdylib();
    assert!(so.exists(), "{} missing", so.display());
    let status = Command::new(env!("CARGO_BIN_EXE_uniffi-bindgen"))
        .args(["generate", "--no-format", "--library"])
        .arg(&so)
        .args(["--language", language, "--out-dir"])
        .arg(out)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run uniffi-bindgen");
    assert!(status.success(), "uniffi-bindgen {language}: {status}");
}

#[test]
fn checked_in_python_bindings_are_current() {
    let dir = tempfile::tempdir().unwrap();
    generate("python", dir.path());
    let fresh = std::fs::read_to_string(dir.path().join("bedside_mobile.py")).unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("bindings/python/bedside_mobile.py");
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    if std::env::var_os("BEDSIDE_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &fresh).unwrap();
        return;
    }
    assert!(
        fresh == checked_in,
        "{} is stale: rerun with BEDSIDE_BLESS=1 \
         cargo test -p bedside-mobile --features bindgen --test bindgen",
        path.display()
    );
}

/// The functions a uniffi C header declares (`uniffi_...(` and `ffi_...(`), not typedefs.
fn declared_functions(header: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in header.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with("typedef") || line.starts_with("//") {
            continue;
        }
        let Some(paren) = line.find('(') else {
            continue;
        };
        let before = &line[..paren];
        let name = before
            .rsplit(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .next()
            .unwrap_or("");
        if name.starts_with("uniffi_") || name.starts_with("ffi_") {
            names.push(name.to_owned());
        }
    }
    names.sort();
    names.dedup();
    names
}

#[test]
fn swift_header_compiles_and_links_against_the_library() {
    let dir = tempfile::tempdir().unwrap();
    generate("swift", dir.path());
    for file in ["bedside_mobile.swift", "bedside_mobileFFI.modulemap"] {
        assert!(dir.path().join(file).exists(), "{file} not generated");
    }
    let header = std::fs::read_to_string(dir.path().join("bedside_mobileFFI.h")).unwrap();
    let functions = declared_functions(&header);
    assert!(functions.len() > 20, "{functions:?}");
    assert!(
        functions
            .iter()
            .any(|f| f.contains("bedsideclient_push_video_frame")),
        "{functions:?}"
    );

    // Every declared function is exported by the .so.
    let so = cdylib();
    let nm = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(&so)
        .output()
        .expect("nm");
    assert!(nm.status.success());
    let exported: std::collections::HashSet<String> = String::from_utf8_lossy(&nm.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().last().map(str::to_owned))
        .collect();
    let missing: Vec<_> = functions
        .iter()
        .filter(|f| !exported.contains(*f))
        .collect();
    assert!(missing.is_empty(), "declared but not exported: {missing:?}");

    // The header compiles as C (Clang nullability keywords defined away for gcc) and a
    // program taking the address of every declared function links against the .so.
    let mut c = String::from("#include \"bedside_mobileFFI.h\"\n#include <stdio.h>\n");
    c.push_str("void *const symbols[] = {\n");
    for f in &functions {
        c.push_str(&format!("    (void *)&{f},\n"));
    }
    c.push_str("};\nint main(void) {\n");
    c.push_str("    printf(\"%zu\\n\", sizeof symbols / sizeof symbols[0]);\n    return 0;\n}\n");
    std::fs::write(dir.path().join("check.c"), c).unwrap();
    let out = Command::new("gcc")
        .args([
            "-std=c11",
            "-Wall",
            "-Werror",
            "-D_Nullable=",
            "-D_Nonnull=",
        ])
        .arg("-I")
        .arg(dir.path())
        .arg(dir.path().join("check.c"))
        .arg(&so)
        .arg("-o")
        .arg(dir.path().join("check"))
        .output()
        .expect("gcc");
    assert!(
        out.status.success(),
        "gcc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(dir.path().join("check"))
        .env("LD_LIBRARY_PATH", so.parent().unwrap())
        .output()
        .expect("run check");
    assert!(run.status.success());
    assert_eq!(
        String::from_utf8_lossy(&run.stdout).trim(),
        functions.len().to_string()
    );
}

#[test]
fn kotlin_bindings_generate() {
    let dir = tempfile::tempdir().unwrap();
    generate("kotlin", dir.path());
    let kt = dir.path().join("uniffi/bedside_mobile/bedside_mobile.kt");
    let text = std::fs::read_to_string(&kt).unwrap_or_else(|e| panic!("{}: {e}", kt.display()));
    assert!(text.contains("class BedsideClient"));
}
